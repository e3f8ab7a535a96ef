"""Late chunking: token spans, character spans and chunk vectors of ``Encoder.encode_chunks``.

Spans index the text's own tokens (from ``encoder.tokenizer.encode_texts``), character spans slice the
caller's original string, and every splitter (``tokens``, ``words``, ``recursive``) keeps those
promises, with prompts, unicode and truncation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from runtimes.chunking import char_spans, spans_from_char_ranges, token_windows, word_starts, word_windows

UNICODE_TEXT = "Grüße 🙂 日本語. " * 30 + "Ünïcödé ends here 🙂."

# A text of paragraphs that each fit easily in 32 tokens, but no two of which fit together.
_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
PARAGRAPHS = [" ".join(_WORDS[(i + j) % 12] for j in range(6 + i % 4)) + "." for i in range(10)]
PARAGRAPH_TEXT = "\n\n".join(PARAGRAPHS)


def text_tokens(encoder, text):
    tokens = encoder.tokenizer.encode_texts([text])[0]
    return tokens.ids, tokens.offsets


@pytest.fixture(scope="module")
def doc_text(long_text):
    """Real prose with unicode at the end, a few hundred tokens: fits the model without truncation."""
    return long_text[:2400] + " Grüße 🙂 日本語, fin."


@pytest.fixture(scope="module")
def doc_tokens(encoder, doc_text):
    ids, offsets = text_tokens(encoder, doc_text)
    assert 300 < len(ids) < 1000  # the fixture's premise: long enough to chunk, short enough to fit
    return ids, offsets


def check_spans_map_back(encoder, text, doc):
    """The invariants every ChunkedDocument must keep, whatever the splitter."""
    ids, offsets = text_tokens(encoder, text)
    n = len(ids) - doc.truncated_tokens
    assert len(doc.token_spans) == len(doc.char_spans) == len(doc.texts) == len(doc.vectors) >= 1
    for (a, b), (ca, cb), chunk in zip(doc.token_spans, doc.char_spans, doc.texts):
        assert 0 <= a < b <= n
        assert ca == offsets[a, 0], "a chunk's char span must start at its first token's start"
        assert cb == offsets[b - 1, 1], "a chunk's char span must end at its last token's end"
        assert text[ca:cb] == chunk
    assert doc.vectors.dtype == np.float32
    assert doc.vectors.shape == (len(doc.token_spans), encoder.vector_size)
    np.testing.assert_allclose(np.linalg.norm(doc.vectors, axis=1), 1.0, atol=1e-5)


def assert_covers_non_whitespace(text, doc, end=None):
    """Every non-whitespace character of text[:end] lies inside some chunk's char span."""
    end = len(text) if end is None else end
    covered = np.zeros(len(text), dtype=bool)
    for a, b in doc.char_spans:
        covered[a:b] = True
    missing = [i for i in range(end) if not covered[i] and not text[i].isspace()]
    assert not missing, f"characters in no chunk: {[(i, text[i]) for i in missing[:10]]}"


