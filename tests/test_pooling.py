"""Pooling semantics: CLS, mean, cls_add_mean and late-chunking span means against a naive reference.

The reference is built by hand, independently of the Encoder's own plumbing: the row
``[CLS] prompt text [SEP]`` is assembled here from the config's ids, the backbone runs on it alone
(batch of one, no padding), and every pooled vector is a plain Python loop over token positions,
summed in float64, followed by the bias-free linear head. Only the backbone forward is shared with
the code under test, so any error in span construction, prompt/special-token exclusion, prefix-sum
pooling, head placement, mode combination or normalisation shows up as a difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtimes.modeling import span_means

try:
    from conftest import FP32_ATOL
except ImportError:  # pragma: no cover - same value as tests/conftest.py
    # fp32 results that must be equal up to float rounding: the bound for padded batches.
    FP32_ATOL = 1e-5

# Texts of very different lengths (in tokens of the test tokenizer): below, around and well above the
# test model's 16-token sliding window, and non-ASCII text.
SHORT = "Hi."
MEDIUM = "The quick brown fox jumps over the lazy dog, then reads the Python data model."
UNICODE = "Grüße 🙂 日本語: special method names such as __init__ and __repr__."
PROMPTS = [None, "query", "passage", "Represent this sentence: "]


# -- the naive reference ---------------------------------------------------------------------------


def _text_ids(encoder, text):
    return [int(i) for i in encoder.tokenizer.encode_texts([text])[0].ids]


def _prompt_ids(encoder, prompt):
    return [int(i) for i in encoder.tokenizer.prompt_ids(prompt)]


def _row(encoder, prompt_ids, text_ids):
    """``[CLS] prompt text [SEP]`` assembled from the config's special ids (not tokenizer.row)."""
    return [encoder.config.cls_token_id, *prompt_ids, *text_ids, encoder.config.sep_token_id]


def _hidden(encoder, row):
    """Final hidden states [S, H] (float64 copy) of one unpadded row, from the backbone alone."""
    model = encoder.backend.model
    ids = torch.tensor([row], dtype=torch.long, device=encoder.backend.device)
    with torch.inference_mode():
        hidden = model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return hidden[0].double().cpu().numpy()


def _head(encoder, vector):
    """The bias-free linear head, applied in float64 (identity when there is none)."""
    head = encoder.backend.model.head
    if head is None:
        return np.asarray(vector, dtype=np.float64)
    assert head.bias is None, "the Dewey head is documented as bias-free"
    weight = head.weight.detach().double().cpu().numpy()
    return weight @ np.asarray(vector, dtype=np.float64)


def _loop_mean(hidden, positions):
    """Average of hidden[i] over ``positions``, one position at a time, in float64."""
    positions = list(positions)
    total = np.zeros(hidden.shape[1], dtype=np.float64)
    for i in positions:
        total += hidden[i]
    return total / len(positions)


