"""``dewey-serve``: an OpenAI-compatible embedding server over one Dewey model.

Exit codes: 0 stopped cleanly (SIGTERM or Ctrl+C, after draining); 1 the model failed to load after the
server started, or the port could not be bound; 2 bad usage or input (a missing model folder, a
checkpoint given to an export backend or the reverse, an unreadable or empty API key file, limits that
contradict each other).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtimes.backends import available_backends
from runtimes.batching import DEFAULT_MAX_BATCH_TOKENS

from .app import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_INPUT_TOKENS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_QUEUE_TOKENS,
    Settings,
)

EXIT_BAD_INPUT = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(available_backends()), default="torch", show_default=True,
              help="torch reads a checkpoint; onnx, openvino and trt read a dewey-export folder.")
@click.option("--device", help="torch: cpu or cuda[:N]; onnx: cpu, cuda[:N] or tensorrt[:N]; trt: cuda[:N].")
@click.option("--dtype", help="torch: fp32 (default) or bf16; onnx/openvino: the export's precision.")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="0: any free port (logged in the 'listening' line).")
@click.option("--model-name", help="The name clients send as 'model'; default: the model folder's name.")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="File of API keys, one per line (# comments); requests must send 'Authorization: Bearer KEY'. "
                   "/health, /ready and /metrics stay open.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Padded tokens per forward batch.")
@click.option("--max-queue-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_QUEUE_TOKENS, show_default=True,
              help="Tokens that may wait for a batch; past it requests get 429 with Retry-After.")
@click.option("--max-input-tokens", type=click.IntRange(min=3), default=DEFAULT_MAX_INPUT_TOKENS, show_default=True,
              help="Longest input, [CLS], [SEP] and prompt included (capped by the model's positions); longer "
                   "ones get 400, or are cut when truncation is asked for.")
@click.option("--truncate/--no-truncate", default=False, show_default=True,
              help="Whether inputs over --max-input-tokens are cut when a request does not say ('truncate').")
@click.option("--warmup-tokens", type=click.IntRange(min=3),
              help="Length of the warm-up forward before /ready; default: --max-input-tokens.")
@click.option("--max-payload-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_PAYLOAD_BYTES,
              show_default=True, help="Largest request body; larger ones get 413.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin (repeatable); CORS is off without it.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT_S, show_default=True,
              help="Seconds SIGTERM waits for requests in flight before stopping.")
def main(model, backend, device, dtype, host, port, model_name, api_key_file, max_batch_tokens, max_queue_tokens,
         max_input_tokens, truncate, warmup_tokens, max_payload_bytes, cors_origins, drain_timeout):
    """Serve MODEL (a checkpoint for --backend torch, a dewey-export folder for the others; default: the
    packaged dewey-mini) over HTTP: the OpenAI embeddings API (POST /v1/embeddings), late chunking
    (POST /v1/embeddings/chunks), POST /tokenize, GET /health, /ready, /info, /v1/models and /metrics.

    \b
    SIGTERM drains: requests in flight finish, new ones get 503, then the server exits 0.
    Exit codes: 0 stopped cleanly; 1 the model failed to load, or the port is taken; 2 bad usage or input.
    """
    import uvicorn

    from .app import create_app
    from .server import DrainingServer

    model = _check_model(model, backend)
    if max_input_tokens > max_queue_tokens:
        raise BadInput(f"--max-input-tokens {max_input_tokens} is more than --max-queue-tokens {max_queue_tokens}: "
                       "the longest input could never be queued")
    settings = Settings(
        model_path=model, backend=backend, device=device, dtype=dtype, model_name=model_name,
        api_keys=_read_keys(api_key_file) if api_key_file else (), max_batch_tokens=max_batch_tokens,
        max_queue_tokens=max_queue_tokens, max_input_tokens=max_input_tokens, warmup_tokens=warmup_tokens,
        truncate=truncate, max_payload_bytes=max_payload_bytes, cors_origins=tuple(cors_origins),
        drain_timeout=drain_timeout,
    )
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(drain_timeout, 1.0))
    server = DrainingServer(config, app.state.dewey)
    server.run()
    if server.exit_code:
        sys.exit(server.exit_code)


def _check_model(model: Path | None, backend: str) -> Path:
    """The model folder, checked as far as can be without loading it (config.json, and the folder's kind
    against the backend), so that a wrong one exits 2 before the server starts."""
    from runtimes import default_model_path
    from runtimes.backends import get_backend_class
    from runtimes.config import ModelFileError, load_config
    from runtimes.export_format import MANIFEST_FILE

    try:
        model = default_model_path() if model is None else model
        if not model.is_dir():
            raise ModelFileError(f"MODEL {model} is not a folder (expected a Dewey checkpoint or export folder)")
        load_config(model)
        exported = (model / MANIFEST_FILE).exists()
        if exported and backend == "torch":
            raise ModelFileError(f"MODEL {model} is a dewey-export folder; --backend torch reads a checkpoint")
        if not exported and backend != "torch":
            raise ModelFileError(f"--backend {backend} reads a dewey-export folder, and MODEL {model} is a "
                                 f"checkpoint: export it first (dewey-export --model {model} --to {backend} ...)")
        get_backend_class(backend)
    except (ModelFileError, ImportError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    return model


def _read_keys(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise BadInput(f"--api-key-file {path} holds no key (one per line; # starts a comment)")
    return keys


if __name__ == "__main__":
    main()
