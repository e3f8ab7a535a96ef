"""Property-based tests of ``encode`` and ``encode_chunks`` (hypothesis) on the tiny test checkpoint.

Inputs are drawn from all of unicode (control characters, NUL, combining marks, right-to-left text and
marks, emoji with joiners, lone surrogates, the model's own special-token strings) with lengths from
empty to several times ``max_length``, and from random chunk parameters, valid or not. For each draw an
oracle written from the documented contract says which error must come (ValueError for an empty text,
a surrogate, a text that does not fit with ``truncate=False``, or bad chunk arguments; TypeError for
wrong types) or that the call must succeed; a success must hold every documented invariant, and a text
encoded alone must equal the same text encoded inside the batch.

Examples are derandomized (the same ones on every run) and nothing is stored on disk. Each property
checks several things per model call, and ``max_length`` stays small, to keep the file fast.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import FP32_ATOL
from runtimes import TruncationWarning
from runtimes.chunking import SPLITTERS
from runtimes.config import SINGLE_VECTOR_TYPES
from runtimes.tokenization import SPECIAL_TOKENS_PER_ROW

# Examples per property. The model properties draw twice as many: by design most of their draws are
# refused (bad texts, bad chunk arguments, no room, too long), and about 380 of 1000 reach the model.
EXAMPLES = 500
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: CI failures reproduce
    database=None,  # nothing written into the source tree
    suppress_health_check=[HealthCheck.too_slow],
)
MODEL_PROPERTY = settings(PROPERTY, max_examples=2 * EXAMPLES)
# Rows stay short (cheap forwards of the 3-layer, 32-wide test model), while drawn texts run to
# a few hundred tokens, so truncation and its refusal are both exercised.
MAX_LENGTHS = st.integers(min_value=3, max_value=48)
# Unit norm of a normalised float32 vector, up to rounding.
NORM_ATOL = 1e-5

SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")
# Pieces that stress tokenizers and offsets; joined at random into texts.
PIECES = (
    "", "\x00", "\t", "\n", "\n\n", "\r\n", "\x07", "\x1b[0m", "\x7f", "\u0085",
    "\u0301", "e\u0301", "a\u0338\u0301\u0308", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",
    "\u200f", "\u202e", "\u2066", "\u200d", "\u200b", "\ufeff", "\u00a0", "\u3000", "\u2028",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f642", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\u65e5\u672c\u8a9e", "Gr\u00fc\u00dfe", "\ufb01", "\U0001d400", " ", "   ", "word", "The quick brown fox.",
    ". ", "[CLS]", "[SEP]", "<|START_INSTRUCTION|>", "<|END_INSTRUCTION|>", "x" * 40,
)
# Any code point but surrogates, which come from SURROGATE below: drawn at the rate of other
# characters, they would make most batches invalid and leave few to reach the model.
TEXT = st.one_of(
    st.text(min_size=1, max_size=60),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join),
)
# About one example in six gets a surrogate put into one of its texts.
SURROGATE = st.sampled_from((None,) * 5 * len(SURROGATES) + SURROGATES)


@st.composite
def batches(draw) -> list[str]:
    """1 to 3 texts; sometimes a surrogate inserted into one of them at a drawn position."""
    texts = draw(st.lists(TEXT, min_size=1, max_size=3))
    surrogate = draw(SURROGATE)
    if surrogate is not None:
        k = draw(st.integers(0, len(texts) - 1))
        at = draw(st.integers(0, len(texts[k])))
        texts[k] = texts[k][:at] + surrogate + texts[k][at:]
    return texts


BATCH = batches()

MAX_CHUNK_SIZE = 24
# Chunk arguments: half the draws valid by construction, half anything (mostly refused), so that both
# the refusals and the chunking itself get hundreds of examples.
VALID_CHUNK_ARGS = st.integers(1, MAX_CHUNK_SIZE).flatmap(
    lambda size: st.tuples(st.just(size), st.integers(0, size - 1), st.sampled_from(SPLITTERS)))
ANY_CHUNK_ARGS = st.tuples(
    st.integers(-1, MAX_CHUNK_SIZE), st.integers(-1, MAX_CHUNK_SIZE), st.sampled_from(SPLITTERS + ("sentences",)))
CHUNK_ARGS = st.one_of(VALID_CHUNK_ARGS, ANY_CHUNK_ARGS)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's forwards on one torch thread. The tiny model's forward is little arithmetic,
    and on 2 cores shared with other jobs two threads spent 133 ms per call synchronising (3 ms on one)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the oracle: the documented contract, computed independently of the Encoder ---------------------------


def token_count(encoder, text: str) -> int:
    return len(encoder.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)


def prompt_tokens(encoder, prompt: str | None) -> int:
    if prompt is None:
        return 0
    return token_count(encoder, encoder.config.prompts.get(prompt, prompt))


def text_budget(encoder, max_length: int, prompt: str | None) -> int:
    return max_length - SPECIAL_TOKENS_PER_ROW - prompt_tokens(encoder, prompt)


# An expected error is (type, message regex, label for hypothesis' statistics); None: must succeed.


def text_error(texts: list[str]):
    """The error of the first text that must be refused, or None."""
    for i, text in enumerate(texts):
        if not text.strip():
            return ValueError, rf"^texts\[{i}\] is empty or only whitespace", "empty text"
        position = next((k for k, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
        if position is not None:
            character = re.escape(repr(text[position]))
            return ValueError, rf"^texts\[{i}\] has a lone surrogate {character} at character {position},", "surrogate"
    return None


def chunk_error(chunk_size: int, chunk_overlap: int, splitter: str):
    if splitter not in SPLITTERS:
        return ValueError, r"^splitter must be one of", "splitter"
    if chunk_size < 1:
        return ValueError, r"^chunk_size must be >= 1", "chunk_size"
    if chunk_overlap < 0:
        return ValueError, r"^chunk_overlap must be >= 0", "chunk_overlap"
    if chunk_overlap >= chunk_size:
        return ValueError, rf"^chunk_overlap \({chunk_overlap}\) must be smaller than chunk_size", "chunk_overlap"
    return None


def length_error(encoder, texts, max_length, prompt, truncate, windowed=False):
    """(error, token counts): the no-room and no-truncation errors, which come after the text checks.
    ``windowed``: a text over the row runs in windows instead (encode_chunks; encode's ``mean`` with
    truncate=False), so only the no-room error remains."""
    budget = text_budget(encoder, max_length, prompt)
    if budget < 1:
        return (ValueError, rf"^max_length={max_length} leaves no room for text", "no room"), None
    counts = [token_count(encoder, t) for t in texts]
    cut = [i for i, n in enumerate(counts) if n > budget]
    if cut and not truncate and not windowed:
        i = cut[0]
        return (ValueError, rf"^texts\[{i}\] has {counts[i]} tokens but only {budget} fit", "too long"), None
    return None, counts


def outcome(call, expected_error):
    """Run ``call``; check it raised exactly ``expected_error`` or, if None, nothing.
    Returns (result, whether a TruncationWarning was issued)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if expected_error is None:
            result = call()
        else:
            error, match, label = expected_error
            with pytest.raises(error, match=match):
                call()
            event(f"refused: {label}")
            return None, False
    truncated = any(issubclass(w.category, TruncationWarning) for w in caught)
    return result, truncated