def _normalize(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _reference(encoder, text, prompt=None):
    """(cls, mean, hidden, text_start, n_text) for one text: CLS = head(h[0]); mean = head(average of
    the text tokens only: positions 1 + len(prompt) .. before [SEP])."""
    p_ids = _prompt_ids(encoder, prompt)
    t_ids = _text_ids(encoder, text)
    row = _row(encoder, p_ids, t_ids)
    hidden = _hidden(encoder, row)
    start = 1 + len(p_ids)
    text_positions = [i for i in range(len(row)) if start <= i < len(row) - 1]
    assert len(text_positions) == len(t_ids)
    cls = _head(encoder, hidden[0])
    mean = _head(encoder, _loop_mean(hidden, text_positions))
    return cls, mean, hidden, start, len(t_ids)


def _cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- single-vector modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cls_matches_loop_reference(encoder, long_text, prompt):
    """mode='cls' is the head applied to the final hidden state of token 0 ([CLS]), raw and normalised."""
    texts = [SHORT, MEDIUM, UNICODE, long_text[:600]]
    refs = np.stack([_reference(encoder, t, prompt)[0] for t in texts])
    raw = encoder.encode(texts, mode="cls", prompt=prompt, normalize=False)
    assert raw.shape == (len(texts), encoder.vector_size) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, refs, rtol=0, atol=FP32_ATOL)
    unit = encoder.encode(texts, mode="cls", prompt=prompt, normalize=True)
    np.testing.assert_allclose(unit, _normalize(refs), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_mean_matches_loop_reference(encoder, long_text, prompt):
    """mode='mean' is the head applied to the average of the text tokens only (no [CLS], no prompt,
    no [SEP]), raw and normalised; also for a single string input ([D] output)."""
    texts = [SHORT, MEDIUM, UNICODE, long_text[:600]]
    refs = np.stack([_reference(encoder, t, prompt)[1] for t in texts])
    raw = encoder.encode(texts, mode="mean", prompt=prompt, normalize=False)
    np.testing.assert_allclose(raw, refs, rtol=0, atol=FP32_ATOL)
    unit = encoder.encode(texts, mode="mean", prompt=prompt, normalize=True)
    np.testing.assert_allclose(unit, _normalize(refs), rtol=0, atol=FP32_ATOL)
    single = encoder.encode(MEDIUM, mode="mean", prompt=prompt, normalize=False)
    assert single.shape == (encoder.vector_size,)
    np.testing.assert_allclose(single, refs[1], rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("prompt", [None, "query"])
def test_cls_add_mean_is_normalized_sum_of_normalized_parts(encoder, long_text, prompt):
    """mode='cls_add_mean' = normalize(normalize(cls) + normalize(mean)) (dewey's definition; the published one is unknown); it is
    also the model's default single_vector_type, so mode=None must give the same vectors."""
    texts = [SHORT, MEDIUM, long_text[:600]]
    expected = []
    for text in texts:
        cls, mean, *_ = _reference(encoder, text, prompt)
        expected.append(_normalize(_normalize(cls) + _normalize(mean)))
    expected = np.stack(expected)
    got = encoder.encode(texts, mode="cls_add_mean", prompt=prompt)
    np.testing.assert_allclose(got, expected, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=FP32_ATOL)
    assert encoder.config.single_vector_type == "cls_add_mean"
    np.testing.assert_allclose(encoder.encode(texts, prompt=prompt), got, rtol=0, atol=FP32_ATOL)
    # Not a plain sum of unnormalised parts: that would give a different direction here.
    cls, mean = (np.stack(x) for x in zip(*[_reference(encoder, t, prompt)[:2] for t in texts]))
    wrong = _normalize(cls + mean)
    assert np.abs(got - wrong).max() > 1e-3


def test_mean_excludes_prompt_and_special_tokens(encoder):
    """With prompt='query' the mean skips the prompt tokens, [CLS] and [SEP]: it equals the loop over
    text positions only and is clearly different from a reference that wrongly pools them too."""
    text = MEDIUM
    _, mean, hidden, start, n_text = _reference(encoder, text, "query")
    assert start > 1, "the query prompt must have tokens for this test to mean anything"
    got = encoder.encode(text, mode="mean", prompt="query", normalize=False)
    np.testing.assert_allclose(got, mean, rtol=0, atol=FP32_ATOL)

    with_prompt = _head(encoder, _loop_mean(hidden, range(1, start + n_text)))
    with_specials = _head(encoder, _loop_mean(hidden, range(0, start + n_text + 1)))
    only_text_but_sep = _head(encoder, _loop_mean(hidden, range(start, start + n_text + 1)))
    for wrong in (with_prompt, with_specials, only_text_but_sep):
        # Far above the tolerance: a pooling that included these tokens would fail the check above.
        assert np.abs(got - wrong).max() > 100 * FP32_ATOL


def test_prompt_changes_context_not_pooled_positions(encoder):
    """The prompt is in the row and attended to (the text's hidden states change), so the mean with a
    prompt differs from the mean without, and query differs from passage.

    The tiny random model mixes context weakly (its final hidden states are dominated by each token's
    own embedding), so the effect on the mean is only ~3e-4 here; 10 x FP32_ATOL is still far above
    float noise (the same call repeated is bit-identical).
    """
    plain = encoder.encode(MEDIUM, mode="mean", normalize=False)
    query = encoder.encode(MEDIUM, mode="mean", prompt="query", normalize=False)
    passage = encoder.encode(MEDIUM, mode="mean", prompt="passage", normalize=False)
    np.testing.assert_array_equal(plain, encoder.encode(MEDIUM, mode="mean", normalize=False))
    assert np.abs(plain - query).max() > 10 * FP32_ATOL
    assert np.abs(query - passage).max() > 10 * FP32_ATOL


# -- late chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("splitter", ["tokens", "recursive"])
@pytest.mark.parametrize("prompt", [None, "passage"])
def test_chunk_vectors_match_loop_reference(encoder, long_text, splitter, prompt):
    """Each chunk vector is the head applied to the average of that chunk's tokens, from ONE pass over
    the whole row; token_spans index text tokens, so the row offset is 1 + len(prompt ids)."""
    texts = [long_text[:1500], MEDIUM]
    docs = encoder.encode_chunks(
        texts, chunk_size=32, chunk_overlap=8, splitter=splitter, prompt=prompt, normalize=False
    )
    unit_docs = encoder.encode_chunks(
        texts, chunk_size=32, chunk_overlap=8, splitter=splitter, prompt=prompt, normalize=True
    )
    assert len(docs) == len(texts)
    for text, doc, unit in zip(texts, docs, unit_docs):
        _, _, hidden, start, n_text = _reference(encoder, text, prompt)
        assert len(doc.token_spans) == doc.vectors.shape[0] >= 1
        assert doc.vectors.shape[1] == encoder.vector_size
        expected = []
        for a, b in doc.token_spans:
            assert 0 <= a < b <= n_text and b - a <= 32
            expected.append(_head(encoder, _loop_mean(hidden, range(start + a, start + b))))
        expected = np.stack(expected)
        np.testing.assert_allclose(doc.vectors, expected, rtol=0, atol=FP32_ATOL)
        assert unit.token_spans == doc.token_spans
        np.testing.assert_allclose(unit.vectors, _normalize(expected), rtol=0, atol=FP32_ATOL)
    assert len(docs[0].token_spans) > 1, "the long text must give several chunks"


def test_single_chunk_equals_mean(encoder):
    """A text shorter than chunk_size is one chunk covering all text tokens: its vector is the mean."""
    doc = encoder.encode_chunks(MEDIUM, chunk_size=256, chunk_overlap=64, prompt="query", normalize=False)
    assert doc.token_spans == [(0, len(_text_ids(encoder, MEDIUM)))]
    mean = encoder.encode(MEDIUM, mode="mean", prompt="query", normalize=False)
    np.testing.assert_allclose(doc.vectors[0], mean, rtol=0, atol=FP32_ATOL)


# -- span_means itself ---------------------------------------------------------------------------------


def _loop_span_means(hidden, span_bounds):
    """Naive span means: float64 loop, zeros for an empty span."""
    hidden = hidden.double().numpy()
    bounds = span_bounds.numpy()
    out = np.zeros((bounds.shape[0], bounds.shape[1], hidden.shape[2]), dtype=np.float64)
    for b in range(bounds.shape[0]):
        for c in range(bounds.shape[1]):
            start, end = bounds[b, c]
            if end > start:
                out[b, c] = _loop_mean(hidden[b], range(start, end))
    return out


def test_span_means_matches_loop_on_random_tensors():
    """span_means equals a per-position loop for arbitrary spans (overlapping, single-token, full-row,
    empty), keeps the input dtype and shape [B, C, H]."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, width = 3, 40, 5
    hidden = torch.randn(batch, seq, width, generator=gen)
    lengths = [40, 23, 7]
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    bounds = torch.tensor(
        [
            [[0, 40], [3, 4], [10, 30], [20, 35], [0, 0]],
            [[1, 22], [5, 9], [0, 23], [0, 0], [0, 0]],
            [[1, 6], [6, 7], [0, 1], [2, 5], [0, 0]],
        ],
        dtype=torch.long,
    )
    out = span_means(hidden, mask, bounds)
    assert out.shape == (batch, bounds.shape[1], width) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _loop_span_means(hidden, bounds), rtol=0, atol=1e-6)


def test_span_means_empty_spans_are_zeros():
    """An empty span, (0, 0) padding or (k, k) anywhere, gives exactly zeros (not NaN from 0/0)."""
    hidden = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(1)) + 5.0
    mask = torch.ones(2, 10, dtype=torch.long)
    bounds = torch.tensor([[[0, 0], [4, 4], [2, 6]], [[9, 9], [0, 0], [0, 0]]], dtype=torch.long)
    out = span_means(hidden, mask, bounds).numpy()
    assert np.all(np.isfinite(out))
    zero = np.zeros(3, dtype=np.float32)
    for b, c in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]:
        np.testing.assert_array_equal(out[b, c], zero)
    np.testing.assert_allclose(out[0, 2], hidden[0, 2:6].double().mean(0).numpy(), rtol=0, atol=1e-6)


def test_span_means_nan_in_padding_does_not_leak():
    """NaN/Inf in padded positions (attention_mask == 0) must not reach any span.

    Row 0 is right-padded (what pad_batch builds): a prefix sum read only up to a span's end never sees
    that padding, so it checks spans and empty spans stay finite. Row 1 is left-padded (a masked hole
    *before* the spans, as a left-padding exporter or caller would give): there every prefix past the
    hole carries it unless padded values are replaced (``where``) rather than multiplied by the mask,
    since NaN * 0 = NaN. Row 2 is unpadded and must be untouched by its neighbours' NaNs.
    """
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 12, 4, generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0
    hidden[0, 9] = float("nan")
    hidden[0, 11, 2] = float("inf")
    mask[1, :3] = 0
    hidden[1, 0] = float("nan")
    hidden[1, 2, 1] = float("-inf")
    bounds = torch.tensor(
        [
            [[1, 8], [0, 3], [0, 0]],
            [[3, 12], [5, 9], [0, 0]],
            [[0, 12], [5, 11], [0, 0]],
        ],
        dtype=torch.long,
    )
    out = span_means(hidden, mask, bounds).numpy()
    assert np.all(np.isfinite(out)), out
    clean = torch.where(mask.bool().unsqueeze(-1), hidden, torch.zeros(()))
    np.testing.assert_allclose(out, _loop_span_means(clean, bounds), rtol=0, atol=1e-6)
    # The test discriminates: zeroing padding by multiplying instead leaks into row 1's spans.
    prefix = torch.cumsum((hidden * mask.unsqueeze(-1)).double(), dim=1)
    assert torch.isnan(prefix[1, 8] - prefix[1, 4]).all()


def test_span_means_long_row_precision():
    """A 256-token span late in a 131,072-token row, values ~1e3: the mean matches a direct float64
    mean to 1e-3.

    Tolerance: the result is float32, whose spacing at 1e3 is 2**-14 ~ 6e-5, so a correct float64
    accumulation followed by one rounding is within ~3e-5; 1e-3 (~16 float32 ulps) leaves room for that
    while a float32 prefix sum fails by far: its prefixes reach ~1.3e8 where float32 spacing is 8, and
    the accumulated rounding over 131k additions, divided by 256, is orders of magnitude above 1e-3
    (checked below so the test demonstrably discriminates). Memory: 131072 x 4 floats = 2 MiB (4 MiB in
    float64 prefixes).
    """
    seq, width, span_len = 131072, 4, 256
    gen = torch.Generator().manual_seed(3)
    hidden = (1000.0 + torch.rand(1, seq, width, generator=gen, dtype=torch.float64)).to(torch.float32)
    mask = torch.ones(1, seq, dtype=torch.long)
    end = 131000
    bounds = torch.tensor([[[end - span_len, end], [0, span_len], [0, seq]]], dtype=torch.long)
    out = span_means(hidden, mask, bounds).double().numpy()[0]
    h64 = hidden[0].double().numpy()
    direct = np.stack([h64[end - span_len:end].mean(0), h64[:span_len].mean(0), h64.mean(0)])
    tolerance = 1e-3
    assert np.abs(out - direct).max() <= tolerance
    # The naive float32 prefix-sum approach this guards against misses the tolerance.
    prefix32 = torch.cumsum(hidden[0], dim=0)
    naive = ((prefix32[end - 1] - prefix32[end - span_len - 1]) / span_len).double().numpy()
    assert np.abs(naive - direct[0]).max() > tolerance


# -- bf16 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_encoder(checkpoint):
    from runtimes import load

    return load(checkpoint, backend="torch", dtype="bfloat16")


def test_bf16_vectors_close_to_fp32(encoder, bf16_encoder, long_text):
    """bf16 gives vectors with cosine >= 0.99 to fp32, for every mode and for chunks.

    Tolerance: bf16 keeps 8 bits of mantissa (relative rounding ~2**-9 = 0.2% per value), compounded
    over 3 layers of a random model; cosine 0.99 allows that drift while a real error (wrong dtype cast
    of the head, garbage from a bf16 prefix sum, wrong positions) gives cosines far below it.
    """
    assert str(bf16_encoder.backend.dtype) == "torch.bfloat16"
    texts = [SHORT, MEDIUM, UNICODE, long_text[:1500]]
    for mode in ("cls", "mean", "cls_add_mean"):
        a = encoder.encode(texts, mode=mode, prompt="query")
        b = bf16_encoder.encode(texts, mode=mode, prompt="query")
        assert b.dtype == np.float32 and b.shape == a.shape
        for i in range(len(texts)):
            assert _cosine(a[i], b[i]) >= 0.99, (mode, i, _cosine(a[i], b[i]))
    # bf16 really computes in bf16: the vectors are close but not bit-identical to fp32.
    assert np.abs(a - b).max() > 0
    docs32 = encoder.encode_chunks(long_text[:1500], chunk_size=64, chunk_overlap=16)
    docs16 = bf16_encoder.encode_chunks(long_text[:1500], chunk_size=64, chunk_overlap=16)
    assert docs16.token_spans == docs32.token_spans
    for u, v in zip(docs32.vectors, docs16.vectors):
        assert _cosine(u, v) >= 0.99


@pytest.mark.parametrize("mode", ["cls", "mean", "cls_add_mean"])
def test_encode_chunks_gives_the_encode_vector_from_the_same_pass(encoder, long_text, mode):
    """ChunkedDocument.vector is pooled in the pass that gives the chunks, and equals encode's vector;
    the extra whole-text span leaves the chunk vectors as they are."""
    texts = [long_text[:2500], "a short one", long_text[3000:3400]]
    docs = encoder.encode_chunks(texts, chunk_size=32, chunk_overlap=8, mode=mode, prompt="query")
    expected = encoder.encode(texts, mode=mode, prompt="query")
    for doc, vector, text in zip(docs, expected, texts):
        np.testing.assert_allclose(doc.vector, vector, atol=FP32_ATOL)
        alone = encoder.encode_chunks(text, chunk_size=32, chunk_overlap=8, mode=mode, prompt="query")
        np.testing.assert_allclose(doc.vectors, alone.vectors, atol=FP32_ATOL)
