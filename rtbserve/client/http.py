"""HTTP/1.1 clients for rtbserve: ``HttpClient`` for threads, ``AsyncHttpClient`` for asyncio.

Both speak the same wire format over the same kind of pool; only the waiting differs.

Requests. ``predict(rows)`` posts a ``text/csv`` body to ``/invocations``: one line per row,
each value the shortest text that parses back to the same float32 (orjson's float32 writer),
NaN as an empty field (the server's "missing"), ``inf``/``-inf`` spelled out. With
``model="name"`` it posts an Open Inference Protocol request to ``/v2/models/{name}/infer``:
``{"inputs":[{"name":"input-0","shape":[n,F],"datatype":"FP32","data":[...]}]}``, data flat in
row order. JSON has no NaN, so NaN goes as ``null``, which the server reads as missing; JSON has
no infinity either, so rows holding +-inf go as the protocol's binary tensor extension (raw
float32 bytes after a JSON header), which carries every value exactly.
``deadline_ms`` travels as ``x-rtb-deadline-ms``. The server's ``x-rtb-fail-open: 1`` (or
``true``) marks a fail-open default decision; ``predict_with_info`` returns it with the scores.

Answers. Scores come back as a float32 array: shape (n,) for one output per row, (n, K) for K
outputs (multiclass). A non-2xx answer raises the ``rtbserve.errors`` class named by the JSON
error body's ``type`` (see ``rtbserve.client._errors``), with the server's message and the HTTP
status as ``exc.status``. Failures of the connection itself raise ``ConnectionFailed`` (a
``ConnectionError``), or ``RequestTimedOut`` (also a ``TimeoutError``) after ``timeout_s``.

Pool. At most ``pool_size`` connections are open at once; a request takes the most recently
used idle one (so a sequential caller keeps one warm connection), else opens one, else waits
for one to come back (bounded by ``timeout_s``). A connection returns to the pool after a
complete answer unless the server said ``connection: close``; one that failed in any way is
closed, never reused. Timeline of one request::

    acquire ── idle connection (LIFO) | open a new one | wait for a release
      send request ── one write: head and body together                        # syscall
      read until the response parser reports a complete message                # syscall(s)
        EOF or reset before any answer byte on a *reused* connection: the server closed it
        while idle (keep-alive timeout); open a new connection and send once more
      release ── back to the pool, or closed on "connection: close" / any failure

The retry is safe because it happens only when the server sent nothing back on a connection it
had already closed, and every request these clients send is idempotent (scoring has no side
effect). It happens at most once per call and never on a fresh connection. ``timeout_s`` bounds
the whole call: waiting for a connection, connecting, the retry, and reading the answer.

Import cost: numpy, orjson and httptools; asyncio only when an ``AsyncHttpClient`` is made.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httptools
import numpy as np
import orjson

from rtbserve.client._common import Prediction, rows_to_matrix
from rtbserve.client._errors import ConnectionFailed, RequestTimedOut, error_for_code
from rtbserve.errors import RtbError

if TYPE_CHECKING:
    import asyncio

    from numpy.typing import ArrayLike

__all__ = ["AsyncHttpClient", "HttpClient", "Prediction"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEADLINE_HEADER = "x-rtb-deadline-ms"
FAIL_OPEN_HEADER = "x-rtb-fail-open"
_FAIL_OPEN_NAME = FAIL_OPEN_HEADER.encode()
_RECV_BYTES = 64 * 1024  # per recv(); below glibc's mmap threshold, so no mmap per call
_MAX_CACHED_HEADS = 256
_TIMEOUT_SLACK_S = 0.002  # a socket timeout this close to the call's budget is left as it is
_SMALL_MATRIX = 512  # values; up to this many, pure Python beats numpy's per-call overhead
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_CSV = "text/csv"
_JSON = "application/json"
_INF = float("inf")
_NEG_INF = float("-inf")

# (status, content type, body, is_fail_open, is_keep_alive) of one complete response
_Answer = tuple[int, bytes, bytes, bool, bool]


class _ClosedBeforeAnswer(ConnectionFailed):
    """The connection ended before any byte of the answer: safe to resend on a new one."""


# --------------------------------------------------------------------------- payloads


def _has_inf(matrix: np.ndarray) -> bool:
    if matrix.size <= _SMALL_MATRIX:
        # a numpy reduction costs several us of dispatch; a list scan of one row costs ~1 us
        values = matrix.ravel().tolist()  # allocates
        return _INF in values or _NEG_INF in values
    return bool(np.isinf(matrix).any())


def matrix_to_csv(matrix: np.ndarray) -> bytes:
    """A float32 C-contiguous (n, F) matrix as a CSV body, one line per row, no trailing newline.

    Each value is the shortest text that parses back to the same float32; NaN is an empty field
    and +-inf is ``inf``/``-inf``.
    """
    dumped = orjson.dumps(matrix, option=_NUMPY)  # allocates; b"[[v,...],[...]]"
    if b"n" in dumped:  # "null": orjson writes NaN and +-inf as null
        if _has_inf(matrix):
            return _matrix_to_csv_with_inf(matrix)
        dumped = dumped.replace(b"null", b"")
    if matrix.shape[0] == 1:
        return dumped[2:-2]
    return dumped[2:-2].replace(b"],[", b"\n")


def _matrix_to_csv_with_inf(matrix: np.ndarray) -> bytes:
    tokens = orjson.dumps(matrix.reshape(-1), option=_NUMPY)[1:-1].split(b",")
    flat = matrix.reshape(-1)
    for i in np.flatnonzero(~np.isfinite(flat)).tolist():
        v = flat[i]
        tokens[i] = b"" if v != v else (b"inf" if v > 0 else b"-inf")
    width = matrix.shape[1]
    lines = [b",".join(tokens[i : i + width]) for i in range(0, len(tokens), width)]
    return b"\n".join(lines)


def matrix_to_oip_body(matrix: np.ndarray) -> tuple[bytes, int | None]:
    """A float32 C-contiguous (n, F) matrix as an Open Inference Protocol request body.

    Returns (body, None) for a JSON body, ``data`` flat in row order, NaN sent as ``null`` (JSON
    has no NaN; the server reads null as a missing value). JSON has no infinity either: a
    matrix holding +-inf goes as the protocol's binary tensor extension instead, and the second
    item is then the JSON header's length in bytes (the ``Inference-Header-Content-Length``
    header); the little-endian float32 bytes that follow carry every value exactly.
    """
    data = orjson.dumps(matrix.reshape(-1), option=_NUMPY)  # allocates; NaN, +-inf -> null
    n_rows, n_features = matrix.shape
    if b"n" in data and _has_inf(matrix):
        raw = matrix.astype("<f4", copy=False).tobytes()  # allocates
        header = (
            b'{"inputs":[{"name":"input-0","shape":[%d,%d],"datatype":"FP32",'
            b'"parameters":{"binary_data_size":%d}}]}' % (n_rows, n_features, len(raw))
        )
        return header + raw, len(header)
    body = b'{"inputs":[{"name":"input-0","shape":[%d,%d],"datatype":"FP32","data":%b}]}' % (
        n_rows,
        n_features,
        data,
    )
    return body, None


def csv_to_scores(body: bytes) -> np.ndarray:
    """A CSV scores body (one line per row, K comma-separated values for multiclass) as a
    float32 array of shape (n,) or (n, K). ``nan``/``inf`` tokens and ``\\r\\n`` are accepted."""
    text = body.strip()
    if b"," not in text and b"\n" not in text:  # one row, one output: the RTB case
        try:
            return np.array([float(text)], dtype=np.float32)
        except ValueError:
            raise RtbError(
                f"server sent a CSV answer that is not a number: {body[:80]!r}"
            ) from None
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    width = text.count(b",", 0, text.find(b"\n") if b"\n" in text else len(text)) + 1
    flat = text.replace(b"\n", b",")
    try:
        values = orjson.loads(b"[" + flat + b"]")  # allocates; all plain numbers: fastest
    except orjson.JSONDecodeError:
        try:
            values = [float(token) for token in flat.split(b",")]  # nan, inf
        except ValueError:
            raise RtbError(f"server sent a CSV answer that is not numbers: {body[:80]!r}") from None
    scores = np.array(values, dtype=np.float32)  # allocates
    if width == 1:
        return scores
    if scores.size % width:
        raise RtbError(f"server sent ragged CSV scores ({scores.size} values, {width} per row)")
    return scores.reshape(-1, width)


def json_to_scores(body: bytes) -> np.ndarray:
    """A ``{"predictions": [{"score": p} | {"scores": [...]}, ...]}`` body as float32 scores;
    ``null`` (the server's spelling of a non-finite score) becomes NaN."""
    try:
        predictions = orjson.loads(body)["predictions"]
        if predictions and "scores" in predictions[0]:
            return np.array([p["scores"] for p in predictions], dtype=np.float32)
        return np.array([p["score"] for p in predictions], dtype=np.float32)
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise RtbError(f"server sent an unexpected JSON answer: {body[:80]!r}") from exc


def oip_json_to_scores(body: bytes) -> np.ndarray:
    """An Open Inference Protocol response's first output as float32 scores, shaped by its
    ``shape``; ``null`` becomes NaN."""
    try:
        output = orjson.loads(body)["outputs"][0]
        return np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise RtbError(f"server sent an unexpected inference response: {body[:80]!r}") from exc


def response_to_error(status: int, body: bytes) -> RtbError:
    """The exception for a non-2xx answer: from the JSON error body
    ``{"code": status, "type": code, "message": text}``, else a plain ``RtbError``."""
    try:
        doc = orjson.loads(body)
        code, message = doc["type"], doc["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return error_for_code("", f"HTTP {status}: {text or 'no body'}", status=status)
    return error_for_code(code, message, status=status)


def _scores_from(answer: _Answer, n_rows: int, is_oip: bool) -> Prediction:
    status, content_type, body, is_fail_open, _ = answer
    if status != 200:
        raise response_to_error(status, body)
    if is_oip:
        scores = oip_json_to_scores(body)
    elif content_type.startswith(b"application/json"):
        scores = json_to_scores(body)
    else:
        scores = csv_to_scores(body)
    if scores.shape[0] != n_rows:
        raise RtbError(f"server sent {scores.shape[0]} scores for {n_rows} rows")
    return Prediction(scores, is_fail_open)


def _deadline_line(deadline_ms: float) -> bytes:
    value = float(deadline_ms)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"deadline_ms must be a positive number of milliseconds, got {value!r}")
    return f"{DEADLINE_HEADER}: {value:.15g}\r\n".encode()


def _json_or_error(answer: _Answer) -> dict[str, Any]:
    status, _, body, _, _ = answer
    if status != 200:
        raise response_to_error(status, body)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RtbError(f"server sent invalid JSON: {body[:80]!r}") from exc
    if not isinstance(doc, dict):
        raise RtbError(f"server sent JSON {type(doc).__name__}, expected an object")
    return doc


def _is_ready(answer: _Answer) -> bool:
    status, _, body, _, _ = answer
    if status == 200:
        return True
    if status == 503:
        return False
    raise response_to_error(status, body)


# --------------------------------------------------------------------------- wire


class _Endpoint:
    """Where requests go, and the request heads that never change (cached per route)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"expected an http:// URL, got {base_url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rpartition("@")[2]
        self.url = f"http://{self._host_header}{self.prefix}"
        self._heads: dict[tuple[str, str, str | None, str | None], bytes] = {}

    def head(self, method: str, path: str, content_type: str | None, accept: str | None) -> bytes:
        """Request line and fixed headers, each ending in CRLF, without the blank line."""
        key = (method, path, content_type, accept)
        head = self._heads.get(key)
        if head is None:
            for part in key:
                if part is not None and ("\r" in part or "\n" in part):
                    raise ValueError(f"CR or LF in a request line or header: {part!r}")
            lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self._host_header}"]
            if content_type is not None:
                lines.append(f"content-type: {content_type}")
            if accept is not None:
                lines.append(f"accept: {accept}")
            head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
            if len(self._heads) < _MAX_CACHED_HEADS:
                self._heads[key] = head
        return head

    def predict_request(
        self, rows: ArrayLike, model: str | None, deadline_ms: float | None, accept: str
    ) -> tuple[bytes, int]:
        """The complete request bytes for a predict call, and its row count."""
        matrix = rows_to_matrix(rows)
        if model is None:
            body = matrix_to_csv(matrix)
            head = self.head("POST", "/invocations", _CSV, accept)
        else:
            path = f"/v2/models/{_quote(model)}/infer"
            body, header_length = matrix_to_oip_body(matrix)
            if header_length is None:
                head = self.head("POST", path, _JSON, _JSON)
            else:
                head = self.head("POST", path, "application/octet-stream", _JSON)
                head += b"inference-header-content-length: %d\r\n" % header_length
        extra = b"" if deadline_ms is None else _deadline_line(deadline_ms)
        length = b"content-length: %d\r\n" % len(body)
        return b"".join((head, length, extra, b"\r\n", body)), matrix.shape[0]  # allocates

    def get_request(self, path: str) -> bytes:
        return self.head("GET", path, None, None) + b"\r\n"


def _quote(model: str) -> str:
    if not model:
        raise ValueError("model name must not be empty")
    return quote(model, safe="")


class _ResponseReader:
    """One response at a time from an ``httptools.HttpResponseParser`` (which calls the
    ``on_*`` methods); reused for every response of one connection. Not thread-safe."""

    __slots__ = (
        "_parser",
        "_parts",
        "status",
        "content_type",
        "is_fail_open",
        "is_keep_alive",
        "is_complete",
        "has_bytes",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self._parts: list[bytes] = []
        self.status = 0
        self.content_type = b""
        self.is_fail_open = False
        self.is_keep_alive = True
        self.is_complete = False
        self.has_bytes = False

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises ``httptools.HttpParserError`` for bytes that are not HTTP."""
        self.has_bytes = True
        self._parser.feed_data(data)

    def answer(self) -> _Answer:
        parts = self._parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self.status, self.content_type, body, self.is_fail_open, self.is_keep_alive

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 12 and name.lower() == b"content-type":
            self.content_type = value.strip().lower()
        elif size == 15 and name.lower() == _FAIL_OPEN_NAME:
            self.is_fail_open = value.strip().lower() in (b"1", b"true")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.status = parser.get_status_code()
        self.is_keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)

    def on_message_complete(self) -> None:
        self.is_complete = True