# -- the tokens splitter ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, chunk_overlap", [(64, 16), (32, 0), (7, 3), (1, 0), (50, 49)])
def test_token_windows_step_overlap_and_cover(encoder, doc_text, doc_tokens, chunk_size, chunk_overlap):
    """tokens splitter: windows of exactly chunk_size, stepping size - overlap and overlapping by exactly
    overlap, except the last: it ends at n, overlaps by at least overlap; every token 0..n-1 covered."""
    n = len(doc_tokens[0])
    assert n > chunk_size
    doc = encoder.encode_chunks(doc_text, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter="tokens")
    spans = doc.token_spans
    step = chunk_size - chunk_overlap
    assert len(spans) == 1 + -(-(n - chunk_size) // step)
    assert [a for a, _ in spans[:-1]] == list(range(0, step * (len(spans) - 1), step))
    assert all(b - a == chunk_size for a, b in spans)
    assert spans[-1] == (n - chunk_size, n)
    for (a0, b0), (a1, b1) in zip(spans[:-2], spans[1:-1]):
        assert b0 - a1 == chunk_overlap
    assert spans[-2][1] - spans[-1][0] >= chunk_overlap
    assert spans[-1][0] > spans[-2][0]  # no window inside another
    covered = np.zeros(n, dtype=bool)
    for a, b in spans:
        covered[a:b] = True
    assert covered.all()
    assert doc.truncated_tokens == 0
    check_spans_map_back(encoder, doc_text, doc)


def test_token_windows_short_text_is_one_chunk(encoder):
    """A text shorter than chunk_size gives one chunk spanning all of it."""
    text = "A short sentence, well under the chunk size."
    ids, _ = text_tokens(encoder, text)
    doc = encoder.encode_chunks(text, chunk_size=256, chunk_overlap=64, splitter="tokens")
    assert doc.token_spans == [(0, len(ids))]
    assert doc.texts == [text]
    assert doc.char_spans == [(0, len(text))]


@pytest.mark.parametrize("prompt", [None, "passage"])
def test_single_chunk_vector_is_mean_mode_vector(encoder, prompt):
    """One chunk over the whole text is the same vector as encode(mode="mean"): both pool the text's
    tokens (after the prompt, never the prompt itself)."""
    text = "Late chunking pools the tokens of each chunk after one pass over the whole text."
    doc = encoder.encode_chunks(text, chunk_size=512, chunk_overlap=0, prompt=prompt)
    assert len(doc.token_spans) == 1
    np.testing.assert_allclose(doc.vectors[0], encoder.encode(text, mode="mean", prompt=prompt), atol=1e-5)


@pytest.mark.parametrize("splitter", ["tokens", "words", "recursive"])
def test_chunk_vectors_match_backend_on_hand_built_row(encoder, splitter):
    """Each chunk vector is the normalised backend span mean of its tokens in [CLS] prompt text [SEP],
    so spans are shifted past [CLS] and the prompt."""
    text = UNICODE_TEXT[:200]
    config = encoder.config
    ids, _ = text_tokens(encoder, text)
    prompt = encoder.tokenizer.prompt_ids("query")
    doc = encoder.encode_chunks(text, chunk_size=12, chunk_overlap=3, splitter=splitter, prompt="query")
    row = np.concatenate([[config.cls_token_id], prompt, ids, [config.sep_token_id]]).astype(np.int64)
    bounds = np.asarray(doc.token_spans, dtype=np.int64)[None] + 1 + len(prompt)
    _, spans = encoder.backend.forward(row[None], np.ones((1, len(row)), np.int64), bounds)
    expected = spans[0] / np.linalg.norm(spans[0], axis=1, keepdims=True)
    np.testing.assert_allclose(doc.vectors, expected, atol=1e-5)


# -- the words splitter ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, chunk_overlap", [(64, 16), (32, 0), (16, 8), (200, 100)])
def test_words_spans_end_at_word_boundaries_and_cover(encoder, doc_text, doc_tokens, chunk_size, chunk_overlap):
    """words splitter: spans of at most chunk_size tokens that start and end at word starts (whitespace
    before the token), in order, overlapping by at most chunk_overlap, covering every token."""
    ids, offsets = doc_tokens
    n = len(ids)
    doc = encoder.encode_chunks(doc_text, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter="words")
    check_spans_map_back(encoder, doc_text, doc)
    starts = set(word_starts(doc_text, offsets).tolist()) | {n}
    spans = np.asarray(doc.token_spans)
    assert spans[0, 0] == 0 and spans[-1, 1] == n
    assert ((spans[:, 1] - spans[:, 0]) <= chunk_size).all()
    # Ends fall on word starts, except where one word (a long run without spaces) is cut at chunk_size;
    # a window then starts where the cut one ended.
    for i, (a, b) in enumerate(spans):
        assert b in starts or b - a == chunk_size, (a, b)
        assert a in starts or a == spans[i - 1][1], (a, b)
    assert sum(b in starts for _, b in spans) >= 0.8 * len(spans)
    assert (np.diff(spans[:, 0]) > 0).all()
    assert (spans[1:, 0] <= spans[:-1, 1]).all(), "a gap between chunks would drop tokens"
    assert ((spans[:-1, 1] - spans[1:, 0]) <= chunk_overlap).all()
    if chunk_overlap:
        assert ((spans[:-1, 1] - spans[1:, 0]) > 0).any()


@pytest.mark.parametrize("starts, n, size, overlap, expected", [
    ([0, 3, 5, 9], 12, 6, 0, [(0, 5), (5, 9), (9, 12)]),
    ([0, 3, 5, 9], 12, 6, 4, [(0, 5), (3, 9), (9, 12)]),  # (5, 9) would sit inside (3, 9)
    ([0, 2, 4, 6, 8], 10, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10)]),
    ([0, 10], 12, 4, 0, [(0, 4), (4, 8), (8, 12)]),  # a word longer than the size is cut
    ([0, 10], 14, 4, 0, [(0, 4), (4, 8), (8, 10), (10, 14)]),
    ([0], 3, 8, 2, [(0, 3)]),
    ([], 0, 8, 2, []),
])
def test_word_windows_unit(starts, n, size, overlap, expected):
    got = word_windows(np.asarray(starts, dtype=np.int64), n, size, overlap)
    assert [tuple(map(int, s)) for s in got] == expected


