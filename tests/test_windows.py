"""Texts longer than the model's window: the window layout (``runtimes.windows``) and the Encoder's use of
it in ``encode_chunks`` and in ``encode(mode="mean", truncate=False)``.

The reference for a windowed text is computed here from the backend contract alone: each kept token's
state is the backend's output for a one-token span of the window that keeps it, and a chunk's vector is
the mean of those (the head is affine, so the mean of heads is the head of the mean).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtimes.windows import (
    DEFAULT_WINDOW_OVERLAP,
    check_window_overlap,
    default_window_overlap,
    plan_windows,
    split_spans,
)

from conftest import FP32_ATOL

# -- the layout ---------------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    capacity = draw(st.integers(1, 300))
    overlap = draw(st.integers(0, capacity - 1))
    n_tokens = draw(st.integers(1, 4000))
    return n_tokens, capacity, overlap


@settings(max_examples=300, deadline=None)
@given(layout=layouts())
def test_windows_cover_every_token_and_keep_each_once(layout):
    """Windows of the full capacity (or the whole text when it fits), from the text's start to its end,
    neighbours overlapping by at least ``window_overlap``; the kept ranges partition the tokens in order,
    each inside its window with at least ``window_overlap // 2`` tokens of the window on either side
    (except at the text's own start and end)."""
    n, capacity, overlap = layout
    plan = plan_windows(n, capacity, overlap)
    windows, kept = plan.windows, plan.kept
    assert (plan.n_windows == 1) == (n <= capacity)
    assert windows[0, 0] == 0 and windows[-1, 1] == n
    assert ((windows[:, 1] - windows[:, 0]) == min(n, capacity)).all()
    assert (windows[1:, 0] <= windows[:-1, 1] - overlap).all()  # neighbours overlap by >= overlap
    assert (np.diff(windows[:, 0]) > 0).all()
    assert kept[0, 0] == 0 and kept[-1, 1] == n
    assert (kept[1:, 0] == kept[:-1, 1]).all() and (kept[:, 1] > kept[:, 0]).all()
    assert (kept[:, 0] >= windows[:, 0]).all() and (kept[:, 1] <= windows[:, 1]).all()
    left = kept[1:, 0] - windows[1:, 0]
    right = windows[:-1, 1] - kept[:-1, 1]
    assert (left >= overlap // 2).all() and (right >= overlap // 2).all()


@settings(max_examples=300, deadline=None)
@given(layout=layouts(), data=st.data())
def test_span_pieces_reassemble_each_span_exactly(layout, data):
    """Every span splits into pieces, one per window that keeps some of its tokens, that lie in that
    window, inside its kept range, and add up to exactly the span: the chunk spans of the whole text
    are the spans pooled, whatever the windows."""
    n, capacity, overlap = layout
    plan = plan_windows(n, capacity, overlap)
    starts = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20))
    spans = np.array([(a, data.draw(st.integers(a + 1, n))) for a in starts], dtype=np.int64)
    covered = [np.zeros(n, dtype=int) for _ in spans]
    for (w_start, w_end), (k_start, k_end), (local, index, weight) in zip(plan.windows, plan.kept,
                                                                        split_spans(plan, spans)):
        assert len(set(index.tolist())) == len(index)  # at most one piece of a span per window
        absolute = local + w_start
        assert (absolute[:, 0] >= k_start).all() and (absolute[:, 1] <= k_end).all()
        assert (local[:, 0] >= 0).all() and (local[:, 1] <= w_end - w_start).all()
        np.testing.assert_array_equal(weight, absolute[:, 1] - absolute[:, 0])
        for (a, b), c in zip(absolute, index):
            covered[c][a:b] += 1
    for (a, b), counts in zip(spans, covered):
        assert (counts[a:b] == 1).all() and counts.sum() == b - a


def test_overlap_default_and_checks():
    assert default_window_overlap(131070) == DEFAULT_WINDOW_OVERLAP
    assert default_window_overlap(1000) == DEFAULT_WINDOW_OVERLAP == 128
    assert default_window_overlap(100) == 25
    assert check_window_overlap(None, 40) == 10
    with pytest.raises(ValueError, match=r"window_overlap \(40\) must be smaller than a window's 40 text tokens"):
        check_window_overlap(40, 40)
    with pytest.raises(ValueError, match="window_overlap must be >= 0"):
        check_window_overlap(-1, 40)