# --------------------------------------------------------------------------- sync


class _SocketConnection:
    """One blocking keep-alive socket. Used by one thread at a time (the pool hands it out)."""

    __slots__ = ("sock", "reader", "where", "timeout_s")

    def __init__(self, endpoint: _Endpoint, timeout_s: float) -> None:
        self.where = f"{endpoint.host}:{endpoint.port}"
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout_s)  # syscall
        except TimeoutError as exc:
            raise RequestTimedOut(f"cannot connect to {self.where} within {timeout_s} s") from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {self.where}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.reader = _ResponseReader()
        self.timeout_s = timeout_s  # the socket's current per-operation timeout

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def exchange(self, request: bytes, deadline: float) -> _Answer:
        """Send ``request`` and read its complete answer by ``deadline`` (``time.monotonic``).

        Raises ``_ClosedBeforeAnswer`` when the connection fails before any answer byte,
        ``RequestTimedOut``, or ``ConnectionFailed``; after any of them the socket is unusable.
        """
        sock = self.sock
        reader = self.reader
        reader.reset()
        remaining = deadline - time.monotonic()
        if remaining <= 0.0:
            raise RequestTimedOut(f"no time left to send a request to {self.where}")
        if abs(self.timeout_s - remaining) > _TIMEOUT_SLACK_S:
            # settimeout is a syscall: a pooled socket already holds ~the whole budget
            sock.settimeout(remaining)
            self.timeout_s = remaining
        try:
            sock.sendall(request)  # syscall
            while True:
                chunk = sock.recv(_RECV_BYTES)  # syscall
                if not chunk:
                    raise ConnectionResetError("connection closed by the server")
                reader.feed(chunk)
                if reader.is_complete:
                    return reader.answer()
                remaining = deadline - time.monotonic()
                if remaining <= 0.0:
                    raise TimeoutError
                sock.settimeout(remaining)
                self.timeout_s = remaining
        except TimeoutError as exc:
            raise RequestTimedOut(
                f"no complete answer from {self.where} within the call's timeout"
            ) from exc
        except httptools.HttpParserError as exc:
            raise ConnectionFailed(f"malformed HTTP answer from {self.where}: {exc}") from exc
        except OSError as exc:
            if reader.has_bytes:
                raise ConnectionFailed(
                    f"connection to {self.where} broke mid-answer: {exc}"
                ) from exc
            raise _ClosedBeforeAnswer(
                f"connection to {self.where} closed before any answer: {exc}"
            ) from exc

    def close(self) -> None:
        self.sock.close()


