"""The HTTP/1.1 server protocol: parse requests with httptools, call the app, answer in order.

One ``HttpProtocol`` per connection. Bytes go to an ``httptools.HttpRequestParser`` whose callbacks
assemble an ``HttpRequest``; on message completion the app's ``handle`` is called right there,
inside ``data_received``. A handler that returns an ``HttpResponse`` is the fast path: when no
earlier response is pending its bytes are written at once, with no Task, no timer and no queue.
A handler that returns a ``DeferredResponse`` gets a slot in the connection's response queue and
fills it when it resolves (no Task); one that returns an awaitable gets a Task and a slot. Later
responses (sync or deferred) wait in that queue so pipelined requests are answered in order.
The queue is flushed from the front whenever a slot becomes ready.

Timeline of one connection::

    accept ── idle timer armed (re-armed lazily from the last activity, never per request)
      first byte of a request ── if the request is still incomplete when ``data_received``
        returns, a request timer is armed (a complete request in one segment costs no timer)
      headers complete ── 413 on a declared length over the limit; ``100 Continue`` if asked
      body complete ── request timer cancelled; app called; response written or queued
      response queue empty and no partial request for ``idle_timeout_s`` ── connection closed

Errors the transport detects itself (400 malformed, 408 slow request, 413 body, 431 headers) are
queued after any pending responses, carry ``connection: close`` and stop parsing. Flow control:
reading pauses while ``max_pipelined`` responses are pending or the transport's write buffer is
over its high-water mark, and resumes when both clear. Bytes already received are still parsed,
so the queue can exceed ``max_pipelined`` by what one read delivered.

Concurrency: everything here runs on the event loop thread; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools

from rtbserve.transports.http.wire import CONTINUE_100, encode_response, error_body

log = logging.getLogger(__name__)

# header name as sent -> lower-case str; clients repeat the same few names on every request
_HEADER_NAMES: dict[bytes, str] = {}
_HEADER_NAMES_MAX = 1024  # bounds what clients sending random names can make it hold


@dataclass(slots=True)
class HttpRequest:
    """One parsed request. ``path`` and ``query`` are the raw (not percent-decoded) URL parts;
    header names are lower-case and repeated headers are joined with ``", "``."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


class DeferredResponse:
    """A response the app completes later with ``resolve(response)``, on the loop thread (for
    example from a micro-batcher callback). Unlike an awaitable it needs no Task and no extra
    loop iteration: resolving writes the response (in order) right away. Resolving after the
    connection is gone is a no-op."""

    __slots__ = ("_on_resolve", "_early")

    def __init__(self) -> None:
        self._on_resolve: Any = None
        self._early: HttpResponse | None = None

    def resolve(self, response: HttpResponse) -> None:
        callback = self._on_resolve
        if callback is None:
            self._early = response  # resolved before the transport attached
        else:
            self._on_resolve = None
            callback(response)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection limits. ``request_timeout_s`` runs from a request's first byte to its
    complete body (slow-client protection); ``idle_timeout_s`` closes keep-alive connections with
    nothing in flight; ``max_pipelined`` pending responses pause reading."""

    max_body_bytes: int = 6 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 60.0
    max_pipelined: int = 64


class HttpApp(Protocol):
    def handle(
        self, request: HttpRequest
    ) -> HttpResponse | DeferredResponse | Awaitable[HttpResponse]: ...


_INTERNAL_ERROR = HttpResponse(
    500, error_body(500, "internal", "internal error"), "application/json"
)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer ``status``, then close."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class _StopParsing(Exception):
    """Raised inside a parser callback when input after a closing response must be ignored."""


class _Slot:
    """One response position in a connection's queue; ``data`` is None until it is ready."""

    __slots__ = ("data", "close", "task")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close
        self.task: asyncio.Future[Any] | None = None