# -- the Encoder: identity when a text fits, the window rule when it does not -----------------------------


def token_states(encoder, row_ids: np.ndarray, positions: range) -> np.ndarray:
    """The backend's output for one-token spans at ``positions`` of one row: [len(positions), D]."""
    bounds = np.array([[[p, p + 1] for p in positions]], dtype=np.int64)
    _, spans = encoder.backend.forward(row_ids[None], np.ones((1, len(row_ids)), np.int64), bounds)
    return np.asarray(spans[0], dtype=np.float64)


def reference_by_windows(encoder, text: str, max_length: int, window_overlap: int, token_spans, prompt=None):
    """Chunk vectors and the text's mean by the window rule, from one-token spans (no Encoder pooling)."""
    ids = encoder.tokenizer.encode_texts([text])[0].ids
    prompt_ids = encoder.tokenizer.prompt_ids(prompt)
    capacity = max_length - 2 - len(prompt_ids)
    plan = plan_windows(len(ids), capacity, window_overlap)
    states = np.zeros((len(ids), encoder.vector_size))
    for (start, end), (kept_start, kept_end) in zip(plan.windows, plan.kept):
        row = encoder.tokenizer.row(prompt_ids, ids[start:end])
        first = 1 + len(prompt_ids) - start
        states[kept_start:kept_end] = token_states(encoder, row, range(first + kept_start, first + kept_end))
    chunks = np.stack([states[a:b].mean(0) for a, b in token_spans])
    return chunks, states.mean(0), plan.n_windows


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def any_encoder(request):
    from runtimes import load

    if request.param == "torch":
        return request.getfixturevalue("encoder")
    return load(request.getfixturevalue("onnx_export"), backend="onnx")


@pytest.fixture(scope="module")
def text(long_text):
    return long_text[:1500]


def test_text_that_fits_takes_one_pass(any_encoder, text):
    """A text of exactly the row's capacity is one row: the same chunks and vectors as with no limit,
    no window, no warning."""
    n = len(any_encoder.tokenizer.encode_texts([text])[0].ids)
    kwargs = dict(chunk_size=32, chunk_overlap=8)
    whole = any_encoder.encode_chunks(text, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at_capacity = any_encoder.encode_chunks(text, max_length=n + 2, **kwargs)
        mean = any_encoder.encode(text, mode="mean", max_length=n + 2, truncate=False)
    assert at_capacity.windows == 1 and not at_capacity.vector_is_approximate
    assert at_capacity.token_spans == whole.token_spans
    np.testing.assert_array_equal(at_capacity.vectors, whole.vectors)
    np.testing.assert_array_equal(at_capacity.vector, whole.vector)
    np.testing.assert_allclose(mean, any_encoder.encode(text, mode="mean"), atol=FP32_ATOL)


@pytest.mark.parametrize("over, window_overlap", [(1, 0), (1, 5), (300, 16), (300, 0)])
def test_text_over_the_row_follows_the_window_rule(any_encoder, text, over, window_overlap):
    """One token over the row (two windows), and far over it (many): chunk vectors, the text's mean and
    encode's windowed mean equal the window rule computed from one-token spans."""
    n = len(any_encoder.tokenizer.encode_texts([text])[0].ids)
    max_length = n + 2 - over
    doc = any_encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, max_length=max_length,
                                    window_overlap=window_overlap, mode="mean")
    chunks, mean, n_windows = reference_by_windows(any_encoder, text, max_length, window_overlap, doc.token_spans)
    assert doc.windows == n_windows > 1 and not doc.vector_is_approximate
    np.testing.assert_allclose(doc.vectors, unit(chunks), atol=FP32_ATOL)
    np.testing.assert_allclose(doc.vector, unit(mean), atol=FP32_ATOL)
    encoded = any_encoder.encode(text, mode="mean", max_length=max_length, truncate=False,
                                 window_overlap=window_overlap)
    np.testing.assert_allclose(encoded, unit(mean), atol=FP32_ATOL)


