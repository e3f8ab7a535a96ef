"""One batcher for every request: rows from concurrent requests share forward passes.

A request hands in its rows (one per input: ``[CLS] prompt text [SEP]``) and gets a ticket whose future
resolves, on the request's event loop, to each row's forward outputs in the request's own order. Rows
wait in one of two lanes, each served by its own worker thread:

- the **short lane** takes rows of at most ``long_threshold`` tokens (runtimes.batching's
  ``DEFAULT_LONG_THRESHOLD``, 2,048: the length above which the planner stops padding rows together);
- the **long lane** takes the longer rows (a 32k-token document runs there, alone or with rows of its
  exact length).

So a short query never queues behind a long document: while the long lane's worker spends seconds on
a 32k-token forward, the short lane's worker runs the query's batch beside it (the two share the CPU
cores, so the query's forward is slower than on an idle machine, but it does not wait for the
document to finish). Within a lane, whenever its worker is free, the batch is planned by the Encoder's
own padded-cost planner (``runtimes.batching.plan_batches``) over the oldest ``PLAN_WINDOW_ROWS``
waiting rows, and the planned batch that holds the oldest waiting row runs next: arrival order decides
who goes first (no request starves), the planner decides who rides along. A request's rows may be
split across batches and lanes; its answer is assembled in order.

Backpressure: the tokens of the rows waiting in both lanes are counted; a request that would take them
past ``max_queue_tokens`` is refused at once (``QueueFull``, with a retry delay estimated from the
measured throughput), one larger than the whole queue can never fit (``TooLarge``). A cancelled
ticket (its client went away) leaves the lanes at once; rows already in a running batch finish and
are dropped.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtimes.batching import DEFAULT_BATCH_SIZE, DEFAULT_LONG_THRESHOLD, plan_batches

# Waiting rows the planner looks at per batch: enough for it to find rows of like length to batch
# together (at 8..512-token texts, 256 rows hold ~16 rows per 32-token length band), few enough that
# planning (O(rows x batch_size) in Python, ~3 ms here) stays small beside a forward of a full batch.
PLAN_WINDOW_ROWS = 256
# Retry-After bounds, seconds: at least 1 (HTTP's unit), at most a minute (a client should look again).
MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S = 1, 60
# Weight of the newest batch in the throughput estimate behind Retry-After.
RATE_SMOOTHING = 0.2
SHORT, LONG = "short", "long"


class QueueFull(Exception):
    def __init__(self, queued: int, asked: int, limit: int, retry_after: int):
        super().__init__(f"the queue holds {queued} tokens and this request adds {asked}, over the limit of "
                         f"{limit} (--max-queue-tokens); retry in {retry_after} s")
        self.retry_after = retry_after


class TooLarge(Exception):
    def __init__(self, asked: int, limit: int):
        super().__init__(f"this request is {asked} tokens, more than the whole queue holds ({limit}, "
                         "--max-queue-tokens); send it in parts")


@dataclass(eq=False)
class Ticket:
    """One request's rows in the batcher; ``future`` gets [(cls [D], spans [C, D])] in row order."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    results: list
    remaining: int
    tokens: int
    cancelled: bool = False
    batches: int = 0  # forward passes that carried rows of this request
    entries: list = field(default_factory=list)


@dataclass(eq=False)
class _Entry:
    ticket: Ticket
    index: int
    row: np.ndarray
    spans: np.ndarray


class _Lane:
    def __init__(self, name: str, lock: threading.Lock):
        self.name = name
        self.waiting: list[_Entry] = []  # arrival order
        self.ready = threading.Condition(lock)
        self.thread: threading.Thread | None = None


