"""Text that every machine has: the Python documentation shipped with the interpreter.

``python_doc_topics`` is the one reader of that corpus: the test tokenizer (runtimes.testing), the
training data (dewey_train.data) and the evaluation filler (dewey_train.evaluation) are made of it.
"""

from __future__ import annotations


def python_doc_topics() -> list[str]:
    """The pages of the Python documentation's topics (``pydoc_data.topics``, shipped with every Python),
    in key order: real English text that needs no download."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]
