"""Batching: padding invariance, input order, small batches, and the plan_batches / pad_batch helpers.

A text's vector must not depend on which other texts share its batch: padding, length sorting and
batch splitting are implementation details of throughput, never of results (sort by length,
pad per batch, cap a batch by a token budget; results come back in input order).
"""

from __future__ import annotations

import numpy as np
import pytest

from runtimes import batching
from runtimes.batching import (
    BATCH_COST_TOKENS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
    pad_batch,
    plan_batches,
)

try:
    from conftest import FP32_ATOL
except ImportError:  # pragma: no cover - same value as tests/conftest.py
    # fp32 results that must be equal up to float rounding: the bound for padded batches.
    FP32_ATOL = 1e-5

# The test model's sliding window is 16 tokens.
SLIDING_WINDOW = 16


@pytest.fixture(scope="module")
def texts(long_text):
    """Seven texts of very different lengths, interleaved so input order is not length order:
    3, 368, 12, 525, 21, 98 and 40 tokens of the test tokenizer (from below to far above the window)."""
    return [
        "Hi.",
        long_text[500:1500],
        "A short sentence about Python.",
        long_text[1500:3200],
        long_text[:90],
        long_text[100:400],
        "Grüße 🙂 日本語 and some more words here to pass the window.",
    ]


def test_texts_span_the_lengths_that_matter(encoder, texts):
    """Guard for the fixtures below: lengths are mixed, some exceed the sliding window, one is a few
    hundred tokens, and the input order is not sorted (so reordering bugs would show)."""
    lengths = [len(t.ids) for t in encoder.tokenizer.encode_texts(texts)]
    assert min(lengths) < SLIDING_WINDOW < max(lengths)
    assert sum(n > SLIDING_WINDOW for n in lengths) >= 3
    assert max(lengths) >= 300
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)


def _alone(encoder, texts, **kwargs):
    return np.stack([encoder.encode(t, **kwargs) for t in texts])


# -- padding invariance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "cls", "cls_add_mean"])
@pytest.mark.parametrize("prompt", [None, "query"])
def test_single_vectors_padding_invariant(encoder, texts, mode, prompt):
    """Each text encoded alone equals the same text inside one padded, length-mixed batch, to 1e-5 in
    fp32 (raw, unnormalised vectors), in input order."""
    kwargs = dict(mode=mode, prompt=prompt, normalize=False)
    batched = encoder.encode(texts, **kwargs)
    alone = _alone(encoder, texts, **kwargs)
    assert batched.shape == (len(texts), encoder.vector_size)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=FP32_ATOL)
    # The rows are different vectors, so a mix-up of rows could not pass the check above (the tiny
    # random model's CLS vectors are close to each other, ~6e-4 apart at the least, still 60 x the bound).
    assert min(np.abs(alone[i] - alone[j]).max() for i in range(len(texts)) for j in range(i)) > 10 * FP32_ATOL


@pytest.mark.parametrize("prompt", [None, "passage"])
@pytest.mark.parametrize("splitter", ["tokens", "recursive"])
def test_chunk_vectors_padding_invariant(encoder, texts, prompt, splitter):
    """Late-chunking vectors of each text alone equal those from a batch where rows have different
    lengths and different numbers of chunks (so both the rows and the span axis are padded)."""
    kwargs = dict(chunk_size=48, chunk_overlap=12, splitter=splitter, prompt=prompt, normalize=False)
    batched = encoder.encode_chunks(texts, **kwargs)
    assert len(batched) == len(texts)
    counts = set()
    for text, doc in zip(texts, batched):
        alone = encoder.encode_chunks(text, **kwargs)
        assert doc.token_spans == alone.token_spans
        assert doc.char_spans == alone.char_spans
        assert doc.texts == alone.texts
        assert doc.vectors.shape == alone.vectors.shape == (len(alone.token_spans), encoder.vector_size)
        np.testing.assert_allclose(doc.vectors, alone.vectors, rtol=0, atol=FP32_ATOL)
        counts.add(len(doc.token_spans))
    assert len(counts) > 2, "the batch must mix chunk counts for the span padding to be exercised"


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_results_in_input_order(encoder, texts, mode):
    """Encoding a permutation of the texts permutes the rows the same way: the length sort inside the
    encoder is undone."""
    base = encoder.encode(texts, mode=mode, prompt="query")
    perm = np.random.default_rng(0).permutation(len(texts))
    assert not np.array_equal(perm, np.arange(len(texts)))
    shuffled = encoder.encode([texts[i] for i in perm], mode=mode, prompt="query")
    np.testing.assert_allclose(shuffled, base[perm], rtol=0, atol=FP32_ATOL)
    reversed_ = encoder.encode(texts[::-1], mode=mode, prompt="query")
    np.testing.assert_allclose(reversed_, base[::-1], rtol=0, atol=FP32_ATOL)