class Batcher:
    """Packs rows of concurrent requests into forward passes (module docstring).

    ``forward(rows, spans) -> (cls [B, D], [spans [C_i, D]])`` runs one batch; ``observe`` (optional) is
    told of every batch: ``observe(lane, rows, requests, padded_tokens, seconds)``; ``queue_changed``
    (optional) of the waiting tokens and rows after every change.
    """

    def __init__(self, forward: Callable, max_batch_tokens: int, max_queue_tokens: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, long_threshold: int = DEFAULT_LONG_THRESHOLD,
                 observe: Callable | None = None, queue_changed: Callable | None = None):
        self._forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.batch_size = batch_size
        self.long_threshold = long_threshold
        self._observe = observe
        self._queue_changed = queue_changed
        self._lock = threading.Lock()
        self._lanes = {name: _Lane(name, self._lock) for name in (SHORT, LONG)}
        self.queued_tokens = 0
        self._rate: float | None = None  # tokens per second, smoothed
        self._closed = False

    def start(self) -> None:
        for lane in self._lanes.values():
            lane.thread = threading.Thread(target=self._work, args=(lane,), name=f"dewey-batcher-{lane.name}",
                                           daemon=True)
            lane.thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking rows; the workers finish what is waiting, then end."""
        with self._lock:
            self._closed = True
            for lane in self._lanes.values():
                lane.ready.notify_all()
        for lane in self._lanes.values():
            if lane.thread is not None:
                lane.thread.join(timeout)

    # -- the request side (event loop) -----------------------------------------------------------

    def submit(self, rows: list[np.ndarray], spans: list[np.ndarray], loop: asyncio.AbstractEventLoop) -> Ticket:
        tokens = sum(len(r) for r in rows)
        if tokens > self.max_queue_tokens:
            raise TooLarge(tokens, self.max_queue_tokens)
        ticket = Ticket(loop.create_future(), loop, [None] * len(rows), len(rows), tokens)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self.queued_tokens + tokens > self.max_queue_tokens:
                raise QueueFull(self.queued_tokens, tokens, self.max_queue_tokens, self._retry_after())
            touched = set()
            for index, (row, row_spans) in enumerate(zip(rows, spans)):
                lane = self._lanes[LONG if len(row) > self.long_threshold else SHORT]
                entry = _Entry(ticket, index, row, row_spans)
                ticket.entries.append(entry)
                lane.waiting.append(entry)
                touched.add(lane)
            self.queued_tokens += tokens
            for lane in touched:
                lane.ready.notify()
            self._report_queue()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a ticket's waiting rows (its client went away); rows in a running batch are ignored."""
        with self._lock:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            mine = set(map(id, ticket.entries))
            for lane in self._lanes.values():
                kept = [e for e in lane.waiting if id(e) not in mine]
                self.queued_tokens -= sum(len(e.row) for e in lane.waiting if id(e) in mine)
                lane.waiting = kept
            self._report_queue()

    def _retry_after(self) -> int:
        if not self._rate:
            return MIN_RETRY_AFTER_S
        return int(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, math.ceil(self.queued_tokens / self._rate))))

    def _report_queue(self) -> None:
        if self._queue_changed is not None:
            self._queue_changed(self.queued_tokens, sum(len(lane.waiting) for lane in self._lanes.values()))

    # -- the worker side (one thread per lane) ---------------------------------------------------

    def _next_batch(self, lane: _Lane) -> list[_Entry]:
        """The planned batch holding the lane's oldest waiting row (called under the lock)."""
        window = lane.waiting[:PLAN_WINDOW_ROWS]
        plan = plan_batches([len(e.row) for e in window], self.batch_size, self.max_batch_tokens,
                            self.long_threshold)
        chosen = next(batch for batch in plan if 0 in batch)
        picked = [window[i] for i in sorted(chosen)]
        taken = set(map(id, picked))
        lane.waiting = [e for e in lane.waiting if id(e) not in taken]
        self.queued_tokens -= sum(len(e.row) for e in picked)
        self._report_queue()
        return picked

    def _work(self, lane: _Lane) -> None:
        while True:
            with self._lock:
                while not lane.waiting and not self._closed:
                    lane.ready.wait()
                if not lane.waiting:
                    return
                batch = self._next_batch(lane)
            started = time.perf_counter()
            try:
                cls, spans = self._forward([e.row for e in batch], [e.spans for e in batch])
                error = None
            except Exception as exc:  # answered to every request in the batch; the worker goes on
                error = exc
            seconds = time.perf_counter() - started
            self._deliver(batch, cls if error is None else None, spans if error is None else None, error)
            tokens = sum(len(e.row) for e in batch)
            if error is None and seconds > 0:
                rate = tokens / seconds
                self._rate = rate if self._rate is None else (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * rate
            if self._observe is not None:
                width = max(len(e.row) for e in batch)
                self._observe(lane.name, len(batch), len({id(e.ticket) for e in batch}), width * len(batch), seconds)

    def _deliver(self, batch: list[_Entry], cls, spans, error) -> None:
        finished = []
        with self._lock:
            for ticket in {id(e.ticket): e.ticket for e in batch}.values():
                ticket.batches += 1
            for j, entry in enumerate(batch):
                ticket = entry.ticket
                if ticket.cancelled or ticket.future.done() or ticket.remaining == 0:
                    continue
                if error is not None:
                    ticket.remaining = 0
                    finished.append((ticket, error))
                    continue
                ticket.results[entry.index] = (cls[j], spans[j])
                ticket.remaining -= 1
                if ticket.remaining == 0:
                    finished.append((ticket, None))
        for ticket, exc in finished:
            try:
                ticket.loop.call_soon_threadsafe(_settle, ticket.future, ticket.results, exc)
            except RuntimeError:  # the loop is closed: the server is gone, nobody waits
                pass


def _settle(future: asyncio.Future, results: list, error: Exception | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is None:
        future.set_result(results)
    else:
        future.set_exception(error)
