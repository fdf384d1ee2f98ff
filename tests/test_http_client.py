"""HttpClient and AsyncHttpClient over real sockets: a real ``rtbserve serve`` and raw-socket stubs.

The real server (one worker, no gRPC, HTTP port 0, a 1 s keep-alive idle timeout) starts once
per module and is ready when it prints ``ready``; expected scores come from ``load_model`` in
process, from the same compile cache. The stubs are threads answering canned bytes, for what the
server does not do on demand: drop a pooled connection just as a request arrives, break off
mid-answer, fail open, send every kind of error body, never answer. Nothing sleeps to
synchronise; async tests run on asyncio and uvloop, with a timeout, and fail on anything that
reaches the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import orjson
import pytest
import uvloop

import rtbserve
from rtbserve.client import AsyncHttpClient, ConnectionFailed, HttpClient, RequestTimedOut
from rtbserve.client._errors import ERROR_CLASSES, error_for_code
from rtbserve.client.http import (
    csv_to_scores,
    matrix_to_csv,
    matrix_to_oip_body,
    rows_to_matrix,
)
from rtbserve.codecs import parse_csv_rows
from rtbserve.codecs.oip_codec import parse_oip_request
from rtbserve.errors import InvalidInput, ModelNotFound, RtbError

DEMO = Path(__file__).resolve().parent.parent / "models" / "rtb-filter"
MODEL = "rtb-filter"
N_FEATURES = 67
IDLE_TIMEOUT_S = 1.0
WAIT_S = 10.0  # upper bound for any single wait; tests never sleep to synchronise

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- real server


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def server(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``rtbserve serve`` on the demo model; yields once it printed ``ready``."""
    log_path = tmp_path_factory.mktemp("http-client-server") / "stderr.log"
    with open(log_path, "w") as log:  # a file, not a pipe: server logs can never block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtbserve.cli", "serve", str(DEMO), "--host", "127.0.0.1",
             "--http-port", "0", "--no-grpc", "--workers", "1",
             "--idle-timeout-s", str(IDLE_TIMEOUT_S), "--cache-dir", str(session_cache)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = None
        for line in proc.stdout:  # readiness is a line on stdout: no sleeps
            if line.startswith("listening on "):
                url = line.split()[-1]
            if line.startswith("ready"):
                break
        else:
            pytest.fail(f"server exited before ready: {proc.wait()}\n{log_path.read_text()}")
        assert url is not None and url.startswith("http://127.0.0.1:"), url
        yield Server(url, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """The demo sample: (100, 67) float32 with missing values."""
    X = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)  # noqa: N806
    assert X.shape == (100, N_FEATURES) and np.isnan(X).any()
    return X


@pytest.fixture(scope="module")
def model(session_cache: Path) -> Any:
    return rtbserve.load_model(DEMO, cache_dir=session_cache)


@pytest.fixture
def client(server: Server) -> Iterator[HttpClient]:
    with HttpClient(server.url, timeout_s=WAIT_S) as c:
        yield c