def test_word_starts_unit():
    text = "one two,three  four"
    offsets = np.array([[0, 3], [4, 7], [7, 8], [8, 13], [15, 19]])
    assert word_starts(text, offsets).tolist() == [0, 1, 4]


# -- the recursive splitter ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, chunk_overlap", [(64, 16), (32, 0), (16, 4), (200, 50)])
def test_recursive_spans_sizes_order_and_coverage(encoder, doc_text, doc_tokens, chunk_size, chunk_overlap):
    """recursive splitter: spans of 1..chunk_size tokens within 0..n, in order, slicing the text to the
    chunk texts, and together covering every non-whitespace character."""
    n = len(doc_tokens[0])
    doc = encoder.encode_chunks(doc_text, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter="recursive")
    spans = doc.token_spans
    assert len(spans) >= 2
    assert all(1 <= b - a <= chunk_size for a, b in spans)
    assert all(0 <= a < b <= n for a, b in spans)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 <= a1 and b0 <= b1, "chunks must come in text order"
    check_spans_map_back(encoder, doc_text, doc)
    assert_covers_non_whitespace(doc_text, doc)


def test_recursive_chunks_are_whole_paragraphs(encoder):
    """recursive splitter: with paragraphs that fit in chunk_size, each chunk is whole paragraphs."""
    counts = [len(text_tokens(encoder, p)[0]) for p in PARAGRAPHS]
    chunk_size = 64
    assert max(counts) + 2 < chunk_size  # premise: every paragraph fits
    doc = encoder.encode_chunks(PARAGRAPH_TEXT, chunk_size=chunk_size, chunk_overlap=0, splitter="recursive")
    count = len(PARAGRAPHS)
    joined = {"\n\n".join(PARAGRAPHS[i:j]) for i in range(count) for j in range(i + 1, count + 1)}
    for chunk in doc.texts:
        assert chunk.strip() in joined, f"chunk {chunk!r} cuts through a paragraph"
    check_spans_map_back(encoder, PARAGRAPH_TEXT, doc)
    assert_covers_non_whitespace(PARAGRAPH_TEXT, doc)


def test_recursive_no_chunk_spans_a_paragraph_break(encoder):
    """recursive splitter: when every paragraph fits but no two fit together, no chunk holds "\\n\\n"."""
    counts = [len(text_tokens(encoder, p)[0]) for p in PARAGRAPHS]
    chunk_size = max(counts) + 4
    assert all(a + b > chunk_size for a, b in zip(counts, counts[1:]))  # premise: pairs do not fit
    doc = encoder.encode_chunks(PARAGRAPH_TEXT, chunk_size=chunk_size, chunk_overlap=0, splitter="recursive")
    assert len(doc.texts) == len(PARAGRAPHS)
    assert not [t for t in doc.texts if "\n\n" in t]
    assert [t.strip() for t in doc.texts] == PARAGRAPHS


def test_recursive_overlong_chunk_loses_no_text(encoder):
    """recursive splitter: a chunk longer in context than chunk_size is split, never cut short."""
    # Alone, "arithmetic operations" is 5 tokens; inside the text, " arithmetic operations" is 6.
    text = "as arithmetic operations"
    doc = encoder.encode_chunks(text, chunk_size=5, chunk_overlap=0, splitter="recursive")
    assert all(b - a <= 5 for a, b in doc.token_spans)
    assert_covers_non_whitespace(text, doc)