def assert_unit_rows(vectors: np.ndarray, width: int) -> None:
    assert vectors.dtype == np.float32 and vectors.shape[-1] == width
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=NORM_ATOL)


# -- properties -----------------------------------------------------------------------------------------


@MODEL_PROPERTY
@given(
    texts=BATCH,
    single=st.booleans(),
    max_length=MAX_LENGTHS,
    truncate=st.booleans(),
    mode=st.sampled_from(SINGLE_VECTOR_TYPES),
    prompt=st.sampled_from([None, "query", "Represent: "]),
    probe=st.integers(min_value=0, max_value=2),
)
def test_encode_contract(encoder, texts, single, max_length, truncate, mode, prompt, probe):
    """encode: exactly the documented errors; otherwise unit-norm finite float32 rows in input order,
    a TruncationWarning exactly when a text was cut (truncate=True), texts over the row in windows for
    mode ``mean`` with truncate=False, and each text equal to itself encoded alone."""
    single = single and len(texts) == 1
    kwargs = dict(max_length=max_length, truncate=truncate, mode=mode, prompt=prompt)
    expected, counts = text_error(texts), None
    if expected is None:
        expected, counts = length_error(encoder, texts, max_length, prompt, truncate,
                                        windowed=not truncate and mode == "mean")
    out, warned = outcome(lambda: encoder.encode(texts[0] if single else texts, **kwargs), expected)
    if expected is not None:
        return
    over = any(n > text_budget(encoder, max_length, prompt) for n in counts)
    event("encoded, some cut" if warned else "encoded, some windowed" if over else "encoded")
    assert warned == (truncate and over)
    rows = out[None] if single else out
    assert rows.shape == (len(texts), encoder.vector_size)
    assert_unit_rows(rows, encoder.vector_size)
    j = probe % len(texts)
    alone, _ = outcome(lambda: encoder.encode([texts[j]], **kwargs), None)
    np.testing.assert_allclose(alone[0], rows[j], atol=FP32_ATOL)