@pytest.fixture(params=["asyncio", "uvloop"])
def run_async(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """run(async_fn) on the parametrised loop, with a timeout; fails on loop-handler errors."""

    def run(fn: Callable[[], Awaitable[Any]]) -> Any:
        errors: list[dict[str, Any]] = []

        async def main() -> Any:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            return await asyncio.wait_for(fn(), timeout=2 * WAIT_S)

        result = uvloop.run(main()) if request.param == "uvloop" else asyncio.run(main())
        assert not errors, errors
        return result

    return run


# --------------------------------------------------------------------------- stub server


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


# script(index of the request, request) -> (bytes to send, close afterwards)
Script = Callable[[int, Seen], tuple[bytes, bool]]


def http_answer(
    status: int = 200,
    body: bytes = b"0.5\n",
    content_type: str = "text/csv",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body


class StubServer:
    """A raw-socket HTTP/1.1 server on 127.0.0.1:0, one thread per connection, answering each
    request with ``script``. ``accepted`` counts connections, ``seen`` lists requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        done: list[Seen] = []
        parts: dict[str, Any] = {}

        class Callbacks:
            def on_message_begin(self) -> None:
                parts.update(url=b"", headers={}, body=b"")

            def on_url(self, url: bytes) -> None:
                parts["url"] += url

            def on_header(self, name: bytes, value: bytes) -> None:
                parts["headers"][name.decode().lower()] = value.decode()

            def on_body(self, body: bytes) -> None:
                parts["body"] += body

            def on_message_complete(self) -> None:
                method = parser.get_method().decode()
                done.append(Seen(method, parts["url"].decode(), parts["headers"], parts["body"]))

        parser = httptools.HttpRequestParser(Callbacks())
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                parser.feed_data(data)
                for seen in done:
                    with self._lock:
                        index = len(self.seen)
                        self.seen.append(seen)
                    answer, close = self.script(index, seen)
                    try:
                        if answer:
                            conn.sendall(answer)
                    except OSError:
                        return  # the client went away
                    if close:
                        return
                done.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._threads[0].join(WAIT_S)
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes each blocked recv()
        for t in self._threads[1:]:
            t.join(WAIT_S)


@contextlib.contextmanager
def stub_server(script: Script) -> Iterator[StubServer]:
    stub = StubServer(script)
    try:
        yield stub
    finally:
        stub.close()


def answer_all(answer: bytes) -> Script:
    return lambda index, seen: (answer, False)


def answer_by_route(index: int, seen: Seen) -> tuple[bytes, bool]:
    """One score per request: CSV for ``/invocations``, an OIP response for ``/v2/...``."""
    if seen.path.startswith("/v2/"):
        doc = {"outputs": [{"name": "output-0", "datatype": "FP32", "shape": [1], "data": [0.5]}]}
        return http_answer(body=orjson.dumps(doc), content_type="application/json"), False
    return http_answer(), False


def drop_second_request(index: int, seen: Seen) -> tuple[bytes, bool]:
    """Answer, then close the connection on the next request without a byte of answer: what a
    server does when its keep-alive idle timer fires as the request arrives."""
    return (b"", True) if index == 1 else (http_answer(body=b"%d\n" % index), False)


# --------------------------------------------------------------------------- scores


def test_predict_one_row_equals_the_model(client: HttpClient, rows: np.ndarray, model: Any) -> None:
    for i in (0, 1, 2, 50, 99):
        got = client.predict(rows[i])
        assert got.dtype == np.float32 and got.shape == (1,)
        np.testing.assert_array_equal(got, model.predict(rows[i : i + 1]))
    assert client.predict(rows[3].tolist())[0] == model.predict(rows[3:4])[0]


def test_predict_many_rows_equals_the_model(
    client: HttpClient, rows: np.ndarray, model: Any
) -> None:
    want = model.predict(rows)
    np.testing.assert_array_equal(client.predict(rows), want)
    np.testing.assert_array_equal(client.predict(rows, accept="application/json"), want)
    np.testing.assert_array_equal(client.predict(rows.astype(np.float64)), want)
    np.testing.assert_array_equal(client.predict(np.asfortranarray(rows)), want)


def test_predict_missing_and_infinite_values(
    client: HttpClient, rows: np.ndarray, model: Any
) -> None:
    X = rows[:6].copy()  # noqa: N806
    X[0] = np.nan  # every feature missing
    X[1, ::2] = np.nan
    X[2, 5] = np.inf
    X[3, 7] = -np.inf
    X[4, :10] = [0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1e-38, 7, 0.1, 1e30]
    want = model.predict(X)
    np.testing.assert_array_equal(client.predict(X), want)
    # Open Inference Protocol: NaN as JSON null; rows with +-inf go as binary tensor data
    np.testing.assert_array_equal(client.predict(X[[0, 1, 4]], model=MODEL), want[[0, 1, 4]])
    np.testing.assert_array_equal(client.predict(X, model=MODEL), want)
    with_none = [None if np.isnan(v) else float(v) for v in X[1]]
    np.testing.assert_array_equal(client.predict(with_none), want[1:2])


def test_open_inference_protocol_routes(client: HttpClient, rows: np.ndarray, model: Any) -> None:
    np.testing.assert_array_equal(client.predict(rows[:7], model=MODEL), model.predict(rows[:7]))
    np.testing.assert_array_equal(client.predict(rows[9], model=MODEL), model.predict(rows[9:10]))
    meta = client.metadata(MODEL)
    assert meta["name"] == MODEL and meta["inputs"][0]["shape"] == [-1, N_FEATURES]
    assert client.ping() and client.ready() and client.ready(MODEL)
    assert not client.ready("no-such-model")  # the server answers 503 for an unknown model


def test_deadline_header_reaches_the_server(
    client: HttpClient, rows: np.ndarray, model: Any
) -> None:
    result = client.predict_with_info(rows[:3], deadline_ms=WAIT_S * 1e3)
    np.testing.assert_array_equal(result.scores, model.predict(rows[:3]))
    assert result.is_fail_open is False
    with stub_server(answer_by_route) as stub, HttpClient(stub.url) as c:
        c.predict(rows[0], deadline_ms=12.5)
        c.predict(rows[0], deadline_ms=50)
        c.predict(rows[0])
        c.predict(rows[0], model=MODEL, deadline_ms=7)
        sent = [s.headers.get("x-rtb-deadline-ms") for s in stub.seen]
    assert sent == ["12.5", "50", None, "7"]
    with pytest.raises(ValueError, match="positive"):
        c.predict(rows[0], deadline_ms=0)


def test_fail_open_answer_is_flagged(rows: np.ndarray) -> None:
    flagged = http_answer(body=b"0.25\n", headers=(("X-Rtb-Fail-Open", "1"),))
    with stub_server(answer_all(flagged)) as stub, HttpClient(stub.url) as c:
        result = c.predict_with_info(rows[0])
        assert result.is_fail_open is True and result.scores.tolist() == [0.25]
        assert c.predict(rows[0]).tolist() == [0.25]  # the default call returns just the array


def test_request_wire_format(rows: np.ndarray) -> None:
    with stub_server(answer_all(http_answer(body=b"0.5\n0.5\n"))) as stub:
        with HttpClient(stub.url + "/prefix/") as c:
            c.predict(rows[:2])
        seen = stub.seen[0]
    assert (seen.method, seen.path) == ("POST", "/prefix/invocations")
    assert seen.headers["content-type"] == "text/csv"
    assert seen.headers["host"] == stub.url.removeprefix("http://")
    assert b"\n" in seen.body and b"nan" not in seen.body.lower() and b",," in seen.body


# --------------------------------------------------------------------------- payload codecs


def test_csv_and_oip_bodies_parse_back_to_the_same_float32() -> None:
    """Every float32 the client sends reaches the server's parsers bit for bit (NaN as NaN)."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=(2000, 16), dtype=np.uint64).astype(np.uint32)
    X = bits.view(np.float32)  # noqa: N806 - any float32, NaN payloads and subnormals included
    X[0, :6] = [np.inf, -np.inf, 0.0, -0.0, 1e-45, np.nan]
    matrix = rows_to_matrix(X)
    got = parse_csv_rows(matrix_to_csv(matrix), 16)
    assert np.array_equal(got, X, equal_nan=True)
    numbers = ~np.isnan(X)
    assert np.array_equal(np.signbit(got[numbers]), np.signbit(X[numbers]))  # -0.0 stays -0.0
    body, header_length = matrix_to_oip_body(matrix)
    assert header_length is not None  # +-inf present: binary tensor data
    parsed = parse_oip_request(body, 16, header_length)
    assert np.array_equal(parsed.rows, X, equal_nan=True)
    finite = np.where(np.isinf(X), 1.0, X)
    body, header_length = matrix_to_oip_body(rows_to_matrix(finite))
    assert header_length is None and b'"data":[' in body and b"null" in body
    assert np.array_equal(parse_oip_request(body, 16).rows, finite, equal_nan=True)


def test_csv_scores_parse_one_and_many_outputs() -> None:
    assert csv_to_scores(b"0.5\n").tolist() == [0.5]
    assert csv_to_scores(b"0.25\r\n0.5\r\n").tolist() == [0.25, 0.5]
    multi = csv_to_scores(b"0.1,0.9\n0.2,0.8\n")
    assert multi.shape == (2, 2) and multi.dtype == np.float32
    odd = csv_to_scores(b"nan\ninf\n-inf\n")
    assert np.isnan(odd[0]) and odd[1] == np.inf and odd[2] == -np.inf


def test_bad_row_shapes_are_refused_before_sending() -> None:
    with pytest.raises(InvalidInput, match="at least one row"):
        rows_to_matrix(np.empty((0, 3)))
    with pytest.raises(InvalidInput, match="shape"):
        rows_to_matrix(np.zeros((2, 2, 2)))
    with pytest.raises(InvalidInput, match="numbers"):
        rows_to_matrix([[1.0, 2.0], [3.0]])
    with pytest.raises(InvalidInput, match="numbers"):
        rows_to_matrix(["a", "b"])


# --------------------------------------------------------------------------- pool


def test_sequential_calls_reuse_one_connection(rows: np.ndarray) -> None:
    with stub_server(answer_all(http_answer())) as stub, HttpClient(stub.url) as c:
        for i in range(30):
            c.predict(rows[i])
        assert c.ping()
        assert stub.accepted == 1 and len(stub.seen) == 31
        assert c.connections_opened == 1


def test_real_server_keeps_one_connection(client: HttpClient, rows: np.ndarray) -> None:
    client.predict(rows[0])
    port = client._idle[0].local_port
    for i in range(40):
        client.predict(rows[i])
    assert client.connections_opened == 1 and client._idle[0].local_port == port


def test_threads_share_the_pool(server: Server, rows: np.ndarray, model: Any) -> None:
    want = model.predict(rows)
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(offset, 100, 4):
                assert client.predict(rows[i])[0] == want[i]
        except BaseException as exc:  # reported in the main thread
            failures.append(exc)

    with HttpClient(server.url, pool_size=2, timeout_s=WAIT_S) as client:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert not failures, failures
        assert client.connections_opened <= 2


def test_reconnects_after_the_server_closed_an_idle_connection(
    client: HttpClient, rows: np.ndarray, model: Any
) -> None:
    client.predict(rows[0])
    pooled = client._idle[0].sock
    readable, _, _ = select.select([pooled], [], [], IDLE_TIMEOUT_S + WAIT_S)  # the server's FIN
    assert readable, "the server did not close the idle connection"
    np.testing.assert_array_equal(client.predict(rows[:5]), model.predict(rows[:5]))
    assert client.connections_opened == 2


def test_retries_once_when_a_pooled_connection_is_dropped(rows: np.ndarray) -> None:
    with stub_server(drop_second_request) as stub, HttpClient(stub.url) as c:
        assert c.predict(rows[0]).tolist() == [0.0]
        assert c.predict(rows[1]).tolist() == [2.0]  # request 1 dropped, resent as request 2
        assert stub.accepted == 2 and c.connections_opened == 2
        assert stub.seen[1].body == stub.seen[2].body


def test_no_retry_on_a_fresh_connection(rows: np.ndarray) -> None:
    with stub_server(lambda index, seen: (b"", True)) as stub, HttpClient(stub.url) as c:
        with pytest.raises(ConnectionFailed, match="closed before any answer"):
            c.predict(rows[0])
        assert stub.accepted == 1 and len(stub.seen) == 1


def test_no_retry_after_part_of_an_answer(rows: np.ndarray) -> None:
    def script(index: int, seen: Seen) -> tuple[bytes, bool]:
        return (http_answer(), False) if index == 0 else (http_answer()[:20], True)

    with stub_server(script) as stub, HttpClient(stub.url) as c:
        c.predict(rows[0])
        with pytest.raises(ConnectionFailed, match="mid-answer"):
            c.predict(rows[0])
        assert len(stub.seen) == 2 and stub.accepted == 1


def test_connection_close_answer_is_not_pooled(rows: np.ndarray) -> None:
    closing = http_answer(headers=(("connection", "close"),))
    with stub_server(lambda index, seen: (closing, True)) as stub, HttpClient(stub.url) as c:
        c.predict(rows[0])
        c.predict(rows[0])
        assert stub.accepted == 2 and not c._idle


def test_timeout_and_unreachable_server(rows: np.ndarray) -> None:
    with stub_server(lambda index, seen: (b"", False)) as stub:
        with HttpClient(stub.url, timeout_s=0.2) as c, pytest.raises(RequestTimedOut) as info:
            c.predict(rows[0])
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, ConnectionError)
        port = stub.url.rsplit(":", 1)[1]
    with HttpClient(f"http://127.0.0.1:{port}") as c:  # the stub's listener is closed
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            c.predict(rows[0])
        assert c.ping() is False and c.ready() is False
    c.close()
    with pytest.raises(ConnectionFailed, match="closed"):
        c.predict(rows[0])


# --------------------------------------------------------------------------- errors


def test_server_errors_map_to_rtbserve_errors(client: HttpClient, rows: np.ndarray) -> None:
    with pytest.raises(InvalidInput) as info:
        client.predict(rows[:2, :3])
    assert str(info.value) == "expected 67 features, got 3" and info.value.status == 400
    with pytest.raises(ModelNotFound, match="unknown model 'nope'") as not_found:
        client.predict(rows[0], model="nope")
    assert not_found.value.status == 404
    with pytest.raises(ModelNotFound):
        client.metadata("nope")
    np.testing.assert_array_equal(client.predict(rows[0]).shape, (1,))  # the pool survived
    assert client.connections_opened == 1


@pytest.mark.parametrize("code", [*sorted(ERROR_CLASSES), "internal", "no_such_code"])
def test_error_bodies_map_by_type(code: str, rows: np.ndarray) -> None:
    message = f"the server's words for {code}"
    body = orjson.dumps({"code": 418, "type": code, "message": message})
    answer = http_answer(418, body, "application/json")
    with (
        stub_server(answer_all(answer)) as stub,
        HttpClient(stub.url) as c,
        pytest.raises(RtbError) as info,
    ):
        c.predict(rows[0])
    exc = info.value
    assert type(exc) is ERROR_CLASSES.get(code, RtbError)
    assert str(exc) == message and exc.code == code and exc.status == 418


def test_non_json_error_body(rows: np.ndarray) -> None:
    answer = http_answer(502, b"upstream went away", "text/plain")
    with (
        stub_server(answer_all(answer)) as stub,
        HttpClient(stub.url) as c,
        pytest.raises(RtbError, match="HTTP 502: upstream went away") as info,
    ):
        c.predict(rows[0])
    assert type(info.value) is RtbError and info.value.status == 502


def test_error_for_code_is_transport_neutral() -> None:
    exc = error_for_code("model_not_found", "unknown model 'x'; loaded: a")
    assert isinstance(exc, ModelNotFound) and exc.status is None
    assert str(exc) == "unknown model 'x'; loaded: a"


# --------------------------------------------------------------------------- asyncio


def test_async_concurrent_predicts_get_their_own_scores(
    server: Server, rows: np.ndarray, model: Any, run_async: Any
) -> None:
    want = model.predict(rows)
    sizes = [1 + (i * 7) % 9 if i % 10 else 40 for i in range(300)]
    slices = [(i % 60, i % 60 + size) for i, size in enumerate(sizes)]

    async def main() -> tuple[list[np.ndarray], int]:
        async with AsyncHttpClient(server.url, pool_size=8, timeout_s=WAIT_S) as c:
            results = await asyncio.gather(
                *[
                    c.predict(rows[a:b], model=MODEL if k % 3 == 0 else None)
                    for k, (a, b) in enumerate(slices)
                ]
            )
            return results, c.connections_opened

    results, opened = run_async(main)
    for (a, b), got in zip(slices, results, strict=True):
        np.testing.assert_array_equal(got, want[a:b])
    assert 1 <= opened <= 8


def test_async_calls_wait_for_a_free_connection(
    server: Server, rows: np.ndarray, model: Any, run_async: Any
) -> None:
    async def main() -> tuple[list[np.ndarray], int, bool, bool, dict[str, Any]]:
        async with AsyncHttpClient(server.url, pool_size=1, timeout_s=WAIT_S) as c:
            results = await asyncio.gather(*[c.predict(rows[i]) for i in range(20)])
            info = await c.predict_with_info(rows[:2], deadline_ms=WAIT_S * 1e3)
            assert not info.is_fail_open
            return (
                results,
                c.connections_opened,
                await c.ping(),
                await c.ready(),
                await c.metadata(MODEL),
            )

    results, opened, ping, ready, meta = run_async(main)
    np.testing.assert_array_equal(np.concatenate(results), model.predict(rows[:20]))
    assert opened == 1 and ping and ready and meta["name"] == MODEL


def test_async_errors_and_retry(rows: np.ndarray, run_async: Any) -> None:
    async def main() -> None:
        with stub_server(drop_second_request) as stub:
            async with AsyncHttpClient(stub.url) as c:
                assert (await c.predict(rows[0])).tolist() == [0.0]
                assert (await c.predict(rows[1])).tolist() == [2.0]
                assert stub.accepted == 2 and c.connections_opened == 2
        body = orjson.dumps({"code": 400, "type": "invalid_input", "message": "expected 67"})
        with stub_server(answer_all(http_answer(400, body, "application/json"))) as stub:
            async with AsyncHttpClient(stub.url) as c:
                with pytest.raises(InvalidInput, match="expected 67"):
                    await c.predict(rows[0])
                with pytest.raises(InvalidInput):
                    await c.predict(rows[0])
                assert c.connections_opened == 1
        with stub_server(lambda index, seen: (b"", False)) as stub:
            async with AsyncHttpClient(stub.url, timeout_s=0.2) as c:
                with pytest.raises(RequestTimedOut):
                    await c.predict(rows[0])
        async with AsyncHttpClient(stub.url) as c:  # the listener is closed now
            with pytest.raises(ConnectionFailed, match="cannot connect"):
                await c.predict(rows[0])
            assert await c.ping() is False

    run_async(main)


def test_async_cancelled_call_frees_its_connection(rows: np.ndarray, run_async: Any) -> None:
    release = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def script(index: int, seen: Seen) -> tuple[bytes, bool]:
            if index == 0:
                loop.call_soon_threadsafe(arrived.set)
                release.wait(WAIT_S)  # hold the first answer until the call is cancelled
            return http_answer(), False

        with stub_server(script) as stub:
            async with AsyncHttpClient(stub.url, pool_size=1) as c:
                task = asyncio.ensure_future(c.predict(rows[0]))
                await arrived.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                release.set()
                assert (await c.predict(rows[0])).tolist() == [0.5]  # on a new connection
                assert c.connections_opened == 2 and stub.accepted == 2

    run_async(main)


# --------------------------------------------------------------------------- import cost


def test_client_import_is_light() -> None:
    code = (
        "import sys, rtbserve.client\n"
        "assert 'rtbserve.client.http' not in sys.modules\n"
        "from rtbserve.client import HttpClient\n"
        "heavy = {'numba', 'xgboost', 'lightgbm', 'treelite', 'asyncio', 'grpc'}\n"
        "loaded = sorted(heavy & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
