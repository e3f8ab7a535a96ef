"""The FastAPI application: the OpenAI embeddings API and Dewey's late-chunking endpoints over one model.

``create_app(settings)`` builds it; the model loads in a thread when the app starts (``/health`` answers
meanwhile, ``/ready`` says 503 until the model is loaded and warmed up). Every request goes through
``Gate`` (a plain ASGI middleware): one JSON log line per request, API keys, and refusal with 503 while
the server drains for shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from runtimes.batching import DEFAULT_MAX_BATCH_TOKENS
from runtimes.config import SINGLE_VECTOR_TYPES
from runtimes.encoder import truncate_dimensions

from . import schema
from .batcher import Batcher, QueueFull, TooLarge
from .errors import ApiError, InputError
from .metrics import CONTENT_TYPE, Metrics
from .model import ServedModel

# Paths open without an API key (probes and scraping) and while draining.
OPEN_PATHS = ("/health", "/ready", "/metrics")
# Longest input a request may send, [CLS], [SEP] and prompt included, unless --max-input-tokens says
# otherwise (and never past the model's max_position_embeddings): 32,768 tokens, the longest document
# the issue asks a short query not to wait behind. Warming up at it takes ~18 s for dewey-mini on 2 cores.
DEFAULT_MAX_INPUT_TOKENS = 32768
# Tokens that may wait for a batch: 16 full batches of the default budget; on 2 cores dewey-mini runs
# ~30,000 tokens/s, so a request at the back of a full queue waits about 9 s. Raise it on faster machines.
DEFAULT_MAX_QUEUE_TOKENS = 16 * DEFAULT_MAX_BATCH_TOKENS
# Request bodies: 64 documents at the default input limit, at ~4 bytes a token of English.
DEFAULT_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
# Seconds SIGTERM waits for in-flight requests before the server stops anyway.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Late chunking's defaults: the authors' retrieval setting, as Encoder.encode_chunks.
DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_OVERLAP = 256, 64
# Status logged (and counted) for a request whose client went away before its answer (nginx's code).
CLIENT_GONE = 499
TRUNCATED_INPUTS_HEADER = "X-Dewey-Truncated-Inputs"
TRUNCATED_TOKENS_HEADER = "X-Dewey-Truncated-Tokens"


@dataclass
class Settings:
    model_path: Path
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    warmup_tokens: int | None = None  # None: max_input_tokens
    truncate: bool = False  # for requests that do not say
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    cors_origins: tuple[str, ...] = ()
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S

    @property
    def name(self) -> str:
        return self.model_name or self.model_path.name


def log_event(event: str, **fields) -> None:
    """One JSON line on stderr (never a text, a token or a key)."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stderr.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stderr.flush()


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    model: ServedModel | None = None
    batcher: Batcher | None = None
    max_input_tokens: int = 0  # the settings' limit, capped by the model's positions once loaded
    ready: bool = False
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    on_fatal: Callable[[], None] | None = None  # set by the server: stop, the model could not be loaded
    key_digests: tuple[bytes, ...] = ()

    def key_ok(self, header: str | None) -> bool:
        """``Authorization: Bearer KEY`` against every configured key, in constant time: all keys are
        compared (no early exit) on sha256 digests (equal lengths whatever was sent)."""
        if not self.key_digests:
            return True
        scheme, _, token = (header or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        match = False
        for expected in self.key_digests:
            match |= hmac.compare_digest(digest, expected)
        return match and scheme.lower() == "bearer"


def create_app(settings: Settings) -> FastAPI:
    state = ServerState(settings)
    state.key_digests = tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in settings.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=_load, args=(state,), name="dewey-load", daemon=True).start()
        yield
        if state.batcher is not None:
            state.batcher.close(settings.drain_timeout)

    app = FastAPI(title="dewey-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dewey = state
    _routes(app, state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return ApiError(400, str(exc), code="invalid_request").response()

    app.add_middleware(Gate, state=state)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _load(state: ServerState) -> None:
    """Load the model, warm it up at the longest allowed input, start the batcher: then ready."""
    import runtimes

    settings = state.settings
    started = time.perf_counter()
    try:
        encoder = runtimes.load(settings.model_path, backend=settings.backend, device=settings.device,
                                dtype=settings.dtype)
        model = ServedModel(encoder, settings.name, settings.model_path, settings.backend)
        state.max_input_tokens = min(settings.max_input_tokens, model.config.max_position_embeddings)
        loaded = time.perf_counter()
        warmup = min(settings.warmup_tokens or state.max_input_tokens, state.max_input_tokens)
        model.warm_up(warmup)
        metrics = state.metrics
        batcher = Batcher(model.forward, settings.max_batch_tokens, settings.max_queue_tokens,
                          observe=metrics.observe_batch, queue_changed=metrics.queue_changed)
        batcher.start()
        state.model, state.batcher = model, batcher
        state.ready = True
        log_event("ready", model=settings.name, backend=settings.backend, load_s=round(loaded - started, 3),
                  warmup_s=round(time.perf_counter() - loaded, 3), warmup_tokens=warmup)
    except Exception as exc:  # any failure to load is the end of this server: say why on one line
        state.load_error = f"{type(exc).__name__}: {exc}"
        log_event("load_failed", error=state.load_error)
        if state.on_fatal is not None:
            state.on_fatal()


class Gate:
    """Plain ASGI middleware (it must see the client's disconnect, which BaseHTTPMiddleware hides): logs one
    JSON line per request, counts requests in flight, checks API keys, refuses new work while draining."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        started = time.perf_counter()
        scope["dewey_log"] = record = {}
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path not in OPEN_PATHS
        if counted:
            state.in_flight += 1
            state.metrics.in_flight.inc()
        try:
            if counted and state.draining:
                await _send_error(ApiError(503, "the server is shutting down; retry on another instance",
                                           type="server_error", code="shutting_down",
                                           headers={"Connection": "close"}), scope, receive, send_wrapper)
            elif counted and not state.key_ok(_header(scope, b"authorization")):
                state.metrics.rejected.labels("unauthorized").inc()
                await _send_error(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                           code="invalid_api_key"), scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                state.in_flight -= 1
                state.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            route = path if path in _KNOWN_PATHS else "other"
            state.metrics.requests.labels(route, str(status[0])).inc()
            state.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client")
            log_event("request", method=scope["method"], path=route, status=status[0], ms=round(seconds * 1000, 2),
                      client=client[0] if client else None, **record)


_KNOWN_PATHS = ("/health", "/ready", "/metrics", "/info", "/v1/models", "/models", "/v1/embeddings", "/embeddings",
                "/v1/embeddings/chunks", "/tokenize")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_error(error: ApiError, scope, receive, send) -> None:
    await error.response()(scope, receive, send)


# -- helpers of the endpoints ------------------------------------------------------------------------


def _require_ready(state: ServerState) -> ServedModel:
    if not state.ready:
        raise ApiError(503, "the model is still loading; poll /ready", type="server_error", code="not_ready",
                       headers={"Retry-After": "1"})
    return state.model


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.settings.name:
        raise ApiError(404, f"the model '{model}' does not exist here; this server serves '{state.settings.name}'",
                       param="model", code="model_not_found")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (by Content-Length, else while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes, over this server's limit of {limit} "
                         "(--max-payload-bytes); send fewer inputs per request", code="payload_too_large")


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    pass


async def _run(request: Request, state: ServerState, rows: list, spans: list) -> list:
    """Rows through the shared batcher: [(cls, spans)] in order; 429/413 when the queue cannot take them;
    the rows leave the queue if the client disconnects first."""
    metrics = state.metrics
    try:
        ticket = state.batcher.submit(rows, spans, asyncio.get_running_loop())
    except QueueFull as exc:
        metrics.rejected.labels("queue_full").inc()
        raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except TooLarge as exc:
        metrics.rejected.labels("request_too_large").inc()
        raise ApiError(413, str(exc), code="request_too_large") from None
    gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({ticket.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        state.batcher.cancel(ticket)
        raise
    finally:
        gone.cancel()
    if not ticket.future.done():
        state.batcher.cancel(ticket)
        metrics.cancelled.inc()
        raise ClientGone()
    request.scope["dewey_log"]["batches"] = ticket.batches
    return ticket.future.result()


async def _answer_rows(request: Request, state: ServerState, rows) -> tuple[object, dict]:
    """A request's rows (model.Planned or model.Rows) through the shared batcher: their result (None when
    the client went away first) and the truncation headers."""
    headers = _truncation(state, rows, request.scope["dewey_log"])
    try:
        outputs = await _run(request, state, rows.rows, rows.spans)
    except ClientGone:
        return None, headers
    return await run_in_threadpool(rows.result, outputs), headers


def _vector_out(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # what the openai client decodes: little-endian float32 bytes
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _truncation(state: ServerState, rows, record: dict) -> dict[str, str]:
    """Count inputs and tokens (and what truncation cut) in the metrics, the log line and the headers."""
    metrics = state.metrics
    inputs, tokens = len(rows.cut), rows.row_tokens  # rows.rows may hold several windows of an input
    cut_inputs, cut_tokens = sum(1 for c in rows.cut if c), sum(rows.cut)
    metrics.inputs.inc(inputs)
    metrics.tokens.inc(tokens)
    if cut_inputs:
        metrics.truncated_inputs.inc(cut_inputs)
        metrics.truncated_tokens.inc(cut_tokens)
    record.update(inputs=inputs, tokens=tokens, truncated_inputs=cut_inputs)
    return {TRUNCATED_INPUTS_HEADER: str(cut_inputs), TRUNCATED_TOKENS_HEADER: str(cut_tokens)}


def _answer(state: ServerState, data: list, rows, headers: dict) -> JSONResponse:
    """The OpenAI list body; ``usage`` counts the tokens the model ran ([CLS], [SEP], prompt included)."""
    tokens = rows.row_tokens
    return JSONResponse({"object": "list", "data": data, "model": state.settings.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers)


# -- endpoints ----------------------------------------------------------------------------------------


def _routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            raise ApiError(503, "shutting down", type="server_error", code="shutting_down")
        if state.load_error:
            raise ApiError(503, f"the model failed to load: {state.load_error}", type="server_error",
                           code="load_failed")
        _require_ready(state)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/info")
    async def info():
        model = _require_ready(state)
        manifest = model.source / "dewey_export.json"
        return {
            "model": settings.name,
            "backend": settings.backend,
            "device": settings.device or "cpu",
            "precision": model.precision(),
            "vector_size": model.config.vector_size,
            "modes": list(SINGLE_VECTOR_TYPES),
            "default_mode": model.config.single_vector_type,
            "prompts": sorted(model.config.prompts),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
            "limits": {
                "max_input_tokens": state.max_input_tokens,
                "max_batch_tokens": settings.max_batch_tokens,
                "max_queue_tokens": settings.max_queue_tokens,
                "max_payload_bytes": settings.max_payload_bytes,
                "max_inputs": schema.MAX_INPUTS,
                "model_max_positions": model.config.max_position_embeddings,
            },
            "truncate_default": settings.truncate,
        }

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": 0,
                                             "owned_by": "dewey"}]}

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    async def embeddings(request: Request):
        model = _require_ready(state)
        body = await _body(request, settings.max_payload_bytes)

        def prepare():
            req = schema.embedding_request(schema.parse_json(body), model.config.vector_size,
                                           model.config.matryoshka_dimensions)
            _check_model(state, req.model)
            try:
                mode = model.mode(req.mode)
                truncate = settings.truncate if req.truncate is None else req.truncate
                if req.inputs.texts is not None:
                    rows = model.plan_texts(req.inputs.texts, mode, req.prompt, state.max_input_tokens, truncate,
                                            req.dimensions)
                else:
                    rows = model.id_rows(req.inputs.ids, mode, req.prompt, state.max_input_tokens, truncate)
            except InputError as exc:
                raise exc.api_error() from None
            return req, rows

        req, rows = await run_in_threadpool(prepare)
        vectors, headers = await _answer_rows(request, state, rows)
        if vectors is None:
            return Response(status_code=CLIENT_GONE)
        if req.dimensions is not None and req.inputs.texts is None:
            vectors = truncate_dimensions(vectors, req.dimensions, model.config.matryoshka_dimensions, True)
        data = [{"object": "embedding", "index": i, "embedding": _vector_out(v, req.encoding_format)}
                for i, v in enumerate(np.atleast_2d(vectors))]
        return _answer(state, data, rows, headers)

    @app.post("/v1/embeddings/chunks")
    async def chunks(request: Request):
        model = _require_ready(state)
        body = await _body(request, settings.max_payload_bytes)

        def prepare():
            req = schema.chunks_request(schema.parse_json(body), DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_OVERLAP)
            _check_model(state, req.model)
            try:
                model.check_chunk_args(req.chunk_size, req.chunk_overlap, req.splitter)
                mode = model.mode(req.mode)
                # A document over the input limit runs in windows of it (Encoder.encode_chunks): nothing is
                # cut, so "truncate" changes nothing here.
                rows = model.plan_chunks(req.texts, mode, req.prompt, state.max_input_tokens, req.chunk_size,
                                         req.chunk_overlap, req.splitter)
            except InputError as exc:
                raise exc.api_error() from None
            return req, rows

        req, rows = await run_in_threadpool(prepare)
        documents, headers = await _answer_rows(request, state, rows)
        if documents is None:
            return Response(status_code=CLIENT_GONE)
        data = []
        for i, doc in enumerate(documents):
            data.append({
                "object": "document", "index": i, "embedding": _vector_out(doc.vector, req.encoding_format),
                "truncated_tokens": 0, "windows": doc.windows,
                "chunks": [{"object": "chunk", "index": j, "embedding": _vector_out(v, req.encoding_format),
                            "text": text, "token_span": [int(s), int(e)], "char_span": [int(a), int(b)]}
                           for j, (v, text, (s, e), (a, b)) in enumerate(zip(doc.vectors, doc.texts, doc.token_spans,
                                                                             doc.char_spans))],
            })
        return _answer(state, data, rows, headers)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        model = _require_ready(state)
        body = await _body(request, settings.max_payload_bytes)

        def prepare():
            req = schema.tokenize_request(schema.parse_json(body))
            try:
                prompt_ids = model.prompt_ids(req.prompt)
                tokens = model.tokenize(req.texts)
            except InputError as exc:
                raise exc.api_error() from None
            return prompt_ids, tokens

        prompt_ids, tokens = await run_in_threadpool(prepare)
        data = [{"index": i, "ids": t.ids.tolist(), "offsets": t.offsets.tolist(), "tokens": len(t.ids),
                 "row_tokens": len(t.ids) + len(prompt_ids) + 2} for i, t in enumerate(tokens)]
        return {"object": "list", "data": data, "prompt_tokens": len(prompt_ids),
                "max_input_tokens": state.max_input_tokens}