def test_chunk_documents_in_input_order(encoder, texts):
    """encode_chunks returns one document per text in input order: each document's texts are slices
    of its own input string."""
    perm = [3, 0, 6, 1, 5, 2, 4]
    docs = encoder.encode_chunks([texts[i] for i in perm], chunk_size=48, chunk_overlap=12)
    for i, doc in zip(perm, docs):
        text = texts[i]
        for (a, b), piece in zip(doc.char_spans, doc.texts):
            assert text[a:b] == piece
        assert doc.char_spans[-1][1] <= len(text)
        assert doc.texts[0] in text


def test_duplicate_texts_give_identical_rows(encoder, texts):
    """The same text twice in a batch (beside other lengths) gives the same vector both times."""
    batch = [texts[1], texts[0], texts[1], texts[3]]
    out = encoder.encode(batch, mode="mean", normalize=False)
    np.testing.assert_allclose(out[0], out[2], rtol=0, atol=FP32_ATOL)


# -- forcing small batches ---------------------------------------------------------------------------------


@pytest.fixture
def recorded_batches(encoder, monkeypatch):
    """Wrap the backend's forward to record the (input_ids, span_bounds) shapes of every batch."""
    shapes = []
    forward = encoder.backend.forward

    def recording_forward(input_ids, attention_mask, span_bounds):
        assert input_ids.dtype == attention_mask.dtype == span_bounds.dtype == np.int64
        shapes.append((input_ids.shape, span_bounds.shape, attention_mask.sum(axis=1).tolist()))
        return forward(input_ids, attention_mask, span_bounds)

    monkeypatch.setattr(encoder.backend, "forward", recording_forward)
    return shapes


@pytest.mark.parametrize(
    "batch_size, max_batch_tokens",
    [(2, DEFAULT_MAX_BATCH_TOKENS), (DEFAULT_BATCH_SIZE, 200), (2, 64), (1, DEFAULT_MAX_BATCH_TOKENS)],
)
def test_small_batches_match_one_big_batch(encoder, texts, recorded_batches, batch_size, max_batch_tokens,
                                           monkeypatch):
    """Forcing small batches (by row count or by token budget) gives the same vectors as one batch, and
    the batches actually sent to the backend respect both caps (a single over-long row runs alone)."""
    monkeypatch.setattr(batching, "BATCH_COST_TOKENS", 10**9)  # batches so dear that one holds every text
    big = encoder.encode(texts, mode="mean", prompt="query", normalize=False)
    assert len(recorded_batches) == 1 and recorded_batches[0][0][0] == len(texts)
    recorded_batches.clear()

    small = encoder.encode(
        texts, mode="mean", prompt="query", normalize=False, batch_size=batch_size, max_batch_tokens=max_batch_tokens
    )
    np.testing.assert_allclose(small, big, rtol=0, atol=FP32_ATOL)
    assert len(recorded_batches) > 1
    assert sum(shape[0] for shape, _, _ in recorded_batches) == len(texts)
    widths = []
    for (rows, seq), _, row_lengths in recorded_batches:
        assert rows <= batch_size
        assert rows == 1 or rows * seq <= max_batch_tokens
        assert seq == max(row_lengths)  # padded to the batch's own longest row, not a global length
        widths.append(seq)
    assert widths == sorted(widths, reverse=True), "batches run longest first"


def test_small_batches_chunks_match_one_big_batch(encoder, texts, recorded_batches):
    """encode_chunks with batch_size=2 and a small token budget equals one big batch."""
    kwargs = dict(chunk_size=48, chunk_overlap=12, prompt="passage", normalize=False)
    big = encoder.encode_chunks(texts, **kwargs)
    recorded_batches.clear()
    small = encoder.encode_chunks(texts, batch_size=2, max_batch_tokens=300, **kwargs)
    assert len(recorded_batches) >= 4
    for a, b in zip(big, small):
        assert a.token_spans == b.token_spans
        np.testing.assert_allclose(b.vectors, a.vectors, rtol=0, atol=FP32_ATOL)


