"""Bad input, truncation and broken model folders: clear errors that say what and where.

Covers ``Encoder.encode`` / ``Encoder.encode_chunks`` input checks, ``max_length`` / ``truncate``,
modes and prompts, and the ``runtimes.load`` errors for a folder that is missing, incomplete or
inconsistent.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
import pytest

import runtimes
from runtimes import ModelFileError, TruncationWarning

# fp32 results that must agree up to float rounding (conftest.FP32_ATOL).
FP32_ATOL = 1e-5

SENTENCE = "The quick brown fox jumps over the lazy dog."


ENTRY_POINTS = {
    "encode": lambda enc, texts, **kw: enc.encode(texts, **kw),
    "encode_chunks": lambda enc, texts, **kw: enc.encode_chunks(texts, chunk_size=16, chunk_overlap=4, **kw),
}


@pytest.fixture(params=sorted(ENTRY_POINTS))
def entry(request, encoder):
    """One of encode / encode_chunks, bound to the session encoder."""
    fn = ENTRY_POINTS[request.param]
    return lambda texts, **kw: fn(encoder, texts, **kw)


def text_ids(encoder, text):
    return encoder.tokenizer.encode_texts([text])[0].ids


# -- bad texts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, error, match",
    [
        (["fine", ""], ValueError, r"texts\[1\] is empty or only whitespace"),
        (["fine", "  \n"], ValueError, r"texts\[1\] is empty or only whitespace"),
        (["fine", "also fine", "\t"], ValueError, r"texts\[2\] is empty or only whitespace"),
        ("", ValueError, r"texts\[0\] is empty"),
        (" \n ", ValueError, r"texts\[0\] is empty"),
        (["fine", 7], TypeError, r"texts\[1\] is int, expected str"),
        (["fine", b"bytes"], TypeError, r"texts\[1\] is bytes, expected str"),
        (["fine", None], TypeError, r"texts\[1\] is NoneType, expected str"),
        ([None], TypeError, r"texts\[0\] is NoneType"),
        (None, TypeError, r"texts must be a string or a sequence of strings .*, got NoneType"),
        (42, TypeError, r"texts must be a string or a sequence of strings .*, got int"),
        (b"raw bytes", TypeError, r"texts must be a string or a sequence of strings .*, got bytes: decode"),
        (bytearray(b"raw"), TypeError, r"got bytearray"),
        (["fine", "abc\ud800"], ValueError, r"texts\[1\] has a lone surrogate '\\ud800' at character 3"),
        ("\udfffx", ValueError, r"texts\[0\] has a lone surrogate '\\udfff' at character 0"),
    ],
)
def test_bad_texts_raise_naming_the_index(entry, texts, error, match):
    """Empty, whitespace-only, non-string and None inputs raise, naming the bad item's index."""
    with pytest.raises(error, match=match):
        entry(texts)


def test_bad_text_is_reported_before_any_forward(encoder, monkeypatch):
    """A bad item anywhere in the list fails fast: the backend never runs."""
    calls = []
    monkeypatch.setattr(encoder.backend, "forward", lambda *a: calls.append(a))
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        encoder.encode([SENTENCE, SENTENCE, None])
    assert calls == []


def test_empty_list_encode(encoder):
    """encode([]) is an empty float32 [0, D] array, not an error."""
    out = encoder.encode([])
    assert isinstance(out, np.ndarray)
    assert out.shape == (0, encoder.vector_size)
    assert out.dtype == np.float32


def test_empty_list_encode_chunks(encoder):
    """encode_chunks([]) is an empty list."""
    assert encoder.encode_chunks([]) == []


def test_single_string_is_row_zero(encoder):
    """A single string gives a [D] vector equal to row 0 of encoding [that string]."""
    single = encoder.encode(SENTENCE)
    batch = encoder.encode([SENTENCE])
    assert single.shape == (encoder.vector_size,)
    assert batch.shape == (1, encoder.vector_size)
    assert single.dtype == np.float32
    np.testing.assert_array_equal(single, batch[0])


