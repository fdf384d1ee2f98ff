"""The HTTP/1.1 transport over real sockets: httpx for keep-alive, raw sockets for the wire edges.

Each test starts the server on 127.0.0.1 port 0 in a background thread running its own uvloop
loop (readiness is an Event, never a sleep), with a tiny echo app. Teardown drains the server
with ``shutdown`` and fails the test if anything reached the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx
import pytest
import uvloop

from rtbserve.transports.http import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServerState,
    shutdown,
    start_http_server,
)

WAIT_S = 5.0  # upper bound for any single wait; tests never sleep to synchronise


class EchoApp:
    """Sync echo by default; ``/async`` awaits 10 ms; ``/boom`` and ``/async-boom`` raise;
    ``/hang`` waits until cancelled (and records that it was)."""

    def __init__(self) -> None:
        self.sync_tasks: list[asyncio.Task[Any] | None] = []
        self.hang_started = threading.Event()
        self.hang_cancelled = threading.Event()
        self.release_hang: asyncio.Event | None = None

    def handle(self, request: HttpRequest) -> Any:
        path = request.path
        if path == "/async":
            return self._delayed(request)
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/async-boom":
            return self._async_boom()
        if path == "/hang":
            return self._hang(request)
        if path == "/headers":
            return HttpResponse(200, json.dumps(request.headers).encode(), "application/json")
        self.sync_tasks.append(asyncio.current_task())
        return self._echo(request, "sync")

    @staticmethod
    def _echo(request: HttpRequest, kind: str) -> HttpResponse:
        head = f"{kind} {request.method} {request.path}?{request.query}|".encode()
        return HttpResponse(200, head + request.body, "text/plain", [("x-kind", kind)])

    async def _delayed(self, request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(0.01)
        return self._echo(request, "async")

    async def _async_boom(self) -> HttpResponse:
        await asyncio.sleep(0)
        raise ValueError("async boom")

    async def _hang(self, request: HttpRequest) -> HttpResponse:
        self.release_hang = asyncio.Event()
        self.hang_started.set()
        try:
            await self.release_hang.wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return self._echo(request, "released")


@dataclass
class ServerThread:
    app: EchoApp
    limits: HttpLimits
    state: HttpServerState = field(default_factory=HttpServerState)
    loop_errors: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="http-test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            server = self.loop.run_until_complete(
                start_http_server(self.app, "127.0.0.1", 0, limits=self.limits, state=self.state)
            )
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "server did not start"
        if self._startup_error is not None:
            raise self._startup_error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT_S)

    def shutdown(self, timeout_s: float) -> None:
        asyncio.run_coroutine_threadsafe(shutdown(self.state, timeout_s), self.loop).result(
            timeout_s + WAIT_S
        )

    def stop(self) -> None:
        if not self.state.is_shutting_down:
            self.shutdown(1.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "server thread did not stop"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        return sock


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    """``serve(**limits)`` starts an EchoApp server with those ``HttpLimits`` overrides."""
    started: list[ServerThread] = []

    def start(**limits: Any) -> ServerThread:
        server = ServerThread(EchoApp(), HttpLimits(**limits))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        assert not server.loop_errors, f"exceptions reached the event loop: {server.loop_errors}"


@pytest.fixture
def server(serve: Callable[..., ServerThread]) -> ServerThread:
    return serve()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class _ResponseCollector:
    def __init__(self) -> None:
        self.done: list[RawResponse] = []
        self.parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.done.append(RawResponse(status, self._headers, b"".join(self._body)))
        self._headers, self._body = {}, []


def read_responses(sock: socket.socket, count: int) -> list[RawResponse]:
    """Read exactly ``count`` responses (bounded by the socket timeout)."""
    collector = _ResponseCollector()
    while len(collector.done) < count:
        data = sock.recv(65536)
        if not data:
            break
        collector.parser.feed_data(data)
    assert len(collector.done) == count, f"expected {count} responses, got {collector.done}"
    return collector.done


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closed the connection: recv returns EOF (or a reset) before the timeout."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(65536) == b""


def request_bytes(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def error_json(response: RawResponse) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    return json.loads(response.body)


# -- keep-alive with a real client ------------------------------------------------------------


def test_httpx_reuses_one_keep_alive_connection(server: ServerThread) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT_S) as client:
        for i in range(50):
            r = client.post(f"/echo/{i}?n={i}", content=b"payload-%d" % i)
            assert r.status_code == 200
            assert r.content == b"sync POST /echo/%d?n=%d|payload-%d" % (i, i, i)
            assert r.headers["x-kind"] == "sync"
            assert r.headers["content-type"] == "text/plain"
        r = client.get("/async")
        assert r.content == b"async GET /async?|"
    assert server.state.accepted_total == 1


def test_sync_handler_runs_without_a_task(server: ServerThread) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT_S) as client:
        assert client.get("/a").status_code == 200
        assert client.get("/b").status_code == 200
    assert server.app.sync_tasks == [None, None]


def test_header_names_are_lower_cased_and_repeats_joined_whatever_names_clients_send(
    server: ServerThread,
) -> None:
    from rtbserve.transports.http import protocol

    with server.connect() as sock:
        for batch in range(3):  # 1,500 distinct names: more than the name cache holds
            extra = "".join(f"X-Name-{batch}-{i}: v{i}\r\n" for i in range(500))
            extra += "Accept: a\r\nACCEPT: b\r\nContent-Type: Text/CSV\r\n"
            sock.sendall(request_bytes("GET", "/headers", extra=extra))
            (response,) = read_responses(sock, 1)
            headers = json.loads(response.body)
            assert headers[f"x-name-{batch}-499"] == "v499"
            assert headers["accept"] == "a, b"
            assert headers["content-type"] == "Text/CSV"  # names fold case, values do not
            assert len(headers) == 500 + 4  # + host, content-length
    assert len(protocol._HEADER_NAMES) <= protocol._HEADER_NAMES_MAX


# -- pipelining and flow control ---------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_across_async_and_sync(
    server: ServerThread,
) -> None:
    with server.connect() as sock:
        sock.sendall(
            request_bytes("POST", "/async", b"one")
            + request_bytes("POST", "/sync", b"two")
            + request_bytes("POST", "/async", b"three")
        )
        responses = read_responses(sock, 3)
    assert [r.body for r in responses] == [
        b"async POST /async?|one",
        b"sync POST /sync?|two",
        b"async POST /async?|three",
    ]


def test_pipelining_past_max_pipelined_pauses_and_resumes_reading(
    serve: Callable[..., ServerThread],
) -> None:
    server = serve(max_pipelined=2)
    with server.connect() as sock:
        sock.sendall(b"".join(request_bytes("GET", f"/async?i={i}") for i in range(20)))
        responses = read_responses(sock, 20)
    assert [r.body for r in responses] == [b"async GET /async?i=%d|" % i for i in range(20)]


# -- bodies ------------------------------------------------------------------------------------


def test_chunked_request_body_arriving_in_pieces(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        sock.sendall(b"5\r\nhello\r\n")
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        (response,) = read_responses(sock, 1)
    assert response.status == 200
    assert response.body == b"sync POST /c?|hello world"


def test_expect_100_continue_is_answered_before_the_body(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(
            b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, "connection closed before 100 Continue"
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        (response,) = read_responses(sock, 1)
    assert response.body == b"sync POST /e?|body"


def test_expect_100_continue_over_the_limit_gets_413_without_sending_the_body(
    serve: Callable[..., ServerThread],
) -> None:
    server = serve(max_body_bytes=100)
    with server.connect() as sock:
        sock.sendall(
            b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 101\r\nexpect: 100-continue\r\n\r\n"
        )
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 413
    assert response.headers["connection"] == "close"
    assert error_json(response)["type"] == "payload_too_large"


def test_declared_length_over_the_limit_gets_413_and_close(
    serve: Callable[..., ServerThread],
) -> None:
    server = serve(max_body_bytes=100)
    with server.connect() as sock:
        sock.sendall(request_bytes("POST", "/big", b"x" * 101))
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 413
    assert error_json(response) == {
        "code": 413,
        "type": "payload_too_large",
        "message": "body of 101 bytes exceeds the limit of 100 bytes",
    }


def test_chunked_body_over_the_limit_gets_413(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_body_bytes=10)
    with server.connect() as sock:
        sock.sendall(
            b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 413


def test_body_at_the_limit_is_accepted(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_body_bytes=100)
    with server.connect() as sock:
        sock.sendall(request_bytes("POST", "/ok", b"x" * 100))
        (response,) = read_responses(sock, 1)
    assert response.status == 200
    assert response.body.endswith(b"|" + b"x" * 100)


# -- malformed and oversized input -------------------------------------------------------------


def test_headers_over_the_limit_get_431_and_close(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_header_bytes=1024)
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n")
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 431
    assert error_json(response)["code"] == 431


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", id="tls-hello"
        ),
        pytest.param(b"BREW /pot HTTP/1.1\r\n\r\n", id="invalid-method"),
        pytest.param(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n", id="bad-chunk"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", id="bad-header-line"),
    ],
)
def test_malformed_http_gets_400_and_close(server: ServerThread, garbage: bytes) -> None:
    with server.connect() as sock:
        sock.sendall(garbage)
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 400
    assert error_json(response)["type"] == "bad_request"


def test_valid_request_before_garbage_is_still_answered(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes("GET", "/first") + b"\x00\x01garbage\r\n\r\n")
        first, error = read_responses(sock, 2)
        assert_closed_by_server(sock)
    assert (first.status, first.body) == (200, b"sync GET /first?|")
    assert error.status == 400


# -- timeouts ----------------------------------------------------------------------------------


def test_slow_client_gets_408_and_close(serve: Callable[..., ServerThread]) -> None:
    server = serve(request_timeout_s=0.3)
    with server.connect() as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.status == 408
    assert error_json(response)["type"] == "request_timeout"


def test_request_timeout_does_not_hit_complete_requests(serve: Callable[..., ServerThread]) -> None:
    server = serve(request_timeout_s=0.3)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT_S) as client:
        assert client.get("/one").status_code == 200
        done = threading.Event()
        # Stay connected past the request timeout without a partial request, then reuse.
        server.loop.call_soon_threadsafe(server.loop.call_later, 0.5, done.set)
        assert done.wait(WAIT_S)
        assert client.get("/two").status_code == 200
    assert server.state.accepted_total == 1


def test_idle_keep_alive_connection_is_closed(serve: Callable[..., ServerThread]) -> None:
    server = serve(idle_timeout_s=0.3)
    with server.connect() as sock:
        sock.sendall(request_bytes("GET", "/x"))
        (response,) = read_responses(sock, 1)
        assert "connection" not in response.headers
        assert_closed_by_server(sock)
    assert server.call(lambda: len(server.state.connections)) == 0


# -- connection semantics ----------------------------------------------------------------------


def test_http10_without_keep_alive_closes_after_the_response(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.body == b"sync GET /old?|"
    assert response.headers["connection"] == "close"


def test_http10_keep_alive_keeps_the_connection(server: ServerThread) -> None:
    with server.connect() as sock:
        for i in range(2):
            sock.sendall(b"GET /old%d HTTP/1.0\r\nconnection: keep-alive\r\n\r\n" % i)
            (response,) = read_responses(sock, 1)
            assert response.headers["connection"] == "keep-alive"
            assert response.body == b"sync GET /old%d?|" % i
    assert server.state.accepted_total == 1


def test_connection_close_is_honoured_and_later_input_ignored(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(
            request_bytes("GET", "/last", extra="connection: close\r\n")
            + request_bytes("GET", "/ignored")
        )
        (response,) = read_responses(sock, 1)
        assert_closed_by_server(sock)
    assert response.headers["connection"] == "close"
    assert response.body == b"sync GET /last?|"


def test_head_response_has_length_but_no_body(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes("HEAD", "/h") + request_bytes("GET", "/g"))
        data = b""
        while not data.endswith(b"sync GET /g?|"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    head, get = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert head.endswith(b"\r\n\r\n")
    assert b"content-length: %d\r\n" % len(b"sync HEAD /h?|") in head


# -- handler failures and disconnects ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/boom", "/async-boom"])
def test_handler_exception_gives_500_and_the_connection_stays_usable(
    server: ServerThread, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="rtbserve.transports.http")
    with server.connect() as sock:
        sock.sendall(request_bytes("GET", path))
        (failed,) = read_responses(sock, 1)
        sock.sendall(request_bytes("GET", "/after"))
        (after,) = read_responses(sock, 1)
    assert failed.status == 500
    assert error_json(failed) == {"code": 500, "type": "internal", "message": "internal error"}
    assert "connection" not in failed.headers
    assert (after.status, after.body) == (200, b"sync GET /after?|")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_client_disconnect_cancels_the_pending_async_handler(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes("GET", "/hang"))
        assert server.app.hang_started.wait(WAIT_S)
    assert server.app.hang_cancelled.wait(WAIT_S)
    # Fixture teardown asserts that nothing reached the loop's exception handler.


def test_client_disconnect_mid_body_is_quiet(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nabc")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT_S) as client:
        assert client.get("/still-up").status_code == 200


# -- draining ----------------------------------------------------------------------------------


def test_shutdown_finishes_in_flight_requests_and_closes_idle_connections(
    server: ServerThread,
) -> None:
    with server.connect() as busy, server.connect() as idle:
        idle.sendall(request_bytes("GET", "/warm"))
        read_responses(idle, 1)
        busy.sendall(request_bytes("GET", "/hang"))
        assert server.app.hang_started.wait(WAIT_S)
        done = asyncio.run_coroutine_threadsafe(shutdown(server.state, WAIT_S), server.loop)
        assert_closed_by_server(idle)
        server.loop.call_soon_threadsafe(lambda: server.app.release_hang.set())  # type: ignore[union-attr]
        (response,) = read_responses(busy, 1)
        assert_closed_by_server(busy)
        done.result(WAIT_S)
    assert response.body == b"released GET /hang?|"
    assert not server.app.hang_cancelled.is_set()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S).close()


def test_shutdown_aborts_connections_still_busy_after_the_timeout(server: ServerThread) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes("GET", "/hang"))
        assert server.app.hang_started.wait(WAIT_S)
        server.shutdown(0.2)
        assert_closed_by_server(sock)
    assert server.app.hang_cancelled.is_set()