def test_prompted_windows_follow_the_window_rule(encoder, text):
    """Every window carries the prompt: the rule holds with one, and the capacity shrinks by its length."""
    max_length = 200
    doc = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, max_length=max_length, prompt="query",
                                window_overlap=20, mode="mean")
    chunks, mean, n_windows = reference_by_windows(encoder, text, max_length, 20, doc.token_spans, prompt="query")
    assert doc.windows == n_windows > 1
    np.testing.assert_allclose(doc.vectors, unit(chunks), atol=FP32_ATOL)
    np.testing.assert_allclose(doc.vector, unit(mean), atol=FP32_ATOL)


def test_cls_of_windowed_text_is_flagged_and_token_weighted(encoder, text):
    """The CLS output of a windowed text is the token-weighted mean of its windows' (flagged as an
    approximation on the result); encode refuses the CLS modes for a text over the row."""
    max_length = 300
    doc = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, max_length=max_length, mode="cls",
                                window_overlap=32)
    ids = encoder.tokenizer.encode_texts([text])[0].ids
    plan = plan_windows(len(ids), max_length - 2, 32)
    cls = np.zeros(encoder.vector_size)
    for (start, end), (kept_start, kept_end) in zip(plan.windows, plan.kept):
        row = encoder.tokenizer.row(np.zeros(0, np.int64), ids[start:end])
        out, _ = encoder.backend.forward(row[None], np.ones((1, len(row)), np.int64), np.array([[[1, 2]]]))
        cls += (kept_end - kept_start) / len(ids) * np.asarray(out[0], np.float64)
    assert doc.vector_is_approximate and doc.windows == plan.n_windows
    np.testing.assert_allclose(doc.vector, unit(cls), atol=FP32_ATOL)
    for mode in ("cls", "cls_add_mean"):
        with pytest.raises(ValueError, match=r"texts\[0\] has \d+ tokens but only 298 fit .*mode='mean'"):
            encoder.encode(text, mode=mode, max_length=max_length, truncate=False)


def test_windows_batch_with_other_rows_in_input_order(encoder, text):
    """Windowed and fitting texts in one call: each equals itself encoded alone, in input order."""
    texts = ["A short text.", text, "Another short one, " * 3, text[200:]]
    kwargs = dict(chunk_size=32, chunk_overlap=8, max_length=150, window_overlap=24)
    docs = encoder.encode_chunks(texts, batch_size=3, **kwargs)
    assert [d.windows > 1 for d in docs] == [False, True, False, True]
    for t, doc in zip(texts, docs):
        alone = encoder.encode_chunks(t, **kwargs)
        assert alone.token_spans == doc.token_spans
        np.testing.assert_allclose(alone.vectors, doc.vectors, atol=FP32_ATOL)
        np.testing.assert_allclose(alone.vector, doc.vector, atol=FP32_ATOL)


# -- windows equal one pass when no layer can see past the overlap -------------------------------------------


@pytest.fixture(scope="module")
def local_only_encoder(tmp_path_factory):
    """The tiny test model with every layer sliding-window attention (half width 8, 3 layers): a token's
    state depends on the 3 x 8 = 24 tokens on either side of it and on nothing farther."""
    from runtimes import load
    from runtimes.testing import make_test_checkpoint

    folder = make_test_checkpoint(tmp_path_factory.mktemp("local-only"), seed=1)
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] * config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    return load(folder, backend="torch"), config


