"""Prometheus metrics of one server, in a registry of its own (several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency buckets, seconds: from a short query on a GPU (ms) to a long document on a CPU (s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Rows and requests per batch: powers of two up to runtimes.batching.DEFAULT_BATCH_SIZE (32).
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32)
# Padded tokens per batch, up to and past runtimes.batching.DEFAULT_MAX_BATCH_TOKENS (16,384).
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 131072)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dewey_serve_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.latency = Histogram("dewey_serve_request_seconds", "Time to answer a request, by path", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dewey_serve_requests_in_flight", "API requests being answered", registry=r)
        self.inputs = Counter("dewey_serve_inputs", "Inputs (texts or token-id lists) embedded", registry=r)
        self.tokens = Counter("dewey_serve_tokens", "Tokens run through the model ([CLS], [SEP], prompt included)",
                              registry=r)
        self.truncated_inputs = Counter("dewey_serve_truncated_inputs", "Inputs cut to --max-input-tokens "
                                        "because the request asked for truncation", registry=r)
        self.truncated_tokens = Counter("dewey_serve_truncated_tokens", "Tokens cut by truncation", registry=r)
        self.rejected = Counter("dewey_serve_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.cancelled = Counter("dewey_serve_cancelled", "Requests whose client went away before the answer",
                                 registry=r)
        self.queue_tokens = Gauge("dewey_serve_queue_tokens", "Tokens waiting for a batch", registry=r)
        self.queue_rows = Gauge("dewey_serve_queue_rows", "Rows (inputs) waiting for a batch", registry=r)
        self.batch_rows = Histogram("dewey_serve_batch_rows", "Rows per forward batch", ["lane"],
                                    buckets=COUNT_BUCKETS, registry=r)
        self.batch_requests = Histogram("dewey_serve_batch_requests", "Requests sharing one forward batch",
                                        ["lane"], buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("dewey_serve_batch_padded_tokens", "Padded tokens per forward batch",
                                      ["lane"], buckets=TOKEN_BUCKETS, registry=r)
        self.forward_seconds = Histogram("dewey_serve_forward_seconds", "Time of one forward batch", ["lane"],
                                         buckets=LATENCY_BUCKETS, registry=r)

    def observe_batch(self, lane: str, rows: int, requests: int, padded_tokens: int, seconds: float) -> None:
        self.batch_rows.labels(lane).observe(rows)
        self.batch_requests.labels(lane).observe(requests)
        self.batch_tokens.labels(lane).observe(padded_tokens)
        self.forward_seconds.labels(lane).observe(seconds)

    def queue_changed(self, tokens: int, rows: int) -> None:
        self.queue_tokens.set(tokens)
        self.queue_rows.set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
