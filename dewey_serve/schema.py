"""Request bodies, read by hand: each field's type checked, an unknown field refused, and every fault a
400 naming the field (``param``), as the OpenAI API answers."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import bad_request

ENCODING_FORMATS = ("float", "base64")
# The OpenAI embeddings API takes at most 2,048 inputs per request; so does this server.
MAX_INPUTS = 2048


@dataclass
class Inputs:
    texts: list[str] | None  # text inputs, or
    ids: list[list[int]] | None  # token-id inputs
    single: bool  # one input given bare (a string, or one list of ids)

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)


@dataclass
class EmbeddingRequest:
    model: str
    inputs: Inputs
    encoding_format: str
    mode: str | None
    prompt: str | None
    truncate: bool | None
    dimensions: int | None = None


@dataclass
class ChunksRequest:
    model: str
    texts: list[str]
    encoding_format: str
    mode: str | None
    prompt: str | None
    truncate: bool | None
    chunk_size: int
    chunk_overlap: int
    splitter: str


@dataclass
class TokenizeRequest:
    texts: list[str]
    prompt: str | None


def parse_json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


class _Fields:
    """Typed access to a body's fields; ``done()`` refuses the fields nobody asked for."""

    def __init__(self, body: dict):
        self.body, self.seen = body, set()

    def get(self, name: str, kind, default=None, required: bool = False, choices=None):
        self.seen.add(name)
        if name not in self.body or self.body[name] is None:
            if required:
                raise bad_request(f"'{name}' is required", name, code="missing_required_parameter")
            return default
        value = self.body[name]
        # JSON true is a Python bool, which is also an int: refuse it where a number is meant.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad_request(f"'{name}' must be {_KIND_NAMES.get(kind, kind)}, got {json.dumps(value)[:80]}", name,
                              code="invalid_type")
        if choices is not None and value not in choices:
            raise bad_request(f"'{name}' must be one of {', '.join(map(repr, choices))}, got {value!r}", name)
        return value

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0],
                              code="unknown_parameter")


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _texts(value, name: str) -> tuple[list[str], bool]:
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, False
    raise bad_request(f"'{name}' must be a string or a non-empty list of strings", name, code="invalid_type")


def _inputs(value) -> Inputs:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return Inputs([value], None, True)
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return Inputs(value, None, False)
        if all(_is_id(v) for v in value):
            return Inputs(None, [value], True)
        if all(isinstance(v, list) and all(_is_id(i) for i in v) for v in value):
            return Inputs(None, value, False)
    raise bad_request("'input' must be a string, a non-empty list of strings, a list of token ids, or a list "
                      "of lists of token ids", "input", code="invalid_type")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(n: int, name: str) -> None:
    if n > MAX_INPUTS:
        raise bad_request(f"'{name}' holds {n} inputs; at most {MAX_INPUTS} per request", name)


def _common(fields: _Fields):
    return dict(
        encoding_format=fields.get("encoding_format", str, "float", choices=ENCODING_FORMATS),
        mode=fields.get("mode", str),
        prompt=fields.get("prompt", str),
        truncate=fields.get("truncate", bool),
    )


def embedding_request(body: dict, vector_size: int, declared: tuple[int, ...] = ()) -> EmbeddingRequest:
    """``declared``: the shorter (Matryoshka) sizes the model declares, which ``dimensions`` may ask for."""
    fields = _Fields(body)
    model = fields.get("model", str, required=True)
    inputs = _inputs(fields.get("input", object, required=True))
    _check_count(len(inputs), "input")
    dimensions = fields.get("dimensions", int)
    if dimensions is not None and dimensions != vector_size and dimensions not in declared:
        # Cutting the vectors of a model not trained for it (Matryoshka) would change what they mean.
        sizes = ", ".join(map(str, declared)) if declared else "no shorter sizes"
        raise bad_request(f"this model does not support 'dimensions': {dimensions}: its vectors have {vector_size} "
                          f"dimensions and it declares {sizes}", "dimensions", code="unsupported_parameter")
    fields.get("user", str)  # accepted, as by OpenAI; not used and not logged
    request = EmbeddingRequest(model, inputs, **_common(fields), dimensions=dimensions)
    fields.done()
    return request


def chunks_request(body: dict, default_chunk_size: int, default_chunk_overlap: int) -> ChunksRequest:
    fields = _Fields(body)
    model = fields.get("model", str, required=True)
    texts, _ = _texts(fields.get("input", object, required=True), "input")
    _check_count(len(texts), "input")
    request = ChunksRequest(
        model, texts, **_common(fields),
        chunk_size=fields.get("chunk_size", int, default_chunk_size),
        chunk_overlap=fields.get("chunk_overlap", int, default_chunk_overlap),
        splitter=fields.get("splitter", str, "tokens"),
    )
    fields.get("user", str)
    fields.done()
    return request


def tokenize_request(body: dict) -> TokenizeRequest:
    fields = _Fields(body)
    fields.get("model", str)
    texts, _ = _texts(fields.get("input", object, required=True), "input")
    _check_count(len(texts), "input")
    request = TokenizeRequest(texts, fields.get("prompt", str))
    fields.done()
    return request
