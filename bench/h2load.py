"""h2load (nghttp2's C load tester) as the closed-loop client: runs, output parsing, gRPC bodies.

The Python load generator (``bench.loadgen``) spends 110-210 us of CPU per gRPC message, as
much as the servers it measures on the same 2 cores, so its closed-loop gRPC maximum is largely
its own; h2load spends 10-40 us. (Over HTTP/1.1 both spend ~9-14 us per request, almost all of
it in the kernel: one write and one read per request.) ``bench.serving`` uses h2load for the
closed-loop rows when it is installed (Debian: ``apt-get install nghttp2-client``) and keeps the
Python generator for open-loop latency.

A run (``run_h2load``) is two h2load processes: a warm-up (``-D warmup_s``, figures discarded),
then the measured run on fresh connections, with no h2load warm-up phase, so that the server's
CPU (``/proc`` tree accounting), h2load's own CPU (``RUSAGE_CHILDREN``) and h2load's request
counts cover the same interval. Requests still in flight when h2load stops (at most
connections x streams) are not counted as done; the server's CPU for them is, which biases CPU
per request up by that fraction (under 1% in ``bench.serving``).

gRPC over h2load: a gRPC call is an HTTP/2 POST to ``/package.Service/Method`` with
``content-type: application/grpc`` and ``te: trailers``, and a body of length-prefixed messages
(1 flag byte, 0 = uncompressed; 4 bytes big-endian length; the serialized message). A
``PredictStream`` request carrying N messages gets N answers, then trailers, once the client
half-closes (h2load sends the whole body with END_STREAM). h2load reads HTTP status codes only:
a call that fails with a ``grpc-status`` in its trailers still counts as 2xx. So answers are
checked two ways: ``check_grpc_answers`` sends the same messages once with a Python grpc client
(status OK, every request_id answered once, no ``error`` set), which also gives the size of a
correct answer; and after the run, any shortfall in the DATA bytes h2load received against
done x that size counts as missing answers (an error answer carries no message: a lower bound,
since bytes from calls still in flight at the stop can mask a few).
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.loadgen.cpu import machine_busy_s, tree_cpu_s
from bench.loadgen.targets import (
    PREDICT_METHOD,
    STREAM_METHOD,
    Target,
    grpc_request_base,
    predictor_pb2,
    request_id_field,
)

INSTALL_HINT = "apt-get install nghttp2-client"
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
UNARY_REQUEST_ID = b"u"
_FRAME_HEADER = struct.Struct(">BI")  # compressed flag, message length
_EXTRA_BUDGET_S = 30.0  # per h2load process, on top of its -D duration
_CHECK_TIMEOUT_S = 10.0


class H2loadError(RuntimeError):
    """h2load failed, printed something unparseable, or a server's answers were wrong."""


def h2load_path() -> str | None:
    """The h2load executable on PATH, or None (install: ``apt-get install nghttp2-client``)."""
    return shutil.which("h2load")


def h2load_version(exe: str | None = None) -> str:
    """``nghttp2/1.52.0`` or similar; empty when h2load is missing or does not say."""
    exe = exe or h2load_path()
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"nghttp2/\S+", out)
    return m.group(0) if m else out.strip()


# --------------------------------------------------------------------------- gRPC bodies


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return _FRAME_HEADER.pack(0, len(message)) + message


def grpc_unframe(body: bytes) -> list[bytes]:
    """The messages of a gRPC body (the inverse of ``grpc_frame``, concatenated).

    Raises ``ValueError`` on a compressed message or a body that ends inside a frame.
    """
    out = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < _FRAME_HEADER.size:
            raise ValueError(f"truncated gRPC frame header at byte {pos} of {len(body)}")
        flag, n = _FRAME_HEADER.unpack_from(body, pos)
        if flag != 0:
            raise ValueError(f"expected compressed flag 0 at byte {pos}, got {flag}")
        pos += _FRAME_HEADER.size
        if len(body) - pos < n:
            raise ValueError(f"gRPC message at byte {pos} needs {n} bytes, {len(body) - pos} left")
        out.append(body[pos : pos + n])
        pos += n
    return out


def grpc_unary_body(target: Target) -> bytes:
    """One ``PredictRequest`` (request_id ``u``), framed: the body of every unary call."""
    return grpc_frame(grpc_request_base(target) + request_id_field(UNARY_REQUEST_ID))


def grpc_stream_body(target: Target, messages: int) -> bytes:
    """``messages`` framed ``PredictRequest`` s with request_ids ``s0`` .. ``s{messages-1}``.

    Every stream carries the same ids: they need to be unique among one stream's unanswered
    messages only.
    """
    if not 1 <= messages <= 10**6:
        raise ValueError(f"expected 1..1000000 messages per stream, got {messages}")
    base = grpc_request_base(target)
    return b"".join(grpc_frame(base + request_id_field(b"s%d" % i)) for i in range(messages))


