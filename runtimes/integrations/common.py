"""What the adapters share: importing a library with the extra that brings it, the model's prompts,
and one late-chunking pass over a batch of texts."""

from __future__ import annotations

import importlib

from runtimes.chunking import check_chunk_args
from runtimes.tokenization import STANDARD_PROMPT_NAMES
from runtimes.validation import require_int

# Late-chunking defaults: the Dewey authors' retrieval setting (chunks of 256 tokens, 64 overlapping),
# which ``Encoder.encode_chunks`` also defaults to.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_CHUNK_OVERLAP = 64
DEFAULT_SPLITTER = "tokens"


def import_library(module: str, extra: str):
    """Import ``module``, or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this adapter needs the {module.split('.')[0]} library, which is not installed: "
            f"pip install 'dewey[{extra}]'"
        ) from error


def model_prompt(encoder, prompt: str | None) -> str | None:
    """The prompt an adapter passes to the Encoder for ``prompt``: a standard name (``query``,
    ``passage``) the model does not declare becomes None, so a model trained without prompts gets none;
    a declared name, a literal prompt string or None passes unchanged."""
    if prompt in STANDARD_PROMPT_NAMES and prompt not in encoder.config.prompts:
        return None
    return prompt


def check_late_chunk_args(chunk_size, chunk_overlap, splitter, batch_size) -> None:
    """Refuse bad chunking or batch settings when an adapter is built, not at its first document."""
    check_chunk_args(chunk_size, chunk_overlap, splitter)
    require_int("batch_size", batch_size, 1)


def late_chunk(encoder, texts: list[str], *, chunk_size: int, chunk_overlap: int, splitter: str,
               prompt: str | None, batch_size: int) -> list:
    """``encoder.encode_chunks`` over ``texts`` (one pass per whole text): a ChunkedDocument per text,
    or None for a blank text, which has nothing to embed (text splitters give it no chunks either)."""
    keep = [i for i, text in enumerate(texts) if text.strip()]
    chunked = encoder.encode_chunks(
        [texts[i] for i in keep], chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter,
        prompt=model_prompt(encoder, prompt), batch_size=batch_size,
    )
    out: list = [None] * len(texts)
    for i, doc in zip(keep, chunked):
        out[i] = doc
    return out