# -- plan_batches --------------------------------------------------------------------------------------------


def _check_plan(lengths, batches, batch_size, max_batch_tokens):
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    assert all(batch for batch in batches), "no empty batch"
    ordered = [lengths[i] for i in flat]
    assert ordered == sorted(ordered, reverse=True), "longest first, across and within batches"
    for batch in batches:
        assert len(batch) <= batch_size
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        if len(batch) > 1:  # only a single (possibly over-long) row may exceed the budget
            assert len(batch) * longest <= max_batch_tokens


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_random_lengths(seed):
    """Random lengths and caps: a partition of the indices, sorted longest first, each batch within
    batch_size rows and max_batch_tokens padded tokens unless it is a single over-long row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=int(rng.integers(1, 80))).tolist()
    batch_size = int(rng.integers(1, 10))
    max_batch_tokens = int(rng.integers(50, 3000))
    batches = plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    _check_plan(lengths, batches, batch_size, max_batch_tokens)


def test_plan_batches_fills_batches_of_equal_rows():
    """Rows of one length are not split needlessly: batches fill up to the caps, earlier ones first;
    row cap and token cap both bind."""
    assert plan_batches([5] * 10, batch_size=4, max_batch_tokens=10_000) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Budget 100 with rows of 30: three fit (90), a fourth would pad to 120.
    assert [len(b) for b in plan_batches([30] * 7, batch_size=32, max_batch_tokens=100)] == [3, 3, 1]
    # The padded width is the longest row of the batch: 50 + 10 + 10 pads to 3 x 50 = 150 > 100; and
    # 50 + 10 (100 padded tokens) then 10 costs more than 50 then 10 + 10 (70).
    assert plan_batches([10, 50, 10], batch_size=32, max_batch_tokens=100) == [[1], [0, 2]]


def _padded_cost(lengths, batches, batch_cost):
    return sum(len(b) * max(lengths[i] for i in b) + batch_cost for b in batches)


def _greedy(lengths, batch_size, max_batch_tokens):
    """Fill each batch to its caps (what plan_batches did before it weighed padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


def test_plan_batches_weighs_padding_against_more_batches():
    """Mixed lengths are cut where padding would cost more than another batch: 32 texts of 16..128 tokens
    (one batch: 4,096 padded tokens for 2,304 real) run as 5 batches with 2,613; texts of 512 and of
    32 tokens never share a batch; with batches free, no row is padded at all."""
    assert BATCH_COST_TOKENS == 64
    lengths = np.linspace(16, 128, 32).round().astype(int).tolist()
    batches = plan_batches(lengths)
    assert [len(b) for b in batches] == [6, 7, 6, 7, 6]
    assert _padded_cost(lengths, batches, 0) == 2613
    assert len(plan_batches(lengths, batch_cost_tokens=10**9)) == 1
    mixed = [512, 32] * 4
    assert sorted(map(sorted, plan_batches(mixed))) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    free = plan_batches(lengths, batch_cost_tokens=0)
    assert all(len({lengths[i] for i in b}) == 1 for b in free)


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_costs_no_more_than_filling_greedily(seed):
    """On random lengths and caps the plan's padded tokens plus batch cost never exceed the greedy fill's,
    and it keeps every rule of a plan."""
    rng = np.random.default_rng(100 + seed)
    lengths = rng.integers(1, 600, size=int(rng.integers(1, 120))).tolist()
    batch_size, max_batch_tokens = int(rng.integers(1, 40)), int(rng.integers(50, 5000))
    batches = plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    _check_plan(lengths, batches, batch_size, max_batch_tokens)
    greedy = _greedy(lengths, batch_size, max_batch_tokens)
    assert _padded_cost(lengths, batches, BATCH_COST_TOKENS) <= _padded_cost(lengths, greedy, BATCH_COST_TOKENS)


def test_plan_batches_over_long_rows_run_alone():
    """A row longer than max_batch_tokens makes a batch of one; the others still pack together."""
    lengths = [10, 500, 12, 400, 8]
    batches = plan_batches(lengths, batch_size=8, max_batch_tokens=100)
    assert batches[:2] == [[1], [3]]
    assert sorted(i for b in batches[2:] for i in b) == [0, 2, 4]
    _check_plan(lengths, batches, 8, 100)


def test_plan_batches_ties_keep_input_order():
    """Equal lengths keep their input order (a stable sort), so a plan is deterministic."""
    assert plan_batches([3, 7, 3, 7, 3], batch_size=2, max_batch_tokens=1000) == [[1, 3], [0, 2], [4]]


def test_plan_batches_edge_inputs():
    """No rows gives no batches; one row gives one batch; numpy arrays of lengths work too."""
    assert plan_batches([]) == []
    assert plan_batches([7]) == [[0]]
    # Two batches either way: 9 alone and 4 + 2 (padded 9 + 8) beats 9 + 4 and 2 (18 + 2).
    assert plan_batches(np.array([2, 9, 4]), batch_size=2, max_batch_tokens=100) == [[1], [2, 0]]


@pytest.mark.parametrize("name", ["batch_size", "max_batch_tokens"])
@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError), ("4", TypeError),
                                        (None, TypeError), (True, TypeError)])
