"""gRPC clients on grpc.aio: unary ``Predict`` calls, and ``PredictStream`` bidi streams.

Both send pre-serialised request bytes (no request serializer) over ``channels`` channels per
process; each channel is its own TCP connection (``grpc.use_local_subchannel_pool``), so several
channels spread over SO_REUSEPORT server processes.

- Unary: ``slots`` coroutines, each making one call at a time, round-robin over the channels.
  A due request goes to a free slot or waits in a FIFO queue (the wait counts in its latency).
  Responses are not decoded: a call that ends OK is a success.
- Stream: ``slots`` long-lived streams, each with at most ``depth`` messages in flight. Every
  message carries a fresh ``request_id``; answers are matched by it and may come in any order.
  An answer whose id is not outstanding on that stream is a ``mismatched_id`` error; an answer
  with ``error`` set is a ``status`` error.

gRPC status codes map to error kinds: DEADLINE_EXCEEDED -> timeout, UNAVAILABLE -> connection,
anything else -> status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from time import monotonic_ns
from typing import Any

import grpc
import grpc.aio

from bench.loadgen.stats import Recorder
from bench.loadgen.targets import (
    PREDICT_METHOD,
    STREAM_METHOD,
    Target,
    grpc_request_base,
    predictor_pb2,
    request_id_field,
)

CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
    ("grpc.enable_retries", 0),
)
_CONNECT_TIMEOUT_S = 10.0
_RESTART_DELAY_S = 0.05


def status_to_kind(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "connection"
    return "status"


async def _open_channels(target: Target, n: int) -> list[grpc.aio.Channel]:
    address = f"{target.host}:{target.port}"
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(n)]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in channels)), _CONNECT_TIMEOUT_S
        )
    except BaseException:
        for ch in channels:
            await ch.close()
        raise
    return channels


class UnaryPool:
    """``slots`` concurrent unary calls over ``channels`` channels; same driving API as HttpPool."""

    slot_name = "in-flight unary calls"

    def __init__(
        self, target: Target, slots: int, rec: Recorder, *, timeout_s: float, channels: int
    ) -> None:
        self.target = target
        self.n_slots = slots
        self.n_channels = max(1, min(channels, slots))
        self.rec = rec
        self.timeout_s = timeout_s
        self.timeout_ns = int(timeout_s * 1e9)
        self.request = grpc_request_base(target) + request_id_field(b"u")
        self.channels: list[grpc.aio.Channel] = []
        self.free: deque[asyncio.Future[int | None]] = deque()
        self.queue: deque[int] = deque()
        self.busy = 0
        self.closed_loop = False
        self.closing = False
        self.on_idle: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def outstanding(self) -> int:
        return self.busy + len(self.queue)

    async def open(self) -> None:
        self.channels = await _open_channels(self.target, self.n_channels)
        calls = [ch.unary_unary(PREDICT_METHOD) for ch in self.channels]
        loop = asyncio.get_running_loop()
        for i in range(self.n_slots):
            self._tasks.append(loop.create_task(self._slot(calls[i % len(calls)])))
        # every slot parks itself in ``free`` on its first step
        while len(self.free) < self.n_slots:
            await asyncio.sleep(0)

    def dispatch(self, intended_ns: int) -> None:
        if self.free:
            self.free.popleft().set_result(intended_ns)
        else:
            self.queue.append(intended_ns)

    def start_closed_loop(self) -> None:
        self.closed_loop = True
        now = monotonic_ns()
        while self.free:
            self.dispatch(now)

    async def _park(self) -> int | None:
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.free.append(fut)
        if self.busy == 0 and not self.queue and self.on_idle is not None:
            self.on_idle()
        return await fut

    async def _slot(self, call: Any) -> None:
        rec = self.rec
        request = self.request
        timeout = self.timeout_s
        intended = await self._park()
        while intended is not None:
            sent = monotonic_ns()
            self.busy += 1
            try:
                await call(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                kind = status_to_kind(exc.code())
                rec.error(kind, answered=kind != "timeout")
            else:
                rec.ok(intended, sent, monotonic_ns())
            finally:
                self.busy -= 1
            now = monotonic_ns()
            if self.queue:
                intended = self.queue.popleft()
            elif self.closed_loop and now < rec.window_end_ns:
                intended = now
            else:
                intended = await self._park()

    def expire(self, now_ns: int) -> None:
        """Fail queued requests older than the timeout (in-flight calls carry a gRPC deadline)."""
        limit = now_ns - self.timeout_ns
        q = self.queue
        while q and q[0] < limit:
            q.popleft()
            self.rec.error("timeout", answered=False)

    def abandon(self) -> int:
        n = self.outstanding
        for _ in range(n):
            self.rec.error("timeout", answered=False)
        self.queue.clear()
        return n

    async def close(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in self.channels:
            await ch.close()


class StreamMatcher:
    """The requests outstanding on one stream, by ``request_id``; answers may come in any order."""

    __slots__ = ("pending", "expired")

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, int]] = {}
        self.expired: set[str] = set()

    def expect(self, request_id: str, intended_ns: int, sent_ns: int) -> None:
        self.pending[request_id] = (intended_ns, sent_ns)

    def match(self, request_id: str) -> tuple[int, int] | None:
        """(intended_ns, sent_ns) of the request this answer belongs to; None for a stray id."""
        return self.pending.pop(request_id, None)

    def is_late(self, request_id: str) -> bool:
        """An answer to a request that already failed as a timeout (not a mismatch)."""
        if request_id in self.expired:
            self.expired.discard(request_id)
            return True
        return False

    def expire(self, older_than_ns: int) -> int:
        """Drop requests sent before ``older_than_ns``; returns how many."""
        old = [rid for rid, (_, sent) in self.pending.items() if sent < older_than_ns]
        for rid in old:
            del self.pending[rid]
        self.expired.update(old)
        return len(old)


class _Stream:
    __slots__ = ("call", "matcher", "outbox", "wake", "inflight", "in_free", "tasks")

    def __init__(self) -> None:
        self.call: Any = None
        self.matcher = StreamMatcher()
        self.outbox: deque[bytes] = deque()
        self.wake: asyncio.Future[None] | None = None
        self.inflight = 0
        self.in_free = False
        self.tasks: list[asyncio.Task[None]] = []


class StreamPool:
    """``slots`` bidi streams, ``depth`` messages in flight on each; same API as HttpPool."""

    slot_name = "streams"

    def __init__(
        self,
        target: Target,
        slots: int,
        rec: Recorder,
        *,
        timeout_s: float,
        channels: int,
        depth: int,
        id_prefix: str = "",
    ) -> None:
        self.target = target
        self.n_slots = slots
        self.n_channels = max(1, min(channels, slots))
        self.depth = max(1, depth)
        self.rec = rec
        self.timeout_ns = int(timeout_s * 1e9)
        self.base = grpc_request_base(target)
        self.id_prefix = id_prefix
        self.counter = 0
        self.channels: list[grpc.aio.Channel] = []
        self.streams: list[_Stream] = []
        self.free: deque[_Stream] = deque()  # streams with fewer than ``depth`` in flight
        self.queue: deque[int] = deque()
        self.busy = 0
        self.closed_loop = False
        self.closing = False
        self.on_idle: Callable[[], None] | None = None
        self._deserialize = predictor_pb2().PredictResponse.FromString

    @property
    def outstanding(self) -> int:
        return self.busy + len(self.queue)

    async def open(self) -> None:
        self.channels = await _open_channels(self.target, self.n_channels)
        for i in range(self.n_slots):
            s = _Stream()
            self.streams.append(s)
            self._start_stream(s, self.channels[i % len(self.channels)])
            s.in_free = True
            self.free.append(s)

    def _start_stream(self, s: _Stream, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(STREAM_METHOD, response_deserializer=self._deserialize)
        s.call = method()
        loop = asyncio.get_running_loop()
        s.tasks = [loop.create_task(self._writer(s)), loop.create_task(self._reader(s, channel))]

    def dispatch(self, intended_ns: int) -> None:
        if self.free:
            s = self.free[0]
            self._send(s, intended_ns, monotonic_ns())
            if s.inflight >= self.depth:
                self.free.popleft()
                s.in_free = False
            else:
                self.free.rotate(-1)  # round-robin over the streams with room
        else:
            self.queue.append(intended_ns)

    def start_closed_loop(self) -> None:
        self.closed_loop = True
        now = monotonic_ns()
        while self.free:
            self.dispatch(now)

    def _send(self, s: _Stream, intended_ns: int, now: int) -> None:
        self.counter += 1
        rid = f"{self.id_prefix}{self.counter}"
        s.matcher.pending[rid] = (intended_ns, now)
        s.inflight += 1
        self.busy += 1
        s.outbox.append(self.base + request_id_field(rid.encode()))  # allocates
        wake = s.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _writer(self, s: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not s.outbox:
                s.wake = loop.create_future()
                await s.wake
                continue
            try:
                await s.call.write(s.outbox.popleft())
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the stream broke: its reader counts the losses and restarts it

    async def _reader(self, s: _Stream, channel: grpc.aio.Channel) -> None:
        rec = self.rec
        matcher = s.matcher
        try:
            while True:
                resp = await s.call.read()
                if resp is grpc.aio.EOF:
                    break
                now = monotonic_ns()
                rid = resp.request_id
                times = matcher.match(rid)
                if times is None:
                    if not matcher.is_late(rid):
                        rec.error("mismatched_id")
                    continue
                if resp.HasField("error"):
                    rec.error("status")
                else:
                    rec.ok(times[0], times[1], now)
                self._settle(s, now)
            kind = "connection"  # the server ended the stream: what was outstanding is lost
        except grpc.aio.AioRpcError as exc:
            kind = status_to_kind(exc.code())
        if self.closing:
            return
        self._fail_stream(s, kind)
        await asyncio.sleep(_RESTART_DELAY_S)  # back off: the server may be down
        if not self.closing:
            self._restart(s, channel)

    def _settle(self, s: _Stream, now: int) -> None:
        s.inflight -= 1
        self.busy -= 1
        if self.queue:
            self._send(s, self.queue.popleft(), now)
        elif self.closed_loop and now < self.rec.window_end_ns:
            self._send(s, now, now)
        elif not s.in_free:
            s.in_free = True
            self.free.append(s)
        if self.busy == 0 and not self.queue and self.on_idle is not None:
            self.on_idle()

    def _fail_stream(self, s: _Stream, kind: str) -> None:
        n = len(s.matcher.pending)
        s.matcher.pending.clear()
        s.outbox.clear()
        for _ in range(n):
            self.rec.error(kind, answered=False)
        s.inflight -= n
        self.busy -= n

    def _restart(self, s: _Stream, channel: grpc.aio.Channel) -> None:
        for t in s.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        s.call.cancel()
        self._start_stream(s, channel)
        if not s.in_free:
            s.in_free = True
            self.free.append(s)
        self._pump()

    def expire(self, now_ns: int) -> None:
        limit = now_ns - self.timeout_ns
        q = self.queue
        while q and q[0] < limit:
            q.popleft()
            self.rec.error("timeout", answered=False)
        for s in self.streams:
            n = s.matcher.expire(limit)
            if n:
                for _ in range(n):
                    self.rec.error("timeout", answered=False)
                s.inflight -= n
                self.busy -= n
                if not s.in_free:
                    s.in_free = True
                    self.free.append(s)
        self._pump()

    def _pump(self) -> None:
        """Queued requests take any room that opened without an answer (expiry, restart)."""
        while self.queue and self.free:
            self.dispatch(self.queue.popleft())

    def abandon(self) -> int:
        n = self.outstanding
        for _ in range(n):
            self.rec.error("timeout", answered=False)
        self.queue.clear()
        for s in self.streams:
            s.matcher.pending.clear()
            s.inflight = 0
        self.busy = 0
        return n

    async def close(self) -> None:
        self.closing = True
        tasks = [t for s in self.streams for t in s.tasks]
        for s in self.streams:
            with contextlib.suppress(Exception):
                s.call.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in self.channels:
            await ch.close()