def test_recursive_with_nothing_to_split_gives_token_windows(encoder):
    """recursive splitter: when the tokens passed are whitespace only (the library trims whitespace and
    finds no chunk), the spans are the ``tokens`` windows with the same chunk_overlap. encode_chunks never
    meets this (it refuses whitespace-only texts and passes every token); training samples can."""
    from runtimes.chunking import chunk_spans

    text = "\n" * 200 + "word"
    ids, offsets = text_tokens(encoder, text)
    blank = offsets[: int(np.searchsorted(offsets[:, 1], 200, side="right"))]
    assert len(blank) > 8 and not text[: int(blank[-1, 1])].strip()  # premise: whitespace tokens only
    recursive = chunk_spans(text, blank, 8, 3, "recursive", encoder._recursive)
    np.testing.assert_array_equal(recursive, token_windows(len(blank), 8, 3))
    assert recursive[1, 0] == 8 - 3


# -- both splitters --------------------------------------------------------------------------------


@pytest.mark.parametrize("splitter", ["tokens", "words", "recursive"])
def test_unicode_text_maps_back(encoder, splitter):
    """Multi-byte characters (umlauts, emoji, CJK) split across byte-level tokens still map back."""
    doc = encoder.encode_chunks(UNICODE_TEXT, chunk_size=16, chunk_overlap=4, splitter=splitter)
    assert len(doc.texts) > 3
    check_spans_map_back(encoder, UNICODE_TEXT, doc)
    assert_covers_non_whitespace(UNICODE_TEXT, doc)
    assert "🙂" in doc.texts[0] and "🙂" in doc.texts[-1]


@pytest.mark.parametrize("splitter", ["tokens", "words", "recursive"])
def test_prompt_keeps_spans_changes_vectors(encoder, doc_text, splitter):
    """A prompt shifts the text in the row but not the spans (they index the text's own tokens);
    it does change the vectors (the tokens attend to it)."""
    kwargs = dict(chunk_size=48, chunk_overlap=8, splitter=splitter)
    plain = encoder.encode_chunks(doc_text, **kwargs)
    with_prompt = encoder.encode_chunks(doc_text, prompt="passage", **kwargs)
    assert with_prompt.token_spans == plain.token_spans
    assert with_prompt.char_spans == plain.char_spans
    assert with_prompt.texts == plain.texts
    check_spans_map_back(encoder, doc_text, with_prompt)
    assert not np.allclose(with_prompt.vectors, plain.vectors, atol=1e-4)


@pytest.mark.parametrize("splitter", ["tokens", "words", "recursive"])
def test_normalize_false_gives_raw_vectors(encoder, doc_text, splitter):
    """normalize=False returns the same directions, not unit length."""
    kwargs = dict(chunk_size=48, chunk_overlap=8, splitter=splitter)
    unit = encoder.encode_chunks(doc_text, **kwargs).vectors
    raw = encoder.encode_chunks(doc_text, normalize=False, **kwargs).vectors
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)


def test_batch_matches_single_documents(encoder, doc_text):
    """A list of texts gives one ChunkedDocument each, in order, equal to encoding each alone."""
    texts = [doc_text, UNICODE_TEXT, "Just one short chunk."]
    docs = encoder.encode_chunks(texts, chunk_size=40, chunk_overlap=10)
    assert isinstance(docs, list) and len(docs) == 3
    for text, doc in zip(texts, docs):
        alone = encoder.encode_chunks(text, chunk_size=40, chunk_overlap=10)
        assert doc.token_spans == alone.token_spans
        assert doc.texts == alone.texts
        np.testing.assert_allclose(doc.vectors, alone.vectors, atol=1e-5)


