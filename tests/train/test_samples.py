"""Training samples chunk text exactly as ``Encoder.encode_chunks`` does: one function makes both."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("torch")  # the session encoder runs the torch backend

from dewey_train.config import config_from_dict  # noqa: E402
from dewey_train.samples import SampleBuilder, split_into_pieces  # noqa: E402
from runtimes.chunking import chunk_spans  # noqa: E402
from runtimes.corpus import python_doc_topics  # noqa: E402

# Only whitespace fits in a row: the recursive splitter finds no chunk in it and falls back to windows.
WHITESPACE_FIRST = "\n" * 2000 + "the text starts after the row ends"


@pytest.fixture(scope="module")
def documents():
    return python_doc_topics()[:12]


@pytest.mark.parametrize("splitter, recursive_fraction", [("words", 0.0), ("recursive", 1.0)])
def test_training_chunks_are_encode_chunks_chunks(encoder, documents, splitter, recursive_fraction):
    """Each sample's spans and chunk texts equal encode_chunks' for its text, splitter, chunk size,
    overlap, prompt and row length (the pieces fit one row). A text longer than the row is cut to it for
    training (encode_chunks would window it), and its chunks are chunk_spans' over the kept tokens."""
    cfg = config_from_dict({"max_length": 300, "chunk_size_min": 16, "chunk_size_max": 48, "seed": 3,
                            "prompts": ["", "query"], "recursive_fraction": recursive_fraction})
    tokenizer = encoder.tokenizer
    builder = SampleBuilder(tokenizer, cfg, teacher_window=64)
    texts = split_into_pieces(documents, tokenizer, builder.budget)
    samples = builder.build(texts + [WHITESPACE_FIRST])
    assert {sample.splitter for sample in samples} == {splitter}
    for text, sample in zip(texts, samples):
        text_start = 1 + len(tokenizer.prompt_ids(sample.prompt))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a piece fits its row: nothing is cut or windowed
            doc = encoder.encode_chunks(
                text, chunk_size=sample.chunk_size, chunk_overlap=sample.chunk_overlap, splitter=sample.splitter,
                prompt=sample.prompt, max_length=len(sample.row),
            )
        assert doc.windows == 1
        assert doc.token_spans == [(a - text_start, b - text_start) for a, b in sample.spans.tolist()]
        assert doc.texts == sample.chunk_texts
    cut = samples[-1]
    tokens = tokenizer.encode_texts([WHITESPACE_FIRST])[0]
    n = len(cut.row) - 1 - (1 + len(tokenizer.prompt_ids(cut.prompt)))
    assert 0 < n < len(tokens.ids)  # the premise: the text is longer than the row
    expected = chunk_spans(WHITESPACE_FIRST, tokens.offsets[:n], cut.chunk_size, cut.chunk_overlap, cut.splitter,
                           builder.recursive)
    np.testing.assert_array_equal(cut.spans - (1 + len(tokenizer.prompt_ids(cut.prompt))), expected)


def test_budget_leaves_room_for_the_longest_prompt(encoder):
    """A row holds [CLS], [SEP], the longest configured prompt and the budget's text tokens."""
    cfg = config_from_dict({"max_length": 300, "chunk_size_min": 16, "prompts": ["", "query", "passage"]})
    longest = max(len(encoder.tokenizer.prompt_ids(p)) for p in cfg.prompts)
    assert SampleBuilder(encoder.tokenizer, cfg).budget == cfg.max_length - 2 - longest
    with pytest.raises(ValueError, match="fewer than chunk_size_min"):
        SampleBuilder(encoder.tokenizer, config_from_dict({"max_length": 40, "chunk_size_min": 32,
                                                           "prompts": ["query"]}))