def test_windows_equal_one_pass_past_the_receptive_field(local_only_encoder, long_text):
    """With only local layers, windowed chunk vectors equal one full pass (1e-5) once each kept token has
    its whole receptive field in its window (window_overlap // 2 >= layers x half width); below that the
    seams show, which proves the comparison can fail."""
    encoder, config = local_only_encoder
    receptive = config["num_hidden_layers"] * (config["local_attention"] // 2)
    text = long_text[:5000]
    kwargs = dict(chunk_size=32, chunk_overlap=8, mode="mean")
    full = encoder.encode_chunks(text, **kwargs)
    assert full.windows == 1
    for overlap in (2 * receptive, 2 * receptive + 30):
        windowed = encoder.encode_chunks(text, max_length=202, window_overlap=overlap, **kwargs)
        assert windowed.windows > 5
        np.testing.assert_allclose(windowed.vectors, full.vectors, atol=FP32_ATOL)
        np.testing.assert_allclose(windowed.vector, full.vector, atol=FP32_ATOL)
    seams = encoder.encode_chunks(text, max_length=202, window_overlap=receptive // 2, **kwargs)
    assert np.abs(seams.vectors - full.vectors).max() > 1e-3



# -- sentence-transformers models: prompts joined to the text, their own mean, tanh heads -------------------


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory):
    pytest.importorskip("sentence_transformers", reason="the dev extra (sentence-transformers) is not installed")
    from test_models_st import make_modernbert_folder, make_st_model
    from tokenizers.processors import TemplateProcessing

    from runtimes.testing import SPECIAL_TOKENS, build_test_tokenizer

    # The tokenizer of test_models_st's fixture: [CLS] $A [SEP] around every text, as ST tokenizes.
    tokenizer = build_test_tokenizer()
    cls, sep = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                           ("[SEP]", sep)])
    root = tmp_path_factory.mktemp("st-windows")
    base = make_modernbert_folder(root / "base", tokenizer)
    return {
        "mean-identity": make_st_model(root / "mean", base, "mean", [(24, "identity", True)], True, prompts=True),
        "cls-tanh": make_st_model(root / "tanh", base, "cls", [(24, "tanh", True)], True, prompts=True),
    }


def test_sentence_transformers_prompted_windows_follow_the_window_rule(st_folders, text):
    """A prompt joined to the text before tokenization (sentence-transformers' way) frames every window;
    chunks follow the window rule exactly (affine head), and the model's own mean (every attended token,
    [CLS], prompt and [SEP] of each window) is the flagged token-weighted mean of the windows'."""
    from runtimes import load

    encoder = load(st_folders["mean-identity"], backend="torch")
    assert encoder.config.prompt_style == "prefix" and encoder.config.mean_tokens == "attended"
    max_length = 160
    doc = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, max_length=max_length, prompt_name="query",
                                window_overlap=20)
    whole = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, prompt_name="query")
    assert doc.windows > 1 and doc.vector_is_approximate and not doc.chunks_are_approximate
    assert doc.token_spans == whole.token_spans and doc.texts == whole.texts
    # The window rule by hand: the prompt's ids as tokenized with the text frame each window.
    prompt_text = encoder.config.prompts["query"]
    joined = encoder.tokenizer.encode_texts([prompt_text + text])[0]
    first = int(np.searchsorted(joined.offsets[:, 1], len(prompt_text), side="right"))
    prefix, ids = joined.ids[:first], joined.ids[first:]
    plan = plan_windows(len(ids), max_length - 2 - first, 20)
    states = np.zeros((len(ids), encoder.vector_size))
    for (start, end), (kept_start, kept_end) in zip(plan.windows, plan.kept):
        row = encoder.tokenizer.row(prefix, ids[start:end])
        offset = 1 + first - start
        states[kept_start:kept_end] = token_states(encoder, row, range(offset + kept_start, offset + kept_end))
    chunks = np.stack([states[a:b].mean(0) for a, b in doc.token_spans])
    np.testing.assert_allclose(doc.vectors, unit(chunks), atol=FP32_ATOL)
    assert doc.windows == plan.n_windows
    with pytest.raises(ValueError, match="fit in max_length=160"):
        encoder.encode(text, max_length=max_length, truncate=False, prompt_name="query")


def test_tanh_head_flags_chunks_across_seams(st_folders, text):
    """With a tanh Dense head a seam-crossing chunk is combined after the head: flagged on the result."""
    from runtimes import load

    encoder = load(st_folders["cls-tanh"], backend="torch")
    assert not encoder.config.head_affine
    doc = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, max_length=160, window_overlap=20)
    assert doc.windows > 1 and doc.chunks_are_approximate and doc.vector_is_approximate
    fits = encoder.encode_chunks(text[:200], chunk_size=32, chunk_overlap=8)
    assert fits.windows == 1 and not fits.chunks_are_approximate and not fits.vector_is_approximate
