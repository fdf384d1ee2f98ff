"""The micro-batcher: requests from every connection and transport coalesce into one kernel call.

One batcher per model per worker process, on that worker's event loop. The policy, as a
timeline (``|`` marks event-loop iterations; the kernel is the model's ``score(rows)``):

    idle:   | A arrives -> queued, flush scheduled with call_soon
            | (B, C decoded in the same iteration join the queue)
            | flush: [A, B, C] in one kernel call, answered           <- no timer, no added wait
    busy:   | D (10k rows) -> flush -> kernel runs in a thread (it releases the GIL)
            | E, F arrive -> queued (the kernel is busy: they gather)
            | ...       up to max_batch_rows rows, or until D's kernel returns
            | D done -> answered; [E, F] wait up to max_batch_delay_us for more rows
            | flush: [E, F, ...] in one kernel call

- A request goes at once when the kernel is idle: the flush runs in the same loop iteration, so
  the batcher adds no latency at low load (MLServer's fixed batch timer is the counter-example).
- Small batches (<= ``inline_max_rows``) run inline on the loop: a 1-64 row kernel call costs a
  few microseconds, less than a thread hand-off. Larger ones run in ``executor`` and mark the
  batcher busy; arrivals meanwhile gather for the next call, which starts when the kernel
  returns plus at most ``max_batch_delay_us`` (at once when ``max_batch_rows`` are waiting), so
  a queued request waits at most one kernel call plus that delay.
- Batches form earliest-deadline-first. A request whose deadline has passed when its batch forms
  is not computed: it fails with ``DeadlineExceeded`` (the dataplane may turn that into a
  fail-open default decision).
- The queue is bounded in rows: past ``max_queue_rows`` a submit raises ``Overloaded`` at once,
  before any work (transports shed before decoding when they can, using ``queue_rows``).

Not thread-safe: every method runs on the owning event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtbserve.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)


class _Pending:
    """One queued request. ``future`` (``submit``) or ``callback`` (``submit_callback``) gets
    the answer."""

    __slots__ = ("rows", "future", "callback", "abandoned", "enqueued")

    def __init__(
        self,
        rows: np.ndarray,
        future: asyncio.Future[Any] | None,
        callback: Callable[[np.ndarray | None, BaseException | None], None] | None,
        abandoned: Callable[[], bool] | None,
        enqueued: float,
    ) -> None:
        self.rows = rows
        self.future = future
        self.callback = callback
        self.abandoned = abandoned
        self.enqueued = enqueued  # clock seconds, for the queue metric

    def is_abandoned(self) -> bool:
        if self.future is not None:
            return self.future.done()
        return self.abandoned is not None and self.abandoned()

    def answer(self, scores: np.ndarray | None, exc: BaseException | None) -> None:
        if self.callback is not None:
            try:
                self.callback(scores, exc)
            except Exception:  # a transport bug must not stop the rest of the batch
                log.exception("micro-batcher callback failed")
            return
        fut = self.future
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(scores)
            else:
                fut.set_exception(exc)


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    deadline_misses: int = 0
    shed: int = 0
    largest_batch_rows: int = 0


class MicroBatcher:
    """Coalesces concurrent ``submit`` calls into one ``score`` call (see the module docstring).

    score: rows (n, F) float32 -> scores (n,) or (n, K); must be thread-safe when batches may
    exceed ``inline_max_rows`` (they then run in ``executor``).
    max_batch_rows: rows per kernel call (a single larger request still goes whole).
    max_batch_delay_us: while the kernel is busy, how long a flush may wait for more rows.
    max_queue_rows: rows waiting; beyond it ``submit`` raises ``Overloaded``.
    inline_max_rows: batches up to this size run on the event loop.
    metrics: records queue wait per request, kernel time and rows per call, queue depth.
    """

    def __init__(
        self,
        score: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_rows: int = 256,
        max_batch_delay_us: int = 500,
        max_queue_rows: int = 65_536,
        inline_max_rows: int = 512,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,  # rtbserve.metrics.ModelMetrics
    ) -> None:
        if max_batch_rows < 1 or max_queue_rows < 1:
            raise ValueError("max_batch_rows and max_queue_rows must be >= 1")
        self._score = score
        self.max_batch_rows = max_batch_rows
        self.max_batch_delay_s = max_batch_delay_us / 1e6
        self.max_queue_rows = max_queue_rows
        self.inline_max_rows = inline_max_rows
        self._executor = executor
        self._clock = clock
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None  # bound on the first submit
        # queued requests: (deadline, seq, pending) with a deadline, in a heap; the rest in order
        self._heap: list[tuple[float, int, _Pending]] = []
        self._fifo: deque[_Pending] = deque()
        self._seq = itertools.count()
        self._queue_rows = 0
        self._flush_scheduled = False
        self._busy = False
        self._busy_since = 0.0
        self.stats = BatcherStats()

    @property
    def queue_rows(self) -> int:
        """Rows waiting for a kernel call (for load shedding before decoding)."""
        return self._queue_rows

    def would_shed(self, n_rows: int = 1) -> bool:
        return self._queue_rows + n_rows > self.max_queue_rows

    def submit(self, rows: np.ndarray, deadline: float | None = None) -> asyncio.Future[Any]:
        """Queue ``rows`` (float32, (n, F)); the future resolves to their scores.

        deadline: absolute time on this batcher's clock (``time.monotonic`` by default).
        Raises ``Overloaded`` or ``DeadlineExceeded`` at once, before queueing.
        """
        loop = self._loop or self._bind_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._push(rows, deadline, fut, None, None)
        return fut

    def submit_callback(
        self,
        rows: np.ndarray,
        deadline: float | None,
        callback: Callable[[np.ndarray | None, BaseException | None], None],
        abandoned: Callable[[], bool] | None = None,
    ) -> None:
        """Like ``submit``, but ``callback(scores, None)`` or ``callback(None, exc)`` is called
        from the flush itself: no future, no extra loop iteration (the transports' fast path).
        ``abandoned()`` returning True (the caller went away) drops the rows unscored.
        Raises ``Overloaded`` or ``DeadlineExceeded`` at once, before queueing."""
        if self._loop is None:
            self._bind_loop()
        self._push(rows, deadline, None, callback, abandoned)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _push(
        self,
        rows: np.ndarray,
        deadline: float | None,
        fut: asyncio.Future[Any] | None,
        callback: Callable[[np.ndarray | None, BaseException | None], None] | None,
        abandoned: Callable[[], bool] | None,
    ) -> None:
        n = rows.shape[0]
        if self._queue_rows + n > self.max_queue_rows and self._queue_rows:
            self.stats.shed += 1
            raise Overloaded(
                f"queue full: {self._queue_rows} rows waiting (limit {self.max_queue_rows})"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            self.stats.deadline_misses += 1
            raise DeadlineExceeded("deadline already passed on arrival")
        pending = _Pending(rows, fut, callback, abandoned, now)
        if deadline is None:
            self._fifo.append(pending)  # no deadline: sorts after every deadline, in order
        else:
            heapq.heappush(self._heap, (deadline, next(self._seq), pending))
        self._queue_rows += n
        if not self._flush_scheduled and not self._busy:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    # -- internals -----------------------------------------------------------------------------

    def _take_batch(self) -> list[_Pending]:
        """Earliest deadline first: the heap, then the FIFO of requests with no deadline."""
        now = self._clock()
        batch: list[_Pending] = []
        rows = 0
        max_rows = self.max_batch_rows
        heap = self._heap
        while heap:
            deadline, _, head = heap[0]
            n = head.rows.shape[0]
            if batch and rows + n > max_rows:
                break
            heapq.heappop(heap)
            self._queue_rows -= n
            if head.is_abandoned():  # cancelled: the client went away
                continue
            if deadline <= now:
                self.stats.deadline_misses += 1
                head.answer(None, DeadlineExceeded("deadline passed while queued"))
                continue
            batch.append(head)
            rows += n
        fifo = self._fifo
        while fifo:
            head = fifo[0]
            n = head.rows.shape[0]
            if batch and rows + n > max_rows:
                break
            fifo.popleft()
            self._queue_rows -= n
            # is_abandoned(), inlined: this loop runs once per request
            if head.future is None:
                if head.abandoned is not None and head.abandoned():
                    continue
            elif head.future.done():
                continue
            batch.append(head)
            rows += n
        metrics = self._metrics
        if metrics is not None:
            observe = metrics.observe_queue_s
            for p in batch:
                observe(now - p.enqueued)
            metrics.set_queue_rows(self._queue_rows)
        return batch

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._busy:
            return
        batch = self._take_batch()
        if not batch:
            return
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        n = rows.shape[0]
        self.stats.batches += 1
        self.stats.rows += n
        self.stats.largest_batch_rows = max(self.stats.largest_batch_rows, n)
        if n <= self.inline_max_rows:
            t0 = time.perf_counter()
            try:
                scores = self._score(rows)  # releases GIL; microseconds at this size
            except BaseException as exc:
                _fail(batch, exc)
            else:
                if self._metrics is not None:
                    self._metrics.observe_predict_s(time.perf_counter() - t0, n)
                _answer(batch, scores)
            if self._queue_rows:
                self._schedule_flush(after_busy=False)
            return
        loop = self._loop or self._bind_loop()
        self._busy = True
        self._busy_since = self._clock()
        t0 = time.perf_counter()
        done = loop.run_in_executor(self._executor, self._score, rows)
        done.add_done_callback(lambda f: self._on_done(f, batch, n, t0))

    def _on_done(self, fut: asyncio.Future[Any], batch: list[_Pending], n: int, t0: float) -> None:
        self._busy = False
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:
            _fail(batch, exc)
        else:
            if self._metrics is not None:
                self._metrics.observe_predict_s(time.perf_counter() - t0, n)
            _answer(batch, fut.result())
        if self._queue_rows:
            self._schedule_flush(after_busy=True)

    def _schedule_flush(self, *, after_busy: bool) -> None:
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        loop = self._loop or self._bind_loop()
        if not after_busy or self._queue_rows >= self.max_batch_rows or self.max_batch_delay_s <= 0:
            loop.call_soon(self._flush)
        else:
            # load is high (the kernel was busy): gather a little longer for a fuller batch
            loop.call_later(self.max_batch_delay_s, self._flush)


def _answer(batch: list[_Pending], scores: np.ndarray) -> None:
    if len(batch) == 1:
        batch[0].answer(scores, None)
        return
    offset = 0
    for p in batch:
        n = p.rows.shape[0]
        callback = p.callback
        if callback is None:
            p.answer(scores[offset : offset + n], None)
        else:  # p.answer, inlined for the transports' callbacks: once per request
            try:
                callback(scores[offset : offset + n], None)
            except Exception:
                log.exception("micro-batcher callback failed")
        offset += n


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        p.answer(None, exc)