class HttpClient:
    """A thread-safe rtbserve client over a pool of keep-alive HTTP/1.1 connections.

    ``base_url``: ``http://host:port`` (a path prefix is allowed). ``pool_size``: most
    connections open at once (>= 1); a call that finds all busy waits for one. ``timeout_s``:
    limit on each whole call, connection wait, connect and any retry included. Connections
    open lazily. Use it from any number of threads; ``close()`` (or ``with``) closes the pool.
    ``connections_opened`` counts the TCP connections opened so far.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, *, pool_size: int = 16, timeout_s: float = 1.0
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._endpoint = _Endpoint(base_url)
        self.base_url = self._endpoint.url
        self.pool_size = pool_size
        self.timeout_s = float(timeout_s)
        self.connections_opened = 0
        self._idle: list[_SocketConnection] = []
        self._opened = 0  # connections open or being opened, idle or in use
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # signalled on release while _n_waiting
        self._n_waiting = 0
        self._is_closed = False

    def __repr__(self) -> str:
        return f"HttpClient({self.base_url!r}, pool_size={self.pool_size})"

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public calls --------------------------------------------------------------------

    def predict(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
        accept: str = _CSV,
    ) -> np.ndarray:
        """Score ``rows``; returns float32 scores of shape (n,), or (n, K) for K outputs.

        ``rows``: an (n, F) array-like or one row of F values, cast to float32; NaN (or None)
        is a missing value. ``model``: None posts CSV to ``/invocations`` (the default model);
        a name posts an Open Inference Protocol JSON request to ``/v2/models/{model}/infer``,
        where NaN is sent as JSON ``null`` (JSON has no NaN; the server reads null as missing)
        and rows holding +-inf go as binary tensor data. ``deadline_ms``: the server's time
        budget for this call (ms), sent as ``x-rtb-deadline-ms``. ``accept``: the answer
        format for ``/invocations``, ``text/csv`` or ``application/json``. Raises the server's
        ``RtbError`` subclass, or ``ConnectionFailed``/``RequestTimedOut``. A fail-open answer
        is returned like any other; use ``predict_with_info`` to see it.
        """
        return self.predict_with_info(rows, model=model, deadline_ms=deadline_ms, accept=accept)[0]

    def predict_with_info(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
        accept: str = _CSV,
    ) -> Prediction:
        """``predict``, returning ``Prediction(scores, is_fail_open)``."""
        request, n_rows = self._endpoint.predict_request(rows, model, deadline_ms, accept)
        return _scores_from(self._exchange(request), n_rows, model is not None)

    def ping(self) -> bool:
        """True when ``GET /ping`` answers 200; False for 503 (loading, draining) or when the
        server cannot be reached."""
        try:
            return self._exchange(self._endpoint.get_request("/ping"))[0] == 200
        except ConnectionFailed:
            return False

    def ready(self, model: str | None = None) -> bool:
        """Open Inference Protocol readiness: ``/v2/health/ready``, or ``/v2/models/{model}/ready``.

        True on 200; False on 503 or when the server cannot be reached; other answers raise
        the server's error (``ModelNotFound`` for an unknown model).
        """
        path = "/v2/health/ready" if model is None else f"/v2/models/{_quote(model)}/ready"
        try:
            answer = self._exchange(self._endpoint.get_request(path))
        except ConnectionFailed:
            return False
        return _is_ready(answer)

    def metadata(self, model: str) -> dict[str, Any]:
        """The model's Open Inference Protocol metadata (``GET /v2/models/{model}``)."""
        request = self._endpoint.get_request(f"/v2/models/{_quote(model)}")
        return _json_or_error(self._exchange(request))

    def close(self) -> None:
        """Close idle connections now and busy ones when their call ends. Idempotent."""
        with self._lock:
            self._is_closed = True
            idle, self._idle = self._idle, []
            self._opened -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    # -- pool ----------------------------------------------------------------------------

    def _exchange(self, request: bytes) -> _Answer:
        deadline = time.monotonic() + self.timeout_s
        conn = self._acquire(deadline)  # a pooled connection, or None: a free slot to fill
        is_reused = conn is not None
        try:
            if conn is None:
                conn = self._connect(deadline)
            try:
                answer = conn.exchange(request, deadline)
            except _ClosedBeforeAnswer:
                if not is_reused:
                    raise
                # the server closed this idle keep-alive connection: resend once on a new one
                conn.close()
                conn = None
                conn = self._connect(deadline)
                answer = conn.exchange(request, deadline)
        except BaseException:
            if conn is not None:
                conn.close()
            self._release(None)
            raise
        if answer[4]:
            self._release(conn)
        else:
            conn.close()
            self._release(None)
        return answer

    def _connect(self, deadline: float) -> _SocketConnection:
        remaining = deadline - time.monotonic()
        if remaining <= 0.0:
            raise RequestTimedOut(f"no time left to connect to {self.base_url}")
        conn = _SocketConnection(self._endpoint, remaining)
        with self._lock:
            self.connections_opened += 1
        return conn

    def _acquire(self, deadline: float) -> _SocketConnection | None:
        with self._lock:
            while True:
                if self._is_closed:
                    raise ConnectionFailed(f"{self!r} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._opened < self.pool_size:
                    self._opened += 1
                    return None
                remaining = deadline - time.monotonic()
                self._n_waiting += 1
                try:
                    is_woken = remaining > 0.0 and self._cond.wait(remaining)
                finally:
                    self._n_waiting -= 1
                if not is_woken:
                    raise RequestTimedOut(
                        f"all {self.pool_size} connections to {self.base_url} stayed busy"
                    )

    def _release(self, conn: _SocketConnection | None) -> None:
        with self._lock:
            if conn is not None and not self._is_closed:
                self._idle.append(conn)
                conn = None
            else:
                self._opened -= 1
            if self._n_waiting:
                self._cond.notify()  # Condition.notify is Python code: skip it when nobody waits
        if conn is not None:
            conn.close()


# --------------------------------------------------------------------------- async


class _StreamConnection:
    """One keep-alive connection as an asyncio protocol (duck-typed, so this module does not
    import asyncio). ``send`` returns a future for the answer. Event loop thread only."""

    __slots__ = ("reader", "transport", "waiter", "is_lost", "where")

    def __init__(self, where: str) -> None:
        self.reader = _ResponseReader()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[_Answer] | None = None
        self.is_lost = False
        self.where = where

    @property
    def local_port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[_Answer]:
        """Write ``request``; the future gets the answer, or the error that ended the exchange."""
        transport = self.transport
        assert transport is not None
        if self.is_lost or transport.is_closing():
            # the server's FIN arrived and connection_lost is still queued: a closing transport
            # would drop the write silently, so fail now and let the caller resend
            raise _ClosedBeforeAnswer(f"connection to {self.where} closed while idle")
        self.reader.reset()
        self.waiter = waiter = loop.create_future()
        transport.write(request)  # syscall
        return waiter

    def close(self) -> None:
        self.is_lost = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        reader = self.reader
        try:
            reader.feed(data)
        except httptools.HttpParserError as exc:
            self.waiter = None
            waiter.set_exception(
                ConnectionFailed(f"malformed HTTP answer from {self.where}: {exc}")
            )
            self.close()
            return
        if reader.is_complete:
            self.waiter = None
            waiter.set_result(reader.answer())

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost settles any waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        waiter = self.waiter
        self.waiter = None
        if waiter is None or waiter.done():
            return
        reason = exc or "closed by the server"
        if self.reader.has_bytes:
            waiter.set_exception(
                ConnectionFailed(f"connection to {self.where} broke mid-answer: {reason}")
            )
        else:
            waiter.set_exception(
                _ClosedBeforeAnswer(
                    f"connection to {self.where} closed before any answer: {reason}"
                )
            )

    def pause_writing(self) -> None:
        pass  # requests are single writes; the transport buffers a large one

    def resume_writing(self) -> None:
        pass


def _expire(waiter: asyncio.Future[Any], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(RequestTimedOut(message))


class AsyncHttpClient:
    """``HttpClient`` for asyncio (and uvloop): the same calls as coroutines.

    Concurrent calls use different connections, up to ``pool_size``; more wait in FIFO order
    for one to come back. ``timeout_s`` bounds each whole call. The client binds to the event
    loop of its first call; use one client per loop. ``await close()`` (or ``async with``)
    closes the pool. Not thread-safe: call it from its loop's thread only.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, *, pool_size: int = 16, timeout_s: float = 1.0
    ) -> None:
        from asyncio import get_running_loop  # only async users pay for importing asyncio

        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._endpoint = _Endpoint(base_url)
        self.base_url = self._endpoint.url
        self.pool_size = pool_size
        self.timeout_s = float(timeout_s)
        self.connections_opened = 0
        self._get_running_loop = get_running_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_StreamConnection] = []
        self._waiters: deque[asyncio.Future[_StreamConnection | None]] = deque()
        self._opened = 0  # connections open or being opened, idle or in use
        self._is_closed = False

    def __repr__(self) -> str:
        return f"AsyncHttpClient({self.base_url!r}, pool_size={self.pool_size})"

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- public calls --------------------------------------------------------------------

    async def predict(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
        accept: str = _CSV,
    ) -> np.ndarray:
        """Score ``rows``: float32 scores of shape (n,) or (n, K); see ``HttpClient.predict``."""
        request, n_rows = self._endpoint.predict_request(rows, model, deadline_ms, accept)
        return _scores_from(await self._exchange(request), n_rows, model is not None)[0]

    async def predict_with_info(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
        accept: str = _CSV,
    ) -> Prediction:
        """``predict``, returning ``Prediction(scores, is_fail_open)``."""
        request, n_rows = self._endpoint.predict_request(rows, model, deadline_ms, accept)
        return _scores_from(await self._exchange(request), n_rows, model is not None)

    async def ping(self) -> bool:
        """True when ``GET /ping`` answers 200; False for 503 or an unreachable server."""
        try:
            return (await self._exchange(self._endpoint.get_request("/ping")))[0] == 200
        except ConnectionFailed:
            return False

    async def ready(self, model: str | None = None) -> bool:
        """Server or model readiness; see ``HttpClient.ready``."""
        path = "/v2/health/ready" if model is None else f"/v2/models/{_quote(model)}/ready"
        try:
            answer = await self._exchange(self._endpoint.get_request(path))
        except ConnectionFailed:
            return False
        return _is_ready(answer)

    async def metadata(self, model: str) -> dict[str, Any]:
        """The model's Open Inference Protocol metadata (``GET /v2/models/{model}``)."""
        request = self._endpoint.get_request(f"/v2/models/{_quote(model)}")
        return _json_or_error(await self._exchange(request))

    async def close(self) -> None:
        """Close idle connections now and busy ones when their call ends; calls waiting for a
        connection fail with ``ConnectionFailed``. Idempotent."""
        self._is_closed = True
        idle, self._idle = self._idle, []
        self._opened -= len(idle)
        for conn in idle:
            conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionFailed(f"{self!r} is closed"))

    # -- pool ----------------------------------------------------------------------------

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                raise RuntimeError(f"{self!r} is bound to another event loop; use one per loop")
            self._loop = loop
        return loop

    async def _exchange(self, request: bytes) -> _Answer:
        loop = self._bound_loop()
        deadline = loop.time() + self.timeout_s
        conn = await self._acquire(loop, deadline)  # a pooled connection, or None: a free slot
        is_reused = conn is not None
        try:
            if conn is None:
                conn = await self._connect(loop, deadline)
            try:
                answer = await self._roundtrip(conn, request, loop, deadline)
            except _ClosedBeforeAnswer:
                if not is_reused:
                    raise
                # the server closed this idle keep-alive connection: resend once on a new one
                conn.close()
                conn = None
                conn = await self._connect(loop, deadline)
                answer = await self._roundtrip(conn, request, loop, deadline)
        except BaseException:
            if conn is not None:
                conn.close()
            self._release(None)
            raise
        if answer[4]:
            self._release(conn)
        else:
            conn.close()
            self._release(None)
        return answer

    async def _roundtrip(
        self,
        conn: _StreamConnection,
        request: bytes,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> _Answer:
        waiter = conn.send(request, loop)
        timer = loop.call_at(deadline, _expire, waiter, f"no complete answer from {conn.where}")
        try:
            return await waiter
        finally:
            timer.cancel()

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _StreamConnection:
        import asyncio

        endpoint = self._endpoint
        conn = _StreamConnection(f"{endpoint.host}:{endpoint.port}")
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, endpoint.host, endpoint.port)
        except TimeoutError as exc:
            raise RequestTimedOut(f"cannot connect to {conn.where} in time") from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {conn.where}: {exc}") from exc
        self.connections_opened += 1
        return conn

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _StreamConnection | None:
        if self._is_closed:
            raise ConnectionFailed(f"{self!r} is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.is_lost:
                return conn
            self._opened -= 1  # closed by the server while idle
        if self._opened < self.pool_size:
            self._opened += 1
            return None
        waiter: asyncio.Future[_StreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        message = f"all {self.pool_size} connections to {self.base_url} stayed busy"
        timer = loop.call_at(deadline, _expire, waiter, message)
        try:
            conn = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a slot this call will not use
            raise
        finally:
            timer.cancel()
        if conn is not None and conn.is_lost:
            return None  # keep the slot, open a new connection in it
        return conn

    def _release(self, conn: _StreamConnection | None) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # hand the connection (or its free slot) straight over
                return
        if conn is None:
            self._opened -= 1
        elif self._is_closed:
            conn.close()
            self._opened -= 1
        else:
            self._idle.append(conn)