def test_single_string_chunks_is_one_document(encoder):
    """encode_chunks(str) returns one ChunkedDocument, equal to element 0 of encode_chunks([str])."""
    single = encoder.encode_chunks(SENTENCE, chunk_size=4, chunk_overlap=1)
    batch = encoder.encode_chunks([SENTENCE], chunk_size=4, chunk_overlap=1)
    assert isinstance(single, runtimes.ChunkedDocument)
    assert isinstance(batch, list) and len(batch) == 1
    assert single.token_spans == batch[0].token_spans
    np.testing.assert_array_equal(single.vectors, batch[0].vectors)


class _Texts(Sequence):
    """A user-defined sequence: any collections.abc.Sequence of strings is accepted."""

    def __init__(self, items):
        self._items = list(items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]


def test_sequence_inputs_keep_the_order(encoder):
    """Tuples, other Sequences and 1-d numpy string arrays work like a list, in input order."""
    texts = [SENTENCE, "Another, different sentence.", "Third."]
    reference = encoder.encode(texts)
    for same in (tuple(texts), _Texts(texts), np.array(texts), np.array(texts, dtype=object)):
        np.testing.assert_allclose(encoder.encode(same), reference, atol=FP32_ATOL)
        assert [d.texts for d in encoder.encode_chunks(same)] == [[t] for t in texts]
    assert not np.allclose(reference[0], reference[1], atol=1e-3)


@pytest.mark.parametrize(
    "texts, match",
    [
        ({"a": "b"}, r"got dict: a mapping would embed its keys"),
        ({"b", "a"}, r"got set: a set has no order"),
        (frozenset({"a"}), r"got frozenset: a set has no order"),
        ({"a": "b"}.keys(), r"got dict_keys: a set has no order"),
        ({"a": "b"}.values(), r"got dict_values: pass list\(texts\)"),
        ((t for t in ["a"]), r"got generator: pass list\(texts\)"),
        (iter(["a"]), r"got list_iterator: pass list\(texts\)"),
        (np.array([["a"]]), r"a 1-d array of strings, got a 2-d array"),
        (np.array("a"), r"a 1-d array of strings, got a 0-d array"),
    ],
)
def test_unordered_or_one_shot_texts_are_refused(entry, texts, match):
    """A dict (would embed its keys), a set (arbitrary order) or an iterator (one pass, no length)
    raises TypeError naming texts, instead of embedding the wrong strings or in an unknown order."""
    with pytest.raises(TypeError, match=rf"^texts must be .*{match}"):
        entry(texts)


@pytest.mark.parametrize("flag", ["normalize", "truncate", "show_progress"])
@pytest.mark.parametrize("value", ["no", 0, 1, 1.0, [], "False"])
def test_flags_must_be_bools(entry, flag, value):
    """normalize, truncate and show_progress take True or False (show_progress also None): a truthy
    string such as truncate="no" must not be taken as True."""
    with pytest.raises(TypeError, match=rf"^{flag} must be True(,| or) False"):
        entry(SENTENCE, **{flag: value})


# Each option's sentence-transformers keyword, and this library's older spelling of it.
SPELLINGS = [("normalize_embeddings", "normalize"), ("show_progress_bar", "show_progress"), ("prompt_name", "prompt")]


@pytest.mark.parametrize("name, alias", SPELLINGS)
def test_both_spellings_of_one_option_raise(entry, name, alias):
    """normalize_embeddings / normalize, show_progress_bar / show_progress, prompt_name / prompt: giving
    both spellings raises TypeError, even when they agree, instead of one silently winning."""
    value = "query" if name == "prompt_name" else False
    with pytest.raises(TypeError, match=rf"^{name} and {alias} are two spellings of one option"):
        entry(SENTENCE, **{name: value, alias: value})


@pytest.mark.parametrize("flag", ["normalize_embeddings", "show_progress_bar"])
def test_flag_errors_name_the_spelling_used(entry, flag):
    """A flag that is not a bool is refused under the name the caller wrote."""
    with pytest.raises(TypeError, match=rf"^{flag} must be True(,| or) False"):
        entry(SENTENCE, **{flag: "no"})


