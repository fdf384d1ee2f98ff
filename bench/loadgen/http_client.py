"""The HTTP/1.1 client: a pool of keep-alive connections, one request in flight on each.

Lean on purpose, because the client shares the machine's two cores with the server it measures:
a raw ``asyncio.Protocol``, one pre-built request written per send, and a response parser that
reads only the status code and ``content-length`` (no header objects, no body decoding).
Responses without a ``content-length`` (chunked, or close-delimited) are not supported: they
count as connection errors.

Pool policy: a due request goes to the least recently used free connection (FIFO, so load
spreads over every connection and hence over SO_REUSEPORT server processes); when none is free
it waits in a FIFO queue, and that wait is part of its latency. A request older than
``timeout_s`` fails as a timeout (its connection is aborted and reopened); a connection lost
mid-request fails it as a connection error, and so does a queued request that times out while
every connection is down (reconnects are retried every 50 ms and counted apart).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from time import monotonic_ns

from bench.loadgen.stats import Recorder
from bench.loadgen.targets import Target, http_request_bytes

_CONTENT_LENGTH = b"\r\ncontent-length:"
_RECONNECT_DELAY_S = 0.05


class _Conn(asyncio.Protocol):
    __slots__ = ("pool", "transport", "buf", "need", "status", "intended", "sent", "busy")

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1  # bytes of the whole response once its head is parsed; -1 before
        self.status = 0
        self.intended = 0
        self.sent = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()  # allocates; ~100 bytes
            i = head.find(_CONTENT_LENGTH)
            try:
                self.status = int(head[9:12])
                if i < 0:
                    raise ValueError("no content-length")
                j = head.find(b"\r\n", i + 17)
                self.need = end + 4 + int(head[i + 17 : j if j > 0 else end])
            except ValueError:
                self.buf = b""
                self.pool._on_broken(self)
                return
        if len(buf) < self.need:
            self.buf = buf
            return
        self.buf = buf[self.need :]  # empty unless the server sent something unasked
        self.need = -1
        if self.busy:
            self.pool._on_answer(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._on_lost(self)


class HttpPool:
    """``connections`` keep-alive connections to ``target`` on the running loop.

    Drive it with ``dispatch(intended_ns)`` (open loop) or ``start_closed_loop()``; every answer
    goes to ``rec``. Not thread-safe: loop thread only.
    """

    slot_name = "connections"

    def __init__(
        self, target: Target, connections: int, rec: Recorder, *, timeout_s: float
    ) -> None:
        self.target = target
        self.n_connections = connections
        self.rec = rec
        self.timeout_ns = int(timeout_s * 1e9)
        self.request = http_request_bytes(target)
        self.conns: list[_Conn] = []
        self.free: deque[_Conn] = deque()
        self.queue: deque[int] = deque()
        self.busy = 0
        self.closed_loop = False
        self.closing = False
        self.on_idle: Callable[[], None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def outstanding(self) -> int:
        return self.busy + len(self.queue)

    async def open(self) -> None:
        await asyncio.gather(*(self._connect() for _ in range(self.n_connections)))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Conn(self), self.target.host, self.target.port
        )  # syscall
        self.conns.append(conn)
        self._next(conn, monotonic_ns())

    def dispatch(self, intended_ns: int) -> None:
        if self.free:
            conn = self.free.popleft()
            conn.intended = intended_ns
            conn.sent = monotonic_ns()
            conn.busy = True
            self.busy += 1
            conn.transport.write(self.request)  # type: ignore[union-attr]  # syscall
        else:
            self.queue.append(intended_ns)

    def start_closed_loop(self) -> None:
        self.closed_loop = True
        now = monotonic_ns()
        while self.free:
            self.dispatch(now)

    def _next(self, conn: _Conn, now: int) -> None:
        if self.queue:
            intended = self.queue.popleft()
        elif self.closed_loop and now < self.rec.window_end_ns:
            intended = now
        else:
            self.free.append(conn)
            if self.busy == 0 and self.on_idle is not None:
                self.on_idle()
            return
        conn.intended = intended
        conn.sent = now
        conn.busy = True
        self.busy += 1
        conn.transport.write(self.request)  # type: ignore[union-attr]  # syscall

    def _on_answer(self, conn: _Conn, status: int) -> None:
        now = monotonic_ns()
        conn.busy = False
        self.busy -= 1
        if 200 <= status < 300:
            self.rec.ok(conn.intended, conn.sent, now)
        else:
            self.rec.error("status")
        self._next(conn, now)

    def _on_broken(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.abort()  # connection_lost counts the request

    def _on_lost(self, conn: _Conn) -> None:
        if conn.busy:
            conn.busy = False
            self.busy -= 1
            self.rec.error("connection", answered=False)
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        with contextlib.suppress(ValueError):
            self.free.remove(conn)
        if not self.closing:
            self._spawn(self._reconnect())
        elif self.busy == 0 and self.on_idle is not None:
            self.on_idle()

    async def _reconnect(self) -> None:
        while not self.closing:
            try:
                await self._connect()
                return
            except OSError:
                self.rec.connect_failures += 1
                await asyncio.sleep(_RECONNECT_DELAY_S)  # back off: the server may be restarting

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def expire(self, now_ns: int) -> None:
        """Fail requests older than the timeout: queued ones and in-flight ones."""
        limit = now_ns - self.timeout_ns
        q = self.queue
        # with every connection down, a request that could not be sent failed to connect
        kind = "timeout" if self.conns else "connection"
        while q and q[0] < limit:
            q.popleft()
            self.rec.error(kind, answered=False)
        for conn in list(self.conns):
            if conn.busy and conn.sent < limit:
                conn.busy = False
                self.busy -= 1
                self.rec.error("timeout", answered=False)
                if conn.transport is not None:
                    conn.transport.abort()

    def abandon(self) -> int:
        """End of run: every request still queued or in flight fails as a timeout."""
        n = self.outstanding
        kind = "timeout" if self.conns else "connection"
        for _ in range(n):
            self.rec.error(kind, answered=False)
        self.queue.clear()
        for conn in self.conns:
            conn.busy = False
        self.busy = 0
        return n

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        # let the transports' connection_lost run before the loop closes
        await asyncio.sleep(0)
        await asyncio.gather(*self._tasks, return_exceptions=True)
