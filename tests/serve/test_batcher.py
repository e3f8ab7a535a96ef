"""The batcher alone, with a stand-in forward: a short row is answered while a long one is still running,
rows of several requests share a batch and come back to each request in order, the queue refuses what
would overflow it, and a cancelled request's rows never run."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from dewey_serve.batcher import Batcher, QueueFull, TooLarge
from runtimes.batching import DEFAULT_LONG_THRESHOLD

TIMEOUT_S = 30


class Forward:
    """Returns each row's first id as its 'cls' and span vector; rows longer than ``block_over`` wait
    until ``release`` is set. Records the batches it ran."""

    def __init__(self, block_over: int | None = None):
        self.block_over = block_over
        self.release = threading.Event()
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, rows, spans):
        with self.lock:
            self.batches.append([int(r[0]) for r in rows])
        if self.block_over is not None and max(len(r) for r in rows) > self.block_over:
            assert self.release.wait(TIMEOUT_S)
        cls = np.array([[float(r[0])] for r in rows])
        return cls, [np.array([[float(r[0])]] * len(s)) for s, r in zip(spans, rows)]


def rows_of(tag: int, lengths) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rows = [np.full(n, tag * 1000 + i, dtype=np.int64) for i, n in enumerate(lengths)]
    return rows, [np.array([[1, n - 1]]) for n in lengths]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


def test_a_short_row_does_not_wait_for_a_long_one():
    forward = Forward(block_over=DEFAULT_LONG_THRESHOLD)
    batcher = Batcher(forward, max_batch_tokens=16384, max_queue_tokens=100_000)
    batcher.start()

    async def main():
        loop = asyncio.get_running_loop()
        long_ticket = batcher.submit(*rows_of(1, [DEFAULT_LONG_THRESHOLD + 100]), loop)
        while not forward.batches:  # the long row is running (and blocked)
            await asyncio.sleep(0.01)
        short = await batcher.submit(*rows_of(2, [32]), loop).future
        assert not long_ticket.future.done()  # answered while the long one still runs
        forward.release.set()
        return short, await long_ticket.future

    try:
        short, long = run(main())
    finally:
        forward.release.set()
        batcher.close()
    assert short[0][0][0] == 2000 and long[0][0][0] == 1000


def test_requests_share_batches_and_get_their_rows_in_order():
    forward = Forward(block_over=0)  # the first batch blocks until every request is queued
    batcher = Batcher(forward, max_batch_tokens=16384, max_queue_tokens=100_000)
    batcher.start()
    lengths = {tag: [8 + (tag * 37 + i * 91) % 400 for i in range(5 + tag)] for tag in range(1, 6)}

    async def main():
        loop = asyncio.get_running_loop()
        first = batcher.submit(*rows_of(9, [16]), loop)
        while not forward.batches:
            await asyncio.sleep(0.01)
        tickets = {tag: batcher.submit(*rows_of(tag, n), loop) for tag, n in lengths.items()}
        forward.release.set()
        await first.future
        return {tag: await t.future for tag, t in tickets.items()}

    try:
        answers = run(main())
    finally:
        forward.release.set()
        batcher.close()
    for tag, results in answers.items():
        assert [int(cls[0]) for cls, _ in results] == [tag * 1000 + i for i in range(len(lengths[tag]))]
    shared = [b for b in forward.batches[1:] if len({row // 1000 for row in b}) > 1]
    assert shared, forward.batches  # rows of different requests ran together


def test_queue_limits_and_cancel():
    forward = Forward(block_over=0)
    batcher = Batcher(forward, max_batch_tokens=16384, max_queue_tokens=1000)
    batcher.start()

    async def main():
        loop = asyncio.get_running_loop()
        running = batcher.submit(*rows_of(1, [100]), loop)
        while not forward.batches:
            await asyncio.sleep(0.01)
        with pytest.raises(TooLarge):
            batcher.submit(*rows_of(2, [600, 600]), loop)
        waiting = batcher.submit(*rows_of(3, [300, 300]), loop)
        assert batcher.queued_tokens == 600
        with pytest.raises(QueueFull) as caught:
            batcher.submit(*rows_of(4, [500]), loop)
        assert caught.value.retry_after >= 1
        batcher.cancel(waiting)
        assert batcher.queued_tokens == 0
        later = batcher.submit(*rows_of(5, [500]), loop)  # fits again
        forward.release.set()
        await running.future
        await later.future
        return waiting

    try:
        waiting = run(main())
    finally:
        forward.release.set()
        batcher.close()
    assert not waiting.future.done()
    ran = {row // 1000 for batch in forward.batches for row in batch}
    assert ran == {1, 5}  # the cancelled request's rows never ran