# --------------------------------------------------------------------------- answer checks


def compare_answers(requests: list[bytes], answers: list[bytes]) -> None:
    """Raise ``H2loadError`` unless ``answers`` (serialized ``PredictResponse`` s, any order)
    answer ``requests`` (serialized ``PredictRequest`` s) one for one, by request_id, each
    with scores and no ``error``."""
    pb2 = predictor_pb2()
    sent = Counter(pb2.PredictRequest.FromString(m).request_id for m in requests)
    got: Counter[str] = Counter()
    for raw in answers:
        resp = pb2.PredictResponse.FromString(raw)
        if resp.HasField("error"):
            raise H2loadError(
                f"answer {resp.request_id!r} has error {resp.error.code}: {resp.error.message}"
            )
        if not resp.scores:
            raise H2loadError(f"answer {resp.request_id!r} has no scores")
        got[resp.request_id] += 1
    if got != sent:
        missing = sorted((sent - got).elements())[:5]
        extra = sorted((got - sent).elements())[:5]
        raise H2loadError(
            f"expected one answer per request_id ({len(requests)} requests, "
            f"{len(answers)} answers); missing {missing}, unexpected {extra}"
        )


def check_grpc_answers(host: str, port: int, method: str, body: bytes) -> dict[str, Any]:
    """Send ``body``'s messages once with a Python grpc client and check the answers.

    method: ``PREDICT_METHOD`` (unary: ``body`` holds one message) or ``STREAM_METHOD`` (one
    stream with every message, half-closed after the last). Checks status OK and
    ``compare_answers``; returns ``{"messages", "answer_bytes"}``, the latter the DATA bytes
    (frame headers included) h2load should receive per request.
    Raises ``H2loadError`` when the call fails or the answers are wrong.
    """
    import grpc

    requests = grpc_unframe(body)
    if method == PREDICT_METHOD and len(requests) != 1:
        raise ValueError(f"a unary body holds 1 message, got {len(requests)}")
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            # no serializers: bytes go out and come back as they are on the wire
            if method == PREDICT_METHOD:
                raw, call = channel.unary_unary(method).with_call(
                    requests[0], timeout=_CHECK_TIMEOUT_S
                )
                answers = [raw]
            else:
                call = channel.stream_stream(method)(iter(requests), timeout=_CHECK_TIMEOUT_S)
                answers = list(call)
            code = call.code()
    except grpc.RpcError as exc:
        raise H2loadError(f"{method} on port {port} failed: {exc.code()} {exc.details()}") from exc
    if code != grpc.StatusCode.OK:
        raise H2loadError(f"{method} on port {port} ended with {code}")
    compare_answers(requests, answers)
    framed = sum(_FRAME_HEADER.size + len(a) for a in answers)
    return {"messages": len(answers), "answer_bytes": framed}