# -- argument errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(chunk_size=16, chunk_overlap=16), ValueError, r"chunk_overlap .*chunk_size"),
        (dict(chunk_size=16, chunk_overlap=20), ValueError, r"chunk_overlap .*chunk_size"),
        (dict(chunk_size=0, chunk_overlap=0), ValueError, r"chunk_size must be >= 1"),
        (dict(chunk_size=-4, chunk_overlap=0), ValueError, r"chunk_size must be >= 1"),
        (dict(chunk_size=16, chunk_overlap=-1), ValueError, r"chunk_overlap must be >= 0"),
        (dict(chunk_size=16, chunk_overlap=None), TypeError, r"chunk_overlap must be an integer"),
        (dict(chunk_size=16.0, chunk_overlap=4), TypeError, r"chunk_size must be an integer"),
        (dict(chunk_size="16", chunk_overlap=4), TypeError, r"chunk_size must be an integer"),
        (dict(chunk_size=True, chunk_overlap=0), TypeError, r"chunk_size must be an integer"),
        (dict(chunk_size=16, chunk_overlap=4.5), TypeError, r"chunk_overlap must be an integer"),
        (dict(chunk_size=16, chunk_overlap=4, splitter="sentences"), ValueError, r"splitter must be one of"),
        (dict(chunk_size=16, chunk_overlap=4, splitter=None), ValueError, r"splitter must be one of"),
    ],
)
def test_bad_chunk_arguments_raise(encoder, kwargs, error, match):
    """Bad chunk arguments raise with a message naming the argument."""
    with pytest.raises(error, match=match):
        encoder.encode_chunks("Some text to chunk.", **kwargs)


def test_numpy_integer_chunk_size_is_accepted(encoder):
    """chunk_size from numpy (e.g. a config array) is an integer too."""
    doc = encoder.encode_chunks(UNICODE_TEXT, chunk_size=np.int64(16), chunk_overlap=np.int32(4))
    assert all(b - a <= 16 for a, b in doc.token_spans)
    assert doc.token_spans[1][0] == 12


# -- texts over the row in chunk mode: windows, never truncation --------------------------------------