def test_sentence_transformers_spellings_equal_the_aliases(encoder):
    """normalize_embeddings, show_progress_bar and prompt_name do what normalize, show_progress and a
    prompt name do; normalize not given means True."""
    np.testing.assert_array_equal(
        encoder.encode(SENTENCE, normalize_embeddings=False, show_progress_bar=False, prompt_name="query"),
        encoder.encode(SENTENCE, normalize=False, show_progress=False, prompt="query"),
    )
    np.testing.assert_array_equal(encoder.encode(SENTENCE, normalize_embeddings=True), encoder.encode(SENTENCE))
    chunks = encoder.encode_chunks(SENTENCE, chunk_size=4, chunk_overlap=1, normalize_embeddings=False,
                                   prompt_name="passage")
    alias = encoder.encode_chunks(SENTENCE, chunk_size=4, chunk_overlap=1, normalize=False, prompt="passage")
    np.testing.assert_array_equal(chunks.vectors, alias.vectors)
    assert not np.allclose(np.linalg.norm(chunks.vectors, axis=1), 1.0)


def test_prompt_name_takes_only_names(entry):
    """prompt_name is a name from config.json: a literal prompt string there raises ValueError listing
    the model's prompts (prompt= still takes it as text), and a non-string raises TypeError."""
    listing = r"\(it has: \['passage', 'query'\]\)"
    with pytest.raises(ValueError, match=rf"defines no prompt named 'Represent this: ' {listing}"):
        entry(SENTENCE, prompt_name="Represent this: ")
    with pytest.raises(TypeError, match=r"^prompt_name must be a prompt name or None, got int"):
        entry(SENTENCE, prompt_name=3)


def test_numpy_bool_flags_are_bools(encoder):
    """numpy's bool counts as a bool, like numpy integers count as integers."""
    np.testing.assert_array_equal(
        encoder.encode(SENTENCE, normalize=np.bool_(False), truncate=np.bool_(True), show_progress=np.False_),
        encoder.encode(SENTENCE, normalize=False, truncate=True, show_progress=False),
    )


def test_literal_prompt_with_a_surrogate_is_named(encoder):
    """A literal prompt holding a surrogate raises ValueError naming the prompt and the position."""
    with pytest.raises(ValueError, match=r"prompt has a lone surrogate '\\ud83d' at character 2"):
        encoder.encode(SENTENCE, prompt="ab\ud83d: ")


# -- over-long input and max_length ------------------------------------------------------------------


def test_truncate_false_raises_naming_index_and_lengths(encoder):
    """truncate=False with a too-long text raises ValueError naming the text, its length and the budget."""
    long = SENTENCE * 4
    n = len(text_ids(encoder, long))
    with pytest.raises(ValueError, match=rf"texts\[1\] has {n} tokens but only 18 fit in max_length=20"):
        encoder.encode(["short.", long], max_length=20, truncate=False)


def test_truncate_false_allows_texts_that_fit(encoder):
    """truncate=False does not raise or warn when every text fits."""
    n = len(text_ids(encoder, SENTENCE))
    out = encoder.encode(SENTENCE, max_length=n + 2, truncate=False)
    np.testing.assert_allclose(out, encoder.encode(SENTENCE), atol=FP32_ATOL)


def test_truncation_warns_with_counts(encoder):
    """truncate=True (default) warns a TruncationWarning with how many texts and tokens were cut."""
    long_a, long_b = SENTENCE * 3, SENTENCE * 5
    dropped = len(text_ids(encoder, long_a)) - 18 + len(text_ids(encoder, long_b)) - 18
    with pytest.warns(TruncationWarning) as record:
        out = encoder.encode([long_a, "short.", long_b], max_length=20)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 of 3 texts" in message
    assert f"{dropped} tokens dropped" in message
    assert "texts[0]" in message
    assert out.shape == (3, encoder.vector_size)