def check_http_answer(target: Target) -> dict[str, Any]:
    """POST ``target``'s body once; raise ``H2loadError`` unless 200 with one float per line."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=_CHECK_TIMEOUT_S)
    try:
        headers = {"content-type": target.content_type, **dict(target.headers)}
        conn.request("POST", target.path, body=target.body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise H2loadError(f"POST {target.path} on port {target.port}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise H2loadError(f"POST {target.path}: expected 200, got {resp.status}: {data[:200]!r}")
    try:
        scores = [float(x) for x in data.decode().split()]
    except ValueError:
        scores = []
    if not scores:
        raise H2loadError(f"POST {target.path}: expected CSV scores, got {data[:200]!r}")
    return {"status": resp.status, "answer_bytes": len(data)}


# --------------------------------------------------------------------------- output parsing

_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_RX_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.M)
_RX_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored(?:, (\d+) timeout)?",
    re.M,
)
_RX_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_RX_TRAFFIC = re.compile(
    r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data", re.M
)
_RX_TIME = re.compile(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)
_RX_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.M)


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"expected a duration like 127us, 1.19ms or 2.00s, got {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_h2load_output(text: str) -> dict[str, Any]:
    """h2load's summary -> numbers (durations in ms, traffic in bytes).

    Returns ``finished_s``, ``req_per_s``, ``requests`` (total, started, done, succeeded,
    failed, errored, timeout), ``status`` (2xx..5xx), ``traffic`` (total, headers, data),
    ``request_ms`` (min, max, mean, sd) and ``protocol`` (``h2c`` or ``http/1.1``; None when
    no connection was made). Raises ``ValueError`` when a summary line is missing.
    """

    def need(rx: re.Pattern[str], what: str) -> re.Match[str]:
        m = rx.search(text)
        if m is None:
            tail = "\n".join(text.strip().splitlines()[-5:])
            raise ValueError(f"no {what} line in h2load's output; it ends:\n{tail}")
        return m

    fin = need(_RX_FINISHED, "'finished in'")
    req = need(_RX_REQUESTS, "'requests:'")
    st = need(_RX_STATUS, "'status codes:'")
    tr = need(_RX_TRAFFIC, "'traffic:'")
    tm = need(_RX_TIME, "'time for request:'")
    proto = _RX_PROTOCOL.search(text)
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return {
        "finished_s": _duration_ms(fin.group(1) + fin.group(2)) / 1e3,
        "req_per_s": float(fin.group(3)),
        "requests": {k: int(v or 0) for k, v in zip(names, req.groups(), strict=True)},
        "status": {
            k: int(v) for k, v in zip(("2xx", "3xx", "4xx", "5xx"), st.groups(), strict=True)
        },
        "traffic": {
            k: int(v) for k, v in zip(("total", "headers", "data"), tr.groups(), strict=True)
        },
        "request_ms": {
            k: _duration_ms(v)
            for k, v in zip(("min", "max", "mean", "sd"), tm.groups(), strict=True)
        },
        "protocol": proto.group(1) if proto else None,
    }


def missing_answers(done: int, data_bytes: int, answer_bytes: int, messages: int = 1) -> int:
    """Answers (messages) that did not arrive, judged from DATA bytes: a lower bound.

    done: requests h2load completed; data_bytes: the DATA bytes it received; answer_bytes: the
    bytes one complete request's answers take (``check_grpc_answers``); messages: answers per
    request. A failed gRPC call (trailers only) carries no DATA, so each one leaves a gap of its
    answer's size; bytes from requests still in flight at the stop can hide part of a gap.
    """
    short = done * answer_bytes - data_bytes
    if short <= 0 or answer_bytes <= 0:
        return 0
    return math.ceil(short / (answer_bytes / messages))


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class H2Run:
    """One closed-loop h2load measurement.

    url: ``http://<loopback>:port/path`` (h2c prior knowledge, or HTTP/1.1 with ``h1``).
    body: POSTed on every request (``-d``). headers: ``-H`` each.
    connections: ``-c``. streams: ``-m``, concurrent requests per connection (HTTP/2); HTTP/1.1
    is always 1 (no pipelining). threads: ``-t`` (at most ``connections``).
    duration_s / warmup_s: the measured run, after a separate warm-up run (0: none).
    messages: answers per request (``PredictStream`` bodies of N messages); rates and CPU per
    request are per message.
    answer_bytes: DATA bytes of one request's complete answers, for ``missing_answers``
    (None: no byte check, e.g. HTTP/1.1, where status codes tell errors).
    """

    url: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    connections: int = 64
    streams: int = 1
    h1: bool = False
    threads: int = 1
    duration_s: float = 2.0
    warmup_s: float = 0.5
    messages: int = 1
    answer_bytes: int | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        host = "127.0.0.1" if parts.hostname == "localhost" else (parts.hostname or "")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if parts.scheme != "http" or not loopback:
            raise ValueError(f"expected an http:// URL on a loopback address, got {self.url!r}")
        if self.connections < 1 or self.streams < 1 or self.threads < 1 or self.messages < 1:
            raise ValueError("expected connections, streams, threads and messages >= 1")
        if self.h1 and self.streams != 1:
            raise ValueError(f"HTTP/1.1 runs have 1 request per connection, got {self.streams}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("expected duration_s > 0 and warmup_s >= 0")

    @property
    def in_flight(self) -> int:
        return self.connections * self.streams


def h2load_argv(run: H2Run, body_path: str, duration_s: float, exe: str = "h2load") -> list[str]:
    """The h2load command line for ``run`` lasting ``duration_s`` (h2load counts whole ms)."""
    argv = [
        exe,
        "-c", str(run.connections),
        "-m", str(run.streams),
        "-t", str(min(run.threads, run.connections)),
        "-D", f"{max(1, round(duration_s * 1000))}ms",
        "-d", body_path,
    ]  # fmt: skip
    for k, v in run.headers:
        if any(c in k + v for c in "\r\n"):
            raise ValueError(f"header contains CR or LF: {k!r}: {v!r}")
        argv += ["-H", f"{k}: {v}"]
    if run.h1:
        argv.append("--h1")
    argv.append(run.url)
    return argv


def http_run(target: Target, **kw: Any) -> H2Run:
    """HTTP/1.1 POSTs of ``target``'s body (one per connection at a time)."""
    headers = (("content-type", target.content_type), *target.headers)
    url = f"http://{target.host}:{target.port}{target.path}"
    return H2Run(url, target.body, headers, h1=True, streams=1, **kw)


