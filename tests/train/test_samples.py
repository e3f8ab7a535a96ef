"""Training samples chunk text exactly as ``Encoder.encode_chunks`` does: one function makes both."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("torch")  # the session encoder runs the torch backend

from dewey_train.config import config_from_dict  # noqa: E402
from dewey_train.samples import SampleBuilder, split_into_pieces  # noqa: E402
from runtimes import TruncationWarning  # noqa: E402
from runtimes.corpus import python_doc_topics  # noqa: E402

# Only whitespace fits in a row: the recursive splitter finds no chunk in it and falls back to windows.
WHITESPACE_FIRST = "\n" * 2000 + "the text starts after the row ends"


@pytest.fixture(scope="module")
def documents():
    return python_doc_topics()[:12]


@pytest.mark.parametrize("splitter, recursive_fraction", [("words", 0.0), ("recursive", 1.0)])
def test_training_chunks_are_encode_chunks_chunks(encoder, documents, splitter, recursive_fraction):
    """Each sample's spans and chunk texts equal encode_chunks' for its text, splitter, chunk size,
    overlap, prompt and row length; a text longer than the row is cut the same way in both."""
    cfg = config_from_dict({"max_length": 300, "chunk_size_min": 16, "chunk_size_max": 48, "seed": 3,
                            "prompts": ["", "query"], "recursive_fraction": recursive_fraction})
    tokenizer = encoder.tokenizer
    builder = SampleBuilder(tokenizer, cfg, teacher_window=64)
    texts = split_into_pieces(documents, tokenizer, builder.budget) + [WHITESPACE_FIRST]
    samples = builder.build(texts)
    assert {sample.splitter for sample in samples} == {splitter}
    for text, sample in zip(texts, samples):
        text_start = 1 + len(tokenizer.prompt_ids(sample.prompt))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # the text longer than the row
            doc = encoder.encode_chunks(
                text, chunk_size=sample.chunk_size, chunk_overlap=sample.chunk_overlap, splitter=sample.splitter,
                prompt=sample.prompt, max_length=len(sample.row),
            )
        assert doc.token_spans == [(a - text_start, b - text_start) for a, b in sample.spans.tolist()]
        assert doc.texts == sample.chunk_texts


def test_budget_leaves_room_for_the_longest_prompt(encoder):
    """A row holds [CLS], [SEP], the longest configured prompt and the budget's text tokens."""
    cfg = config_from_dict({"max_length": 300, "chunk_size_min": 16, "prompts": ["", "query", "passage"]})
    longest = max(len(encoder.tokenizer.prompt_ids(p)) for p in cfg.prompts)
    assert SampleBuilder(encoder.tokenizer, cfg).budget == cfg.max_length - 2 - longest
    with pytest.raises(ValueError, match="fewer than chunk_size_min"):
        SampleBuilder(encoder.tokenizer, config_from_dict({"max_length": 40, "chunk_size_min": 32,
                                                           "prompts": ["query"]}))
