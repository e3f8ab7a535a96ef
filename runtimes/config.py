"""The Dewey fields of a checkpoint's ``config.json``, read with the standard library only.

A checkpoint's ``config.json`` is a ModernBERT config (what ``transformers`` reads to build the
backbone) plus the Dewey fields below. The runtime needs only these few values, so it reads them here
without importing transformers: the ONNX Runtime path must work where transformers is not installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "config.json"

SINGLE_VECTOR_TYPES = ("cls", "mean", "cls_add_mean")

# The instruction prompts of dewey_en_beta (DEWEY.md); prepended to the text with no separator.
DEWEY_INSTRUCTION_TOKENS = ("<|START_INSTRUCTION|>", "<|END_INSTRUCTION|>")
DEWEY_PROMPTS = {
    "query": "<|START_INSTRUCTION|>Answer the question<|END_INSTRUCTION|>",
    "passage": "<|START_INSTRUCTION|>Candidate document<|END_INSTRUCTION|>",
}


class ModelFileError(ValueError):
    """A model folder or one of its files is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class DeweyConfig:
    """What the shared runtime layer needs to know about a model."""

    hidden_size: int
    vector_size: int
    max_position_embeddings: int
    vocab_size: int
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    single_vector_type: str = "cls_add_mean"
    prompts: dict[str, str] = field(default_factory=dict)
    instruction_tokens: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "DeweyConfig":
        def need(key: str):
            if key not in raw:
                raise ModelFileError(f"{source}: required key {key!r} is missing")
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelFileError(f"{source}: {key!r} must be a non-negative integer, got {value!r}")
            return value

        hidden = need("hidden_size")
        vector_size = raw.get("vector_size", hidden)
        if not isinstance(vector_size, int) or vector_size <= 0:
            raise ModelFileError(f"{source}: 'vector_size' must be a positive integer, got {vector_size!r}")
        single = raw.get("single_vector_type", "cls_add_mean")
        if single not in SINGLE_VECTOR_TYPES:
            raise ModelFileError(
                f"{source}: 'single_vector_type' is {single!r}; expected one of {SINGLE_VECTOR_TYPES}"
            )
        prompts = raw.get("prompts") or {}
        if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
        ):
            raise ModelFileError(f"{source}: 'prompts' must map prompt names to strings")
        config = cls(
            hidden_size=hidden,
            vector_size=vector_size,
            max_position_embeddings=need("max_position_embeddings"),
            vocab_size=need("vocab_size"),
            cls_token_id=need("cls_token_id"),
            sep_token_id=need("sep_token_id"),
            pad_token_id=need("pad_token_id"),
            single_vector_type=single,
            prompts=dict(prompts),
            instruction_tokens=tuple(raw.get("instruction_tokens") or ()),
        )
        for key in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(config, key) >= config.vocab_size:
                raise ModelFileError(
                    f"{source}: {key} {getattr(config, key)} is outside the vocabulary (size {config.vocab_size})"
                )
        return config


def read_config_dict(folder: str | Path) -> dict:
    """The raw ``config.json`` of a model folder, with errors that name the file."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{Path(folder)} is not a Dewey model folder: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} must hold a JSON object")
    return raw


def load_config(folder: str | Path) -> DeweyConfig:
    return DeweyConfig.from_dict(read_config_dict(folder), source=str(Path(folder) / CONFIG_FILE))
