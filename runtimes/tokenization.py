"""Tokenization, prompts and input rows: the Rust ``tokenizers`` library on ``tokenizer.json``.

A row is ``[CLS] prompt text [SEP]``. Prompt and text are tokenized separately and joined, so the
boundary between them is exact: the text tokens are a known range of the row, their character offsets
point into the caller's original string, and prompt tokens can never be pooled. With Dewey's prompts
(they end in the special token ``<|END_INSTRUCTION|>``) this gives the same ids as tokenizing the
concatenated string.
"""

from __future__ import annotations

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
# Sequences of bytes, not of strings: refused as texts rather than embedded item by item.
_BINARY_TYPES = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class TextTokens:
    """The tokens of one text, without special tokens or prompt."""

    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2], character offsets into the original text, end exclusive


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
        if not text.strip():
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
    TypeError that names neither the text nor the position. UTF-8 encoding finds the first one in C.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} has a lone surrogate {text[exc.start]!r} at character {exc.start}, which is not "
            "valid Unicode: decode the source with errors='replace' or fix the string"
        ) from None


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

    def encode_texts(self, texts: list[str]) -> list[TextTokens]:
        """Tokenize texts (no special tokens), in parallel in the Rust library."""
        out = []
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if not enc.ids:
                raise ValueError(f"texts[{i}] produced no tokens: there is nothing to embed")
            out.append(
                TextTokens(np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2))
            )
        return out

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