def test_no_warning_when_nothing_is_cut(encoder):
    """No TruncationWarning when every text fits in max_length."""
    n = len(text_ids(encoder, SENTENCE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(SENTENCE, max_length=n + 2)


def _stable_cut(encoder, text, lo, hi):
    """A k where the text cut after token k re-tokenizes to exactly the first k tokens."""
    tokens = encoder.tokenizer.encode_texts([text])[0]
    for k in range(lo, hi):
        end = int(tokens.offsets[k - 1, 1])
        if text[end] == " " and np.array_equal(text_ids(encoder, text[:end]), tokens.ids[:k]):
            return k, text[:end]
    raise AssertionError("no stable cut point found")


@pytest.mark.parametrize("mode", ["cls", "mean", "cls_add_mean"])
def test_truncated_equals_pre_cut_text(encoder, long_text, mode):
    """A truncated text encodes exactly as the text pre-cut to the kept tokens."""
    k, cut = _stable_cut(encoder, long_text, 60, 200)
    with pytest.warns(TruncationWarning):
        truncated = encoder.encode(long_text, mode=mode, max_length=k + 2)
    reference = encoder.encode(cut, mode=mode, max_length=k + 2, truncate=False)
    np.testing.assert_allclose(truncated, reference, atol=FP32_ATOL)
    # and not the vector of a cut one token shorter (the random test model's [CLS] barely moves with
    # one token more or less, so compare the pooled modes only)
    with pytest.warns(TruncationWarning, match=r"\(1 tokens dropped"):
        shorter = encoder.encode(cut, mode=mode, max_length=k + 1)
    if mode != "cls":
        assert not np.allclose(truncated, shorter, atol=1e-4)


def test_truncated_equals_backend_on_hand_built_row(encoder, long_text):
    """Truncation to max_length=L runs [CLS] + the first L-2-|prompt| text tokens + [SEP]; check the
    result against the backend forward on that row built by hand (mean mode pools the text tokens)."""
    config = encoder.config
    ids = text_ids(encoder, long_text)
    prompt = encoder.tokenizer.prompt_ids("passage")
    max_length = 64
    k = max_length - 2 - len(prompt)
    row = np.concatenate([[config.cls_token_id], prompt, ids[:k], [config.sep_token_id]]).astype(np.int64)
    assert len(row) == max_length
    start = 1 + len(prompt)
    mask = np.ones((1, len(row)), np.int64)
    cls, spans = encoder.backend.forward(row[None], mask, np.array([[[start, start + k]]]))

    def unit(x):
        return x / np.linalg.norm(x)

    with pytest.warns(TruncationWarning):
        got = encoder.encode(long_text, mode="mean", prompt="passage", max_length=max_length)
    np.testing.assert_allclose(got, unit(spans[0, 0]), atol=FP32_ATOL)
    with pytest.warns(TruncationWarning):
        got_cls = encoder.encode(long_text, mode="cls", prompt="passage", max_length=max_length)
    np.testing.assert_allclose(got_cls, unit(cls[0]), atol=FP32_ATOL)


@pytest.fixture(scope="module")
def over_limit_text(encoder, long_text):
    """long_text repeated until it holds more tokens than the model has positions."""
    limit = encoder.config.max_position_embeddings
    repeats = limit // len(text_ids(encoder, long_text)) + 1
    text = " ".join([long_text] * repeats)
    assert len(text_ids(encoder, text)) > limit
    return text


def test_default_max_length_is_model_maximum(encoder, over_limit_text):
    """Without max_length, encode cuts a text longer than the model to max_position_embeddings - 2 tokens,
    and encode_chunks runs it in windows of that many (nothing cut)."""
    n = len(text_ids(encoder, over_limit_text))
    limit = encoder.config.max_position_embeddings
    expected = rf"exceeded {limit - 2} text tokens .*\({n - (limit - 2)} tokens dropped"
    with pytest.warns(TruncationWarning, match=expected):
        encoder.encode(over_limit_text, mode="mean")
    doc = encoder.encode_chunks(over_limit_text, chunk_size=1024, chunk_overlap=0)
    assert doc.truncated_tokens == 0 and doc.windows == 2
    assert doc.token_spans[-1][1] == n


def test_default_max_length_truncate_false_raises(encoder, over_limit_text):
    """Without max_length and with truncate=False, a text longer than the model raises."""
    limit = encoder.config.max_position_embeddings
    expected = rf"texts\[1\] has \d+ tokens but only {limit - 2} fit in max_length={limit}"
    with pytest.raises(ValueError, match=expected):
        encoder.encode([SENTENCE, over_limit_text], truncate=False)


@pytest.mark.parametrize(
    "max_length, prompt, error, match",
    [
        ("limit+1", None, ValueError, r"max_length={limit1} exceeds the model's maximum of {limit}"),
        (10**7, None, ValueError, r"max_length=10000000 exceeds the model's maximum"),
        (10, "query", ValueError, r"max_length=10 leaves no room for text .*prompt of \d+ tokens"),
        (2, None, ValueError, r"max_length=2 leaves no room for text"),
        (0, None, ValueError, r"max_length must be >= 1"),
        (-5, None, ValueError, r"max_length must be >= 1"),
        (64.0, None, TypeError, r"max_length must be an integer, got float"),
        ("64", None, TypeError, r"max_length must be an integer, got str"),
        (True, None, TypeError, r"max_length must be an integer, got bool"),
    ],
)
def test_bad_max_length_raises(entry, encoder, max_length, prompt, error, match):
    """max_length above the model maximum, too small for [CLS]/[SEP]/prompt, or not an int, raises
    with a message naming max_length."""
    limit = encoder.config.max_position_embeddings
    if max_length == "limit+1":
        max_length = limit + 1
    with pytest.raises(error, match=match.format(limit=limit, limit1=limit + 1)):
        entry(SENTENCE, max_length=max_length, prompt=prompt)


def test_numpy_integer_max_length(encoder):
    """A numpy integer max_length counts as an integer."""
    n = len(text_ids(encoder, SENTENCE))
    np.testing.assert_allclose(
        encoder.encode(SENTENCE, max_length=np.int64(n + 2)), encoder.encode(SENTENCE), atol=FP32_ATOL
    )


def test_max_length_at_model_maximum_is_allowed(encoder):
    """max_length equal to config.max_position_embeddings is the largest allowed value."""
    out = encoder.encode(SENTENCE, max_length=encoder.config.max_position_embeddings)
    np.testing.assert_allclose(out, encoder.encode(SENTENCE), atol=FP32_ATOL)


def test_max_length_just_fits_the_prompt(encoder):
    """max_length = 3 + prompt length holds exactly one text token: encode keeps one, encode_chunks runs
    one window per token."""
    prompt_len = len(encoder.tokenizer.prompt_ids("query"))
    n = len(text_ids(encoder, SENTENCE))
    doc = encoder.encode_chunks(SENTENCE, prompt="query", max_length=prompt_len + 3, chunk_size=4, chunk_overlap=0)
    assert doc.windows == n and doc.token_spans[-1][1] == n
    with pytest.warns(TruncationWarning, match=rf"\({n - 1} tokens dropped"):
        encoder.encode(SENTENCE, prompt="query", max_length=prompt_len + 3)


# -- modes and prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["max", "CLS", "", "mean_pooling"])
def test_unknown_mode_lists_the_modes(encoder, mode):
    """An unknown mode raises ValueError listing the valid modes."""
    with pytest.raises(ValueError, match=r"mode must be one of .*'cls'.*'mean'.*'cls_add_mean'"):
        encoder.encode(SENTENCE, mode=mode)


def test_modes_differ_and_default_is_config(encoder):
    """The three modes give different vectors; the default mode is the config's single_vector_type."""
    vecs = {m: encoder.encode(SENTENCE, mode=m) for m in ("cls", "mean", "cls_add_mean")}
    assert not np.allclose(vecs["cls"], vecs["mean"], atol=1e-4)
    assert not np.allclose(vecs["cls_add_mean"], vecs["mean"], atol=1e-4)
    np.testing.assert_allclose(encoder.encode(SENTENCE), vecs[encoder.config.single_vector_type], atol=FP32_ATOL)
    for v in vecs.values():
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5
    # cls_add_mean = normalize(normalize(cls) + normalize(mean)); cls and mean already come normalised
    combined = vecs["cls"] + vecs["mean"]
    np.testing.assert_allclose(vecs["cls_add_mean"], combined / np.linalg.norm(combined), atol=FP32_ATOL)


@pytest.mark.parametrize("prompt", [3, b"query", ["query"], 1.5])
def test_prompt_of_wrong_type_raises(entry, prompt):
    """A prompt that is not a name, a string or None raises TypeError naming the prompt."""
    with pytest.raises(TypeError, match=r"prompt must be a prompt name, a string or None"):
        entry(SENTENCE, prompt=prompt)


def test_named_prompt_changes_the_vector(encoder):
    """prompt="query" differs from no prompt, and from prompt="passage"."""
    plain = encoder.encode(SENTENCE)
    query = encoder.encode(SENTENCE, prompt="query")
    passage = encoder.encode(SENTENCE, prompt="passage")
    assert not np.allclose(plain, query, atol=1e-4)
    assert not np.allclose(query, passage, atol=1e-4)


@pytest.mark.parametrize("name", ["query", "passage"])
def test_literal_prompt_equals_named_prompt(encoder, name):
    """A literal prompt string equal to a named prompt's text gives the same vector as the name."""
    literal = encoder.config.prompts[name]
    assert literal.startswith("<|START_INSTRUCTION|>")
    for mode in ("cls", "mean", "cls_add_mean"):
        np.testing.assert_allclose(
            encoder.encode(SENTENCE, prompt=literal, mode=mode),
            encoder.encode(SENTENCE, prompt=name, mode=mode),
            atol=FP32_ATOL,
        )


def test_other_literal_prompt_is_used(encoder):
    """An arbitrary literal prompt string (not a name) is prepended and changes the vector."""
    plain = encoder.encode(SENTENCE)
    custom = encoder.encode(SENTENCE, prompt="Represent this sentence: ")
    assert not np.allclose(plain, custom, atol=1e-4)


def test_empty_prompt_equals_no_prompt(encoder):
    """prompt="" adds no tokens: the same vector as prompt=None."""
    np.testing.assert_allclose(encoder.encode(SENTENCE, prompt=""), encoder.encode(SENTENCE), atol=FP32_ATOL)


# -- model folder errors ----------------------------------------------------------------------------


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of the test checkpoint to break."""
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.update(changes)
    path.write_text(json.dumps(raw), encoding="utf-8")


def test_load_missing_folder(tmp_path):
    """A folder that does not exist raises ModelFileError naming it."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelFileError, match=r"no-such-model is not a folder"):
        runtimes.load(missing)


def test_load_file_instead_of_folder(tmp_path):
    """A path to a file, not a folder, raises ModelFileError."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelFileError, match=r"model.bin is not a folder"):
        runtimes.load(path)


def test_load_folder_without_config(folder):
    """A folder without config.json raises ModelFileError naming config.json."""
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json is missing"):
        runtimes.load(folder)


@pytest.mark.parametrize("content", ["{not json", "", '{"hidden_size": 32,}'])
def test_load_invalid_json_config(folder, content):
    """A config.json that is not JSON raises ModelFileError naming the file."""
    (folder / "config.json").write_text(content, encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"config\.json is not valid JSON"):
        runtimes.load(folder)


def test_load_config_not_an_object(folder):
    """A config.json holding a JSON list raises ModelFileError."""
    (folder / "config.json").write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"config\.json must hold a JSON object"):
        runtimes.load(folder)


def test_load_config_missing_key(folder):
    """A config.json without a required key raises ModelFileError naming the key."""
    path = folder / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    del raw["max_position_embeddings"]
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"'max_position_embeddings' is missing"):
        runtimes.load(folder)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b"\xff" * 64 + b[64:], id="header-length"),
        pytest.param(lambda b: b[:8] + b"#" * 32 + b[40:], id="header-json"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_load_corrupt_safetensors(folder, corrupt):
    """A corrupt model.safetensors raises ModelFileError naming the file."""
    weights = folder / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(ModelFileError, match=r"model\.safetensors is not a readable safetensors file"):
        runtimes.load(folder)


def test_load_missing_weights(folder):
    """A folder without model.safetensors raises ModelFileError naming it."""
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"has no model\.safetensors"):
        runtimes.load(folder)


def test_load_missing_tokenizer(folder):
    """A folder without tokenizer.json raises ModelFileError naming it."""
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match=r"has no tokenizer\.json"):
        runtimes.load(folder)


def test_load_unreadable_tokenizer(folder):
    """A tokenizer.json that the tokenizers library cannot read raises ModelFileError naming it."""
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}', encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"tokenizer\.json is not a readable tokenizer file"):
        runtimes.load(folder)


def test_load_tokenizer_from_a_bigger_model(folder):
    """A tokenizer whose vocabulary exceeds config vocab_size (it belongs to another model) raises."""
    _edit_config(folder, vocab_size=512)
    expected = r"tokenizer has \d+ tokens but the model's vocab_size is 512.*tokenizer\.json"
    with pytest.raises(ModelFileError, match=expected):
        runtimes.load(folder)


def test_load_instruction_token_not_in_tokenizer(folder):
    """An instruction token named in config.json but absent from tokenizer.json raises."""
    _edit_config(folder, instruction_tokens=["<|START_INSTRUCTION|>", "<|NOT_A_TOKEN|>"])
    with pytest.raises(ModelFileError, match=r"'<\|NOT_A_TOKEN\|>'.*not in tokenizer\.json"):
        runtimes.load(folder)


def test_load_head_missing_from_weights(folder):
    """config.json asks for a head (vector_size != hidden_size) but the weights lack dewey_head.weight."""
    from safetensors.numpy import load_file, save_file

    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    assert "dewey_head.weight" in state
    del state["dewey_head.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    expected = r"model\.safetensors has no 'dewey_head\.weight', but config\.json asks for a head 32 -> 48"
    with pytest.raises(ModelFileError, match=expected):
        runtimes.load(folder)


def test_load_weights_shape_mismatch(folder):
    """A config.json whose vector_size disagrees with the head's weights raises ModelFileError."""
    _edit_config(folder, vector_size=40)
    expected = r"head\.weight has shape \(48, 32\), config\.json implies \(40, 32\)"
    with pytest.raises(ModelFileError, match=expected):
        runtimes.load(folder)


@pytest.mark.parametrize("backend", ["tensorflow", "TORCH", ""])
def test_load_unknown_backend(checkpoint, backend):
    """An unknown backend name raises ValueError listing the known backends."""
    with pytest.raises(ValueError, match=r"unknown backend .*known backends: torch"):
        runtimes.load(checkpoint, backend=backend)


def test_standard_prompt_name_missing_from_config_raises(folder):
    """A model whose config.json has no prompts: prompt="query" raises rather than embedding the word
    "query" as a literal prompt; a literal prompt string still works."""
    _edit_config(folder, prompts={})
    encoder = runtimes.load(folder)
    with pytest.raises(ValueError, match=r"defines no prompt named 'query'"):
        encoder.encode(SENTENCE, prompt="query")
    assert encoder.encode(SENTENCE, prompt="Represent this: ").shape == (encoder.vector_size,)


def test_load_intact_copy_works(folder, encoder):
    """The copied folder itself is fine: the failures above come from the edits alone."""
    copy = runtimes.load(folder)
    np.testing.assert_allclose(copy.encode(SENTENCE), encoder.encode(SENTENCE), atol=FP32_ATOL)
