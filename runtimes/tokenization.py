"""Tokenization, prompts and input rows: the Rust ``tokenizers`` library on ``tokenizer.json``.

A row is ``[CLS] prompt text [SEP]``. Prompt and text are tokenized separately and joined, so the
boundary between them is exact: the text tokens are a known range of the row, their character offsets
point into the caller's original string, and prompt tokens can never be pooled. With Dewey's prompts
(they end in the special token ``<|END_INSTRUCTION|>``) this gives the same ids as tokenizing the
concatenated string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DeweyConfig, ModelFileError

TOKENIZER_FILE = "tokenizer.json"
# Tokens around the text in every row: [CLS] at the start, [SEP] at the end.
SPECIAL_TOKENS_PER_ROW = 2
# Prompt names users pass by name; never taken as literal prompt text.
STANDARD_PROMPT_NAMES = ("query", "passage")
# A surrogate code point: half of a UTF-16 pair, never a character of valid Unicode.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Sequences of bytes, not of strings: refused as texts rather than embedded item by item.
_BINARY_TYPES = (bytes, bytearray, memoryview)
# Characters tokenized in one call. The Rust tokenizer keeps about 140 bytes per character while it
# works (dewey-mini's: 1.4 GB for 10 million characters, measured), so a long text is tokenized in
# pieces of this size: about 9 MB at a time, at the same speed as one call (pieces of pydoc's topics,
# 465k characters: 0.33 s against 0.48 s whole).
TOKENIZE_PIECE_CHARS = 1 << 16
# A piece grows (doubling) up to this size while it holds no complete word; past it, a single "word"
# (a run of characters with no whitespace or punctuation) is cut where the piece ends: about 140 MB of
# tokenizer memory at most. WordPiece makes one [UNK] of any word over 100 characters, so only texts
# with words of a million characters see the cut.
MAX_TOKENIZE_PIECE_CHARS = 1 << 20
# Words at the end of a piece that may tokenize differently once the text goes on: the word cut by the
# piece's end, and a whitespace run before it whose split depends on what follows (byte-level BPE).
UNSETTLED_WORDS = 2


@dataclass(frozen=True)
class TextTokens:
    """The tokens of one text, without special tokens or prompt."""

    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2], character offsets into the original text, end exclusive
    # Tokens of the whole text; more than len(ids) when it was cut at a limit, None when the tokens past
    # the limit were not counted (only that there are more).
    total: int | None = None

    @property
    def cut(self) -> bool:
        """Whether the text has tokens past ``ids``."""
        return self.total is None or self.total > len(self.ids)


def check_texts(texts) -> tuple[list[str], bool]:
    """Validate user input; return the texts as a list and whether a single string was given.

    Only a string or an ordered, re-readable sequence is taken: results are matched to the input by
    position. A dict iterates its keys, a set in hash order and a generator is used up once, so
    accepting them would embed the wrong strings, or the right ones in an order the caller cannot know.
    """
    if isinstance(texts, str):
        texts, single = [texts], True
    elif isinstance(texts, np.ndarray):
        if texts.ndim != 1:
            raise TypeError(f"texts must be a 1-d array of strings, got a {texts.ndim}-d array")
        texts, single = texts.tolist(), False
    elif isinstance(texts, Sequence) and not isinstance(texts, _BINARY_TYPES):
        texts, single = list(texts), False
    else:
        raise TypeError(
            f"texts must be a string or a sequence of strings (list, tuple, 1-d numpy array), got "
            f"{type(texts).__name__}{_unordered_hint(texts)}"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if not text or text.isspace():  # not strip(): no copy of a huge text
            raise ValueError(f"texts[{i}] is empty or only whitespace: there is nothing to embed")
        check_encodable(f"texts[{i}]", text)
    return texts, single


def _unordered_hint(texts) -> str:
    """Why an iterable that is not a sequence is refused, and what to pass instead."""
    if isinstance(texts, Mapping):
        return ": a mapping would embed its keys; pass list(texts.values()) or list(texts.keys())"
    if isinstance(texts, AbstractSet):
        return ": a set has no order to match the vectors to; pass sorted(texts) or a list"
    if isinstance(texts, _BINARY_TYPES):
        return ": decode it to str first"
    if isinstance(texts, Iterable):
        return ": pass list(texts)"
    return ""


def check_encodable(name: str, text: str) -> None:
    """Raise ValueError naming ``name`` and the position of a surrogate code point in ``text``.

    A Python str can hold surrogates (``errors="surrogateescape"`` decoding, a JSON "\\ud800" escape);
    they are halves of UTF-16 pairs, not characters, and the tokenizer refuses the whole batch with a
    TypeError that names neither the text nor the position. A regular expression finds the first one in
    C without copying the text (encoding it to UTF-8 would).
    """
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(
            f"{name} has a lone surrogate {found.group()!r} at character {found.start()}, which is not "
            "valid Unicode: decode the source with errors='replace' or fix the string"
        )


def read_tokenizer_file(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, its saved truncation and padding switched off
    (tokenizers obeys them silently: all-MiniLM-L6-v2's file cuts every text to 128 tokens)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path.parent} has no {path.name}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ModelFileError(f"{path} is not a readable tokenizer file: {exc}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class DeweyTokenizer:
    """The model's tokenizer with its prompts, producing input rows for the backends."""

    def __init__(self, tokenizer, config: DeweyConfig):
        # tokenizer.json may carry truncation and padding settings that tokenizers obeys silently
        # (all-MiniLM-L6-v2's file cuts every text to 128 tokens): switch both off.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
            raise ModelFileError(
                f"tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model's "
                f"vocab_size is {config.vocab_size}: tokenizer.json does not belong to this model"
            )
        for token in config.instruction_tokens:
            if tokenizer.token_to_id(token) is None:
                raise ModelFileError(f"instruction token {token!r} from config.json is not in tokenizer.json")
        self.tokenizer = tokenizer
        self.config = config
        self._prompt_cache: dict[str, np.ndarray] = {}
        self._added_token_chars = max((len(token.content) for token in tokenizer.get_added_tokens_decoder().values()),
                                      default=0)

    @classmethod
    def from_folder(cls, folder: str | Path, config: DeweyConfig) -> "DeweyTokenizer":
        return cls(read_tokenizer_file(Path(folder) / TOKENIZER_FILE), config)

    def resolve_prompt(self, prompt: str | None, name_only: bool = False) -> str:
        """The prompt text of a prompt name from the model's config (``query``, ``passage``, ...), or
        ``prompt`` itself as a literal prompt string unless ``name_only``."""
        if prompt is None:
            return ""
        if not isinstance(prompt, str):
            expected = "prompt_name must be a prompt name" if name_only else "prompt must be a prompt name, a string"
            raise TypeError(f"{expected} or None, got {type(prompt).__name__}")
        if prompt in self.config.prompts:
            return self.config.prompts[prompt]
        if name_only or prompt in STANDARD_PROMPT_NAMES:
            # Taking "query" as literal text would silently embed the wrong thing.
            raise ValueError(
                f"this model's config.json defines no prompt named {prompt!r} "
                f"(it has: {sorted(self.config.prompts) or 'none'}); pass the prompt text itself as prompt="
            )
        check_encodable("prompt", prompt)
        return prompt

    def prompt_ids(self, prompt: str | None, name_only: bool = False) -> np.ndarray:
        """Token ids of a prompt (``resolve_prompt``), cached per prompt text."""
        text = self.resolve_prompt(prompt, name_only)
        if text not in self._prompt_cache:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids if text else []
            self._prompt_cache[text] = np.asarray(ids, dtype=np.int64)
        return self._prompt_cache[text]

    def encode_texts(self, texts: list[str], limit: int | None = None, count: bool = True) -> list[TextTokens]:
        """Tokenize texts (no special tokens). ``limit``: keep the first ``limit`` tokens of each text and
        tokenize no further than needed to know whether there are more, unless ``count`` (then the rest
        is tokenized piece by piece only to be counted, in ``total``). Memory follows the tokens kept,
        never the length of the text, and so does the work without ``count``: see ``token_pieces``."""
        out = []
        for i, text in enumerate(texts):
            tokens = self.bounded_tokens(text, limit, count)
            if tokens.total == 0:
                raise ValueError(f"texts[{i}] produced no tokens: there is nothing to embed")
            out.append(tokens)
        return out

    def bounded_tokens(self, text: str, limit: int | None = None, count: bool = True) -> TextTokens:
        """The first ``limit`` tokens of ``text`` (all of them when None), with ``total`` as for
        ``encode_texts``: known without ``count`` too when the text ended in the last piece tokenized."""
        ids, offsets, total = [], [], 0
        for piece_ids, piece_offsets, last in self.token_pieces(text):
            room = len(piece_ids) if limit is None else max(limit - total, 0)
            if room:  # an empty slice would be a view keeping the whole piece alive
                ids.append(piece_ids[:room])
                offsets.append(piece_offsets[:room])
            total += len(piece_ids)
            if limit is not None and total > limit and not count and not last:
                total = None
                break
        return TextTokens(np.concatenate(ids or [np.zeros(0, np.int64)]),
                          np.concatenate(offsets or [np.zeros((0, 2), np.int64)]), total)

    def token_pieces(self, text: str):
        """The tokens of ``text`` in successive parts (ids int64 [n], offsets int64 [n, 2] into ``text``,
        and whether the part is the last), tokenizing ``TOKENIZE_PIECE_CHARS`` characters at a time, so a
        caller that stops early never pays for the rest of the text. Each part ends before the piece's
        last ``UNSETTLED_WORDS`` words and any added token the piece's end may have cut; the next piece
        starts at the end of the last token kept. The parts join into the tokens of one call over the
        whole text for tokenizers whose normaliser and pre-tokenizer act within words, as the BERT
        WordPiece of Dewey's models (the tests compare them on random texts), except inside a single word
        longer than ``MAX_TOKENIZE_PIECE_CHARS``."""
        start, size = 0, TOKENIZE_PIECE_CHARS
        while start < len(text):
            end = start + size
            encoding = self.tokenizer.encode(text[start:end], add_special_tokens=False)
            ids = np.asarray(encoding.ids, dtype=np.int64)
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + start
            if end >= len(text):
                yield ids, offsets, True
                return
            keep = self._settled_tokens(encoding.word_ids, offsets, end)
            if keep == 0 and size < MAX_TOKENIZE_PIECE_CHARS and len(ids):
                size *= 2  # no settled word yet: a longer piece, from the same start
                continue
            if keep == 0:
                # A piece of characters the tokenizer drops (whitespace, controls), or one word past the
                # maximum piece: take it as it is and go on after it.
                yield ids, offsets, False
                start = end
            else:
                yield ids[:keep], offsets[:keep], False
                start = max(int(offsets[keep - 1, 1]), start + 1)
            size = TOKENIZE_PIECE_CHARS

    def _settled_tokens(self, words: list, offsets: np.ndarray, end: int) -> int:
        """How many leading tokens of a piece ending at character ``end`` stay the same whatever follows:
        those before its last ``UNSETTLED_WORDS`` words and ending before the last characters that could
        begin an added token (``<|END_INSTRUCTION|>`` cut in two is punctuation and letters)."""
        if not words or words[-1] is None:
            return 0
        first_unsettled = words[-1] - UNSETTLED_WORDS + 1
        margin = end - self._added_token_chars
        first = next((i for i, (word, (_, token_end)) in enumerate(zip(words, offsets))
                      if word is None or word >= first_unsettled or token_end > margin), len(words))
        while 0 < first < len(words) and words[first - 1] == words[first]:
            first -= 1  # never part of a word: all of its tokens go to the next piece
        return first

    def text_budget(self, prompt_ids: np.ndarray, max_length: int) -> int:
        """How many text tokens fit in a row of ``max_length`` beside the special tokens and prompt."""
        budget = max_length - SPECIAL_TOKENS_PER_ROW - len(prompt_ids)
        if budget < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for text after [CLS], [SEP] and a prompt of "
                f"{len(prompt_ids)} tokens"
            )
        return budget

    def row(self, prompt_ids: np.ndarray, text_ids: np.ndarray) -> np.ndarray:
        """``[CLS] prompt text [SEP]`` as int64 ids; the text starts at ``1 + len(prompt_ids)``."""
        return np.concatenate(
            [[self.config.cls_token_id], prompt_ids, text_ids, [self.config.sep_token_id]]
        ).astype(np.int64)