def test_plan_batches_rejects_bad_sizes(name, bad, error):
    """batch_size and max_batch_tokens must be positive integers: a wrong type raises TypeError, a value
    below 1 ValueError, both naming the argument; numpy integers are accepted."""
    with pytest.raises(error, match=name):
        plan_batches([1, 2, 3], **{name: bad})
    assert plan_batches([1, 2, 3], **{name: np.int64(2)})


def test_encoder_rejects_bad_batch_args(encoder):
    """The Encoder passes batch_size / max_batch_tokens through to the same checks."""
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a text"], batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        encoder.encode_chunks(["a text"], max_batch_tokens=-1)


# -- pad_batch ----------------------------------------------------------------------------------------------


def test_pad_batch_shapes_dtypes_and_padding():
    """Rows are right-padded with the pad id to the longest row, the mask marks real tokens, spans are
    padded with empty (0, 0) spans to the largest span count; all int64."""
    rows = [np.array([1, 10, 11, 2]), np.array([1, 12, 2], dtype=np.int32), np.array([1, 13, 14, 15, 16, 2])]
    spans = [
        np.array([[1, 3]], dtype=np.int64),
        np.array([[1, 2], [1, 2], [1, 2]], dtype=np.int64),
        np.array([[1, 3], [3, 5]], dtype=np.int64),
    ]
    pad = 3
    input_ids, attention_mask, span_bounds = pad_batch(rows, spans, pad_token_id=pad)
    assert input_ids.shape == attention_mask.shape == (3, 6)
    assert span_bounds.shape == (3, 3, 2)
    assert input_ids.dtype == attention_mask.dtype == span_bounds.dtype == np.int64
    for b, row in enumerate(rows):
        n = len(row)
        np.testing.assert_array_equal(input_ids[b, :n], row)
        assert np.all(input_ids[b, n:] == pad)
        assert np.all(attention_mask[b, :n] == 1) and np.all(attention_mask[b, n:] == 0)
        c = len(spans[b])
        np.testing.assert_array_equal(span_bounds[b, :c], spans[b])
        assert np.all(span_bounds[b, c:] == 0)
    np.testing.assert_array_equal(span_bounds[0], [[1, 3], [0, 0], [0, 0]])
    # The longest row and the row with most spans carry no padding.
    assert attention_mask[2].all() and not (span_bounds[1] == 0).all(axis=1).any()


def test_pad_batch_uses_given_pad_id_and_no_padding_when_equal():
    """Equal-length rows need no padding; the pad id is the one passed, not a hard-coded 0."""
    rows = [np.array([1, 5, 2]), np.array([1, 6, 2])]
    spans = [np.array([[1, 2]]), np.array([[1, 2]])]
    ids, mask, bounds = pad_batch(rows, spans, pad_token_id=99)
    np.testing.assert_array_equal(ids, [[1, 5, 2], [1, 6, 2]])
    assert mask.all() and bounds.shape == (2, 1, 2)
    ids, mask, _ = pad_batch([np.array([1, 2]), np.array([1, 7, 7, 2])], spans, pad_token_id=99)
    np.testing.assert_array_equal(ids[0], [1, 2, 99, 99])
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0])