class HttpServerState:
    """The live connections of one server, for draining. Loop thread only.

    ``accepted_total`` counts every connection ever accepted (for tests and metrics).
    """

    def __init__(self) -> None:
        self.connections: set[HttpProtocol] = set()
        self.server: asyncio.base_events.Server | None = None
        self.is_shutting_down = False
        self.accepted_total = 0
        self._all_closed: asyncio.Event | None = None

    def _on_connection_lost(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (see the module docstring for its life cycle)."""

    def __init__(
        self,
        app: HttpApp,
        limits: HttpLimits,
        state: HttpServerState,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._handle = app.handle
        self._limits = limits
        self._max_pipelined = limits.max_pipelined
        self._state = state
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Slot] = deque()
        self._is_closing = False  # a closing response is queued or the transport is closing
        self._is_lost = False
        self._is_reading_paused = False
        self._is_writing_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        # The request being parsed.
        self._in_message = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body_parts: list[bytes] = []
        self._body_bytes = 0
        self._method = ""
        self._keep_alive = True
        self._is_http10 = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._state.connections.add(self)
        self._state.accepted_total += 1
        self._last_activity = now = self._loop.time()
        self._idle_timer = self._loop.call_at(now + self._limits.idle_timeout_s, self._on_idle)
        if self._state.is_shutting_down:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._is_closing = self._is_lost = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        for slot in self._queue:
            if slot.task is not None:
                slot.task.cancel()
        self._queue.clear()
        self._state._on_connection_lost(self)

    def data_received(self, data: bytes) -> None:
        if self._is_closing:
            return
        self._last_activity = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.error_type, cause.message)
            elif not isinstance(cause, _StopParsing):
                log.error("HTTP parser callback failed", exc_info=cause)
                self._reject(500, "internal", "internal error")
            return
        except httptools.HttpParserUpgrade:
            # The upgrading request was already answered with connection: close; this transport
            # does not switch protocols, so whatever follows is not HTTP/1.1 and is dropped.
            self._is_closing = True
            return
        except httptools.HttpParserError as exc:
            self._reject(400, "bad_request", f"malformed HTTP request: {exc}")
            return
        if self._in_message and self._request_timer is None and not self._is_closing:
            self._request_timer = self._loop.call_later(
                self._limits.request_timeout_s, self._on_request_timeout
            )

    def eof_received(self) -> bool | None:
        # A client that half-closes is treated as gone (as uvicorn does): returning None closes
        # the transport, and connection_lost cancels any pending handlers.
        return None

    def pause_writing(self) -> None:
        self._is_writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._is_writing_paused = False
        self._update_reading()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._is_closing:
            raise _StopParsing
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body_parts = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            self._reject_headers_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes:
            self._reject_headers_too_large()
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
                _HEADER_NAMES[name] = key
        text = value.decode("latin-1")
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._method = parser.get_method().decode("ascii")
        self._keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        self._is_http10 = parser.get_http_version() == "1.0"
        headers = self._headers
        declared = headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise _Reject(400, "bad_request", f"invalid content-length {declared!r}") from None
            if declared_bytes > self._limits.max_body_bytes:
                raise _Reject(
                    413,
                    "payload_too_large",
                    f"body of {declared_bytes} bytes exceeds the limit of "
                    f"{self._limits.max_body_bytes} bytes",
                )
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and not self._queue:
            # With earlier responses still pending, 100 would jump the queue; RFC 9110 lets a
            # server omit it, and the client then sends the body after its own short wait.
            self._transport.write(CONTINUE_100)  # type: ignore[union-attr]  # syscall

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Reject(
                413,
                "payload_too_large",
                f"body exceeds the limit of {self._limits.max_body_bytes} bytes",
            )
        self._body_parts.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        parts = self._body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        path, _, query = self._url.partition(b"?")
        request = HttpRequest(
            self._method,
            path.decode("latin-1"),
            query.partition(b"#")[0].decode("latin-1") if query else "",
            self._headers,
            body,
            self._keep_alive,
        )
        self._dispatch(request)

    # -- requests and responses ----------------------------------------------------------

    def _dispatch(self, request: HttpRequest) -> None:
        close = not request.keep_alive or self._state.is_shutting_down
        if close:
            self._is_closing = True  # input after this request is ignored
        try:
            result = self._handle(request)
        except Exception:
            log.exception("HTTP handler failed for %s %s", request.method, request.path)
            result = _INTERNAL_ERROR
        if isinstance(result, HttpResponse):
            data = self._encode(result, request, close)
            if not self._queue:
                self._write(data, close)  # the fast path: no task, no queue
                return
            self._queue.append(_Slot(data, close))
        elif type(result) is DeferredResponse:
            slot = _Slot(None, close)
            self._queue.append(slot)
            early = result._early
            if early is not None:
                self._on_deferred_done(slot, request, early)
                return
            result._on_resolve = functools.partial(self._on_deferred_done, slot, request)
        else:
            slot = _Slot(None, close)
            slot.task = task = asyncio.ensure_future(result, loop=self._loop)
            task.add_done_callback(functools.partial(self._on_handler_done, slot, request))
            self._queue.append(slot)
        if len(self._queue) >= self._max_pipelined or self._is_reading_paused:
            self._update_reading()  # (paused writing already paused reading)

    def _encode(self, response: HttpResponse, request: HttpRequest, close: bool) -> bytes:
        try:
            return encode_response(
                response.status,
                response.body,
                response.content_type,
                response.headers,
                close=close,
                http10_keep_alive=self._is_http10 and not close,
                omit_body=request.method == "HEAD",
            )
        except (ValueError, TypeError):
            log.exception("HTTP handler returned an unencodable response for %s", request.path)
            return self._encode(_INTERNAL_ERROR, request, close)

    def _on_handler_done(self, slot: _Slot, request: HttpRequest, task: asyncio.Future) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # always retrieved, so asyncio never warns about it
        if self._is_lost:
            return
        if exc is not None:
            log.error("HTTP handler failed for %s %s", request.method, request.path, exc_info=exc)
            response = _INTERNAL_ERROR
        else:
            response = task.result()
            if not isinstance(response, HttpResponse):
                log.error(
                    "HTTP handler for %s returned %s, expected HttpResponse",
                    request.path,
                    type(response).__name__,
                )
                response = _INTERNAL_ERROR
        slot.data = self._encode(response, request, slot.close)
        slot.task = None
        self._flush()

    def _on_deferred_done(self, slot: _Slot, request: HttpRequest, response: HttpResponse) -> None:
        if self._is_lost or slot.data is not None:
            return
        queue = self._queue
        if len(queue) == 1 and queue[0] is slot and not slot.close:
            # the common case, one response in flight: write it now (what _flush would do)
            queue.pop()
            self._transport.write(self._encode(response, request, False))  # type: ignore[union-attr]  # syscall
            self._last_activity = self._loop.time()
            if self._state.is_shutting_down and not self._in_message:
                self._close()
            elif self._is_reading_paused:
                self._update_reading()
            return
        slot.data = self._encode(response, request, slot.close)
        self._flush()

    def _flush(self) -> None:
        queue = self._queue
        while queue and queue[0].data is not None:
            slot = queue.popleft()
            self._write(slot.data, slot.close)  # type: ignore[arg-type]
            if slot.close:
                return
        if not queue:
            self._last_activity = self._loop.time()
            if self._state.is_shutting_down and not self._in_message:
                self._close()
                return
        self._update_reading()

    def _write(self, data: bytes, close: bool) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(data)  # syscall
        if close:
            self._close()

    def _close(self) -> None:
        self._is_closing = True
        for slot in self._queue:
            if slot.task is not None:
                slot.task.cancel()
        self._queue.clear()
        if self._transport is not None:
            self._transport.close()  # flushes the write buffer first

    def _reject(self, status: int, error_type: str, message: str) -> None:
        """Answer a transport-level error after any pending responses, then close."""
        log.info("HTTP %d %s: %s", status, error_type, message)
        self._is_closing = True
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        data = encode_response(
            status, error_body(status, error_type, message), "application/json", None, close=True
        )
        self._queue.append(_Slot(data, True))
        self._flush()

    def _reject_headers_too_large(self) -> None:
        raise _Reject(
            431,
            "header_too_large",
            f"request line and headers exceed {self._limits.max_header_bytes} bytes",
        )

    def _update_reading(self) -> None:
        if (
            not self._is_reading_paused
            and not self._is_writing_paused
            and len(self._queue) < self._limits.max_pipelined
        ):
            return  # the common case: reading and should keep reading
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        should_pause = self._is_writing_paused or len(self._queue) >= self._limits.max_pipelined
        if should_pause != self._is_reading_paused:
            self._is_reading_paused = should_pause
            if should_pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # -- timers and draining -------------------------------------------------------------

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._is_closing:
            return
        now = self._loop.time()
        idle_s = self._limits.idle_timeout_s
        if self._in_message or self._queue:
            deadline = now + idle_s  # busy: the request timer or the handler governs
        else:
            deadline = self._last_activity + idle_s
            if deadline <= now:
                self._close()
                return
        self._idle_timer = self._loop.call_at(deadline, self._on_idle)

    def _on_request_timeout(self) -> None:
        self._request_timer = None
        if self._in_message and not self._is_closing:
            self._reject(
                408,
                "request_timeout",
                f"request not complete within {self._limits.request_timeout_s} s",
            )

    def close_if_idle(self) -> None:
        """Close now when nothing is in flight; otherwise the last response closes it."""
        if not self._queue and not self._in_message:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def start_http_server(
    app: HttpApp,
    host: str | None,
    port: int,
    *,
    limits: HttpLimits | None = None,
    reuse_port: bool = False,
    sock: Any = None,
    state: HttpServerState | None = None,
    backlog: int = 2048,
) -> asyncio.base_events.Server:
    """Listen on ``host:port`` (or an already bound ``sock``) and serve ``app`` over HTTP/1.1.

    ``app.handle(request)`` is called on the loop thread for every request; it returns an
    ``HttpResponse`` (fast path, no Task) or an awaitable of one. Pass ``state`` to be able to
    ``shutdown(state, timeout_s)`` later; ``state.server`` is set to the returned server.
    """
    loop = asyncio.get_running_loop()
    limits = limits if limits is not None else HttpLimits()
    state = state if state is not None else HttpServerState()

    def protocol_factory() -> HttpProtocol:
        return HttpProtocol(app, limits, state, loop)

    if sock is not None:
        server = await loop.create_server(protocol_factory, sock=sock, backlog=backlog)
    else:
        server = await loop.create_server(
            protocol_factory, host, port, reuse_port=reuse_port, backlog=backlog
        )
    state.server = server
    return server


async def shutdown(state: HttpServerState, timeout_s: float) -> None:
    """Drain a server: stop accepting, close idle connections, let in-flight requests finish.

    Every response written from now on carries ``connection: close``. Connections still open
    after ``timeout_s`` seconds are aborted (their pending handlers are cancelled).
    """
    state.is_shutting_down = True
    if state.server is not None:
        state.server.close()
    for conn in list(state.connections):
        conn.close_if_idle()
    if state.connections:
        state._all_closed = asyncio.Event()
        try:
            await asyncio.wait_for(state._all_closed.wait(), timeout_s)
        except TimeoutError:
            log.warning("aborting %d HTTP connections still busy", len(state.connections))
            for conn in list(state.connections):
                conn.abort()
            # connection_lost runs on a later loop iteration.
            await asyncio.wait_for(state._all_closed.wait(), 1.0)
    if state.server is not None:
        await state.server.wait_closed()