@MODEL_PROPERTY
@given(
    texts=BATCH,
    single=st.booleans(),
    chunk_args=CHUNK_ARGS,
    max_length=MAX_LENGTHS,
    truncate=st.booleans(),
    probe=st.integers(min_value=0, max_value=2),
)
def test_encode_chunks_contract(encoder, texts, single, chunk_args, max_length, truncate, probe):
    """encode_chunks: exactly the documented errors; otherwise, per text, token spans inside the kept
    tokens and at most chunk_size long (covering them without gaps for tokens/words), char spans inside
    the text with text[a:b] == texts[j], no text cut (texts over the row run in windows, whatever
    truncate says), unit-norm finite vectors, and each document equal to the text chunked alone."""
    single = single and len(texts) == 1
    chunk_size, chunk_overlap, splitter = chunk_args
    kwargs = dict(chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter, max_length=max_length,
                  truncate=truncate)
    expected, counts = chunk_error(chunk_size, chunk_overlap, splitter) or text_error(texts), None
    if expected is None:
        expected, counts = length_error(encoder, texts, max_length, None, truncate, windowed=True)
    out, warned = outcome(lambda: encoder.encode_chunks(texts[0] if single else texts, **kwargs), expected)
    if expected is not None:
        return
    budget = text_budget(encoder, max_length, None)
    event(f"chunked: {splitter}, some windowed" if any(n > budget for n in counts) else f"chunked: {splitter}")
    docs = [out] if single else out
    assert len(docs) == len(texts)
    assert not warned
    for text, n, doc in zip(texts, counts, docs):
        kept = n
        assert doc.truncated_tokens == 0
        assert (doc.windows > 1) == (n > budget)
        spans = np.asarray(doc.token_spans).reshape(-1, 2)
        assert len(spans) >= 1
        assert (spans[:, 0] >= 0).all() and (spans[:, 0] < spans[:, 1]).all() and (spans[:, 1] <= kept).all()
        assert (spans[:, 1] - spans[:, 0] <= chunk_size).all()
        assert (np.diff(spans[:, 0]) >= 0).all()
        if splitter in ("tokens", "words"):
            assert spans[0, 0] == 0 and spans[-1, 1] == kept
            assert (spans[1:, 0] <= spans[:-1, 1]).all() and (np.diff(spans[:, 0]) > 0).all()
        assert len(doc.char_spans) == len(spans) == len(doc.texts)
        for (a, b), chunk in zip(doc.char_spans, doc.texts):
            assert 0 <= a < b <= len(text)
            assert text[a:b] == chunk
        assert doc.vectors.shape == (len(spans), encoder.vector_size)
        assert_unit_rows(doc.vectors, encoder.vector_size)
    j = probe % len(texts)
    alone, _ = outcome(lambda: encoder.encode_chunks([texts[j]], **kwargs), None)
    assert (alone[0].token_spans, alone[0].char_spans, alone[0].texts) == (
        docs[j].token_spans, docs[j].char_spans, docs[j].texts)
    np.testing.assert_allclose(alone[0].vectors, docs[j].vectors, atol=FP32_ATOL)


NOT_A_SEQUENCE = st.one_of(
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
    st.sets(st.text(max_size=3), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.iterables(st.text(max_size=3), max_size=3),
    st.integers(), st.floats(), st.none(), st.binary(), st.booleans(),
)
NOT_STRINGS = st.lists(st.one_of(st.integers(), st.floats(), st.none(), st.binary(), st.lists(st.text())), min_size=1)
NOT_A_BOOL = st.one_of(st.text(), st.integers(), st.floats(), st.lists(st.booleans()), st.binary())


@PROPERTY
@given(
    entry=st.sampled_from(["encode", "encode_chunks"]),
    wrong=st.sampled_from(["texts", "items", "normalize", "truncate", "show_progress"]),
    texts=NOT_A_SEQUENCE,
    items=NOT_STRINGS,
    flag=NOT_A_BOOL,
)
def test_wrong_types_raise_type_error(encoder, entry, wrong, texts, items, flag):
    """A texts argument that is not a string or a sequence, items that are not strings, and switches
    that are not bools raise TypeError naming the argument, before any forward."""
    if wrong == "texts":
        args, kwargs, match = (texts,), {}, r"^texts must be a string or a sequence of strings"
    elif wrong == "items":
        args, kwargs, match = (items,), {}, r"^texts\[0\] is \w+, expected str"
    else:
        args, kwargs, match = (["fine"],), {wrong: flag}, rf"^{wrong} must be True(,| or) False"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(TypeError, match=match):
        patch.setattr(encoder.backend, "forward", lambda *a: pytest.fail("the backend ran"))
        getattr(encoder, entry)(*args, **kwargs)