def grpc_run(target: Target, body: bytes, *, messages: int = 1, **kw: Any) -> H2Run:
    """gRPC calls over h2c: unary ``Predict`` (``target.kind == "grpc"``) or ``PredictStream``."""
    method = PREDICT_METHOD if target.kind == "grpc" else STREAM_METHOD
    url = f"http://{target.host}:{target.port}{method}"
    return H2Run(url, body, GRPC_HEADERS, messages=messages, **kw)


def _invoke(argv: list[str], budget_s: float) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        raise H2loadError(f"h2load did not finish within {budget_s:.0f} s") from exc
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-5:])
        raise H2loadError(f"h2load exited with {out.returncode}:\n{tail}")
    return out.stdout + out.stderr


def run_h2load(run: H2Run, *, server_pid: int | None = None, exe: str | None = None) -> dict:
    """Warm up, then measure ``run``; returns a result with the keys ``bench.serving`` reads.

    ``achieved_rate`` is answers (messages) per second over the measured ``duration_s``;
    ``errors`` counts h2load's failed / errored / timed-out requests, non-2xx statuses and
    ``missing_answers`` (when ``run.answer_bytes`` is set). ``client_cpu_us_per_request`` is
    h2load's own user + system CPU (``RUSAGE_CHILDREN``: the caller must not reap other children
    meanwhile); ``server_cpu_us_per_request`` needs ``server_pid`` (its whole process tree).
    Raises ``H2loadError`` when h2load is missing or fails, or completes no request.
    """
    exe = exe or h2load_path()
    if exe is None:
        raise H2loadError(f"h2load not found; install it with `{INSTALL_HINT}`")
    with tempfile.NamedTemporaryFile(prefix="rtbserve-h2load-", suffix=".body") as f:
        f.write(run.body)
        f.flush()
        warmup = None
        if run.warmup_s > 0:
            text = _invoke(
                h2load_argv(run, f.name, run.warmup_s, exe), run.warmup_s + _EXTRA_BUDGET_S
            )
            warmup = parse_h2load_output(text)
        argv = h2load_argv(run, f.name, run.duration_s, exe)
        server0 = tree_cpu_s(server_pid) if server_pid else 0.0
        busy0, wall0 = machine_busy_s(), time.perf_counter()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = _invoke(argv, run.duration_s + _EXTRA_BUDGET_S)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_s, wall_s = machine_busy_s() - busy0, time.perf_counter() - wall0
        server_cpu_s = tree_cpu_s(server_pid) - server0 if server_pid else 0.0
    try:
        out = parse_h2load_output(text)
    except ValueError as exc:
        raise H2loadError(str(exc)) from None
    req = out["requests"]
    done = req["done"]
    if done == 0:
        tail = "\n".join(text.strip().splitlines()[-12:])
        raise H2loadError(f"h2load completed no request (server down or refusing?):\n{tail}")
    st = out["status"]
    errors = {
        "failed": req["failed"],
        "errored": req["errored"],
        "timeout": req["timeout"],
        "non_2xx": st["3xx"] + st["4xx"] + st["5xx"],
        "missing_answers": (
            missing_answers(done, out["traffic"]["data"], run.answer_bytes, run.messages)
            if run.answer_bytes
            else 0
        ),
    }
    answered = done * run.messages
    client_cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res: dict[str, Any] = {
        "client": "h2load",
        "argv": [a if a != f.name else "<body>" for a in argv],
        "run": {k: v for k, v in asdict(run).items() if k != "body"}
        | {"body_bytes": len(run.body)},
        "mode": "max",
        "connections": run.connections,
        "streams_per_connection": run.streams,
        "in_flight": run.in_flight,
        "messages_per_request": run.messages,
        "duration_s": run.duration_s,
        "warmup_s": run.warmup_s,
        "requests": done,
        "answered": answered,
        "achieved_rate": answered / run.duration_s,
        "requests_per_s": out["req_per_s"],
        "errors": errors,
        "errors_total": sum(errors.values()),
        "latency_ms": out["request_ms"],  # per h2load request (a whole stream for streams)
        "h2load": out,
        "warmup": warmup,
        "wall_s": wall_s,
        "machine_cores_busy": busy_s / wall_s,
        "client_cpu_s": client_cpu_s,
        "client_cpu_us_per_request": client_cpu_s / answered * 1e6,
    }
    if server_pid:
        res["server_pid"] = server_pid
        res["server_cpu_s"] = server_cpu_s
        res["server_cpu_us_per_request"] = server_cpu_s / answered * 1e6
        res["other_cores_busy"] = max(0.0, (busy_s - client_cpu_s - server_cpu_s) / wall_s)
    return res