@pytest.mark.parametrize("splitter", ["tokens", "words", "recursive"])
def test_chunks_over_the_row_are_those_of_the_whole_text(encoder, doc_text, doc_tokens, splitter):
    """With a max_length far below the text, no token is cut and no warning is given: the text runs in
    windows, and its chunks are exactly the chunks of the whole text."""
    n = len(doc_tokens[0])
    kwargs = dict(chunk_size=16, chunk_overlap=4, splitter=splitter)
    whole = encoder.encode_chunks(doc_text, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doc = encoder.encode_chunks(doc_text, max_length=102, **kwargs)  # [CLS] + 100 text tokens + [SEP]
    assert doc.truncated_tokens == 0 and whole.windows == 1 and doc.windows > 1
    assert (doc.token_spans, doc.char_spans, doc.texts) == (whole.token_spans, whole.char_spans, whole.texts)
    check_spans_map_back(encoder, doc_text, doc)
    assert_covers_non_whitespace(doc_text, doc)
    if splitter == "tokens":
        assert doc.token_spans[-1][1] == n


def test_window_capacity_accounts_for_prompt(encoder, doc_text, doc_tokens):
    """With a prompt, a window holds [CLS], the prompt, max_length - 2 - prompt text tokens and [SEP]."""
    from runtimes.windows import default_window_overlap, plan_windows

    n = len(doc_tokens[0])
    prompt_len = len(encoder.tokenizer.prompt_ids("query"))
    capacity = 80 - 2 - prompt_len
    doc = encoder.encode_chunks(doc_text, chunk_size=16, chunk_overlap=0, prompt="query", max_length=80)
    assert doc.windows == plan_windows(n, capacity, default_window_overlap(capacity)).n_windows > 1
    assert doc.token_spans[-1][1] == n


def test_truncate_has_no_effect_in_chunk_mode(encoder, doc_text):
    """encode_chunks never raises or cuts for a long text: truncate=False gives the same windows."""
    kwargs = dict(chunk_size=16, chunk_overlap=4, max_length=100)
    windowed = encoder.encode_chunks(doc_text, truncate=False, **kwargs)
    default = encoder.encode_chunks(doc_text, **kwargs)
    assert windowed.token_spans == default.token_spans and windowed.windows == default.windows > 1
    np.testing.assert_array_equal(windowed.vectors, default.vectors)


# -- the pure functions of runtimes.chunking --------------------------------------------------------


@pytest.mark.parametrize(
    "n, size, overlap, expected",
    [
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (11, 4, 1, [(0, 4), (3, 7), (6, 10), (7, 11)]),
        (8, 4, 0, [(0, 4), (4, 8)]),
        (9, 4, 0, [(0, 4), (4, 8), (5, 9)]),
        (3, 8, 2, [(0, 3)]),
        (8, 8, 2, [(0, 8)]),
        (9, 8, 2, [(0, 8), (1, 9)]),
        (1, 1, 0, [(0, 1)]),
        (3, 1, 0, [(0, 1), (1, 2), (2, 3)]),
        (5, 3, 2, [(0, 3), (1, 4), (2, 5)]),
        (270, 256, 64, [(0, 256), (14, 270)]),
        (600, 256, 64, [(0, 256), (192, 448), (344, 600)]),
    ],
)
def test_token_windows_unit(n, size, overlap, expected):
    """token_windows: exact windows, int64 [k, 2]; the last one ends at n and is a full window whenever
    n > size (a short tail would be a mean over a few tokens)."""
    spans = token_windows(n, size, overlap)
    assert spans.dtype == np.int64 and spans.shape == (len(expected), 2)
    assert [tuple(s) for s in spans.tolist()] == expected


# Tokens of "ab cd  ef": "ab" (0, 2), " cd" (2, 5), " " (5, 6), " ef" (6, 9) -- byte-level style,
# each token carrying its leading space.
OFFSETS = np.array([[0, 2], [2, 5], [5, 6], [6, 9]], dtype=np.int64)


@pytest.mark.parametrize(
    "ranges, chunk_size, expected",
    [
        ([(0, 2)], 8, [(0, 1)]),
        ([(3, 5)], 8, [(1, 2)]),  # starts inside " cd": that token belongs to the range
        ([(0, 5), (7, 9)], 8, [(0, 2), (3, 4)]),
        ([(1, 8)], 8, [(0, 4)]),  # partial tokens at both ends are included
        ([(0, 9)], 2, [(0, 2), (2, 4)]),  # too long in context: split into chunk_size windows
        ([(3, 9)], 1, [(1, 2), (2, 3), (3, 4)]),
        ([(9, 9)], 8, []),  # an empty range at the end overlaps no token
        ([], 8, []),
    ],
)
def test_spans_from_char_ranges_unit(ranges, chunk_size, expected):
    """spans_from_char_ranges: tokens overlapping each range, split into chunk_size windows, int64 [k, 2]."""
    spans = spans_from_char_ranges(OFFSETS, ranges, chunk_size)
    assert spans.dtype == np.int64 and spans.shape == (len(expected), 2)
    assert [tuple(s) for s in spans.tolist()] == expected


def test_spans_from_char_ranges_gap_between_tokens():
    """A range that falls in a gap between tokens (no token overlaps it) gives no span."""
    offsets = np.array([[0, 2], [4, 6]], dtype=np.int64)
    assert spans_from_char_ranges(offsets, [(2, 4)], 8).shape == (0, 2)
    assert spans_from_char_ranges(offsets, [(2, 5)], 8).tolist() == [[1, 2]]


def test_char_spans_unit():
    """char_spans: from the first token's start to the last token's end; empty input -> (0, 2)."""
    spans = np.array([[0, 2], [1, 4], [3, 4]], dtype=np.int64)
    assert char_spans(OFFSETS, spans).tolist() == [[0, 5], [2, 9], [6, 9]]
    empty = char_spans(OFFSETS, np.zeros((0, 2), dtype=np.int64))
    assert empty.shape == (0, 2) and empty.dtype == np.int64


def test_char_spans_with_real_offsets(encoder):
    """char_spans on real tokenizer offsets: ASCII windows tile the text exactly; with multi-byte
    characters split across tokens, the windows still cover every character."""
    cases = (("Plain words, and punctuation: (a, b).", True), ("Grüße 🙂 日本語. Plain too.", False))
    for text, exact in cases:
        _, offsets = text_tokens(encoder, text)
        windows = np.array([(i, min(i + 3, len(offsets))) for i in range(0, len(offsets), 3)], dtype=np.int64)
        spans = char_spans(offsets, windows)
        assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
        if exact:
            assert "".join(text[a:b] for a, b in spans) == text
        else:
            covered = np.zeros(len(text), dtype=bool)
            for a, b in spans:
                covered[a:b] = True
            assert covered.all()
