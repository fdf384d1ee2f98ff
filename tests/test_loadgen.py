"""The load generator (bench.loadgen) against the reference servers, over real loopback sockets.

Servers are subprocesses that print a readiness line; the tests wait for that line, never sleep.
Runs are short (about a second) and low-rate: they check that the schedule is kept, answers are
counted and matched, and that open-loop latency includes client-side queueing; precise numbers
belong to ``python -m bench.serving``. The h2load driver (``bench.h2load``) is tested on captured
output and gRPC bodies, and with real ~1 s runs when h2load is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench.h2load import (  # noqa: E402
    H2loadError,
    H2Run,
    check_grpc_answers,
    check_http_answer,
    compare_answers,
    grpc_frame,
    grpc_run,
    grpc_stream_body,
    grpc_unary_body,
    grpc_unframe,
    h2load_argv,
    http_run,
    missing_answers,
    parse_h2load_output,
    run_h2load,
)
from bench.loadgen import (  # noqa: E402
    LoadError,
    LoadSpec,
    Target,
    demo_grpc_target,
    demo_http_target,
    find_max_rate,
    run_load,
)
from bench.loadgen.cpu import descendant_pids, tree_cpu_s  # noqa: E402
from bench.loadgen.grpc_client import StreamMatcher, StreamPool  # noqa: E402
from bench.loadgen.native import (  # noqa: E402
    NativeClientError,
    build_openloop,
    openloop_available,
    run_openloop,
)
from bench.loadgen.schedule import arrival_times_ns  # noqa: E402
from bench.loadgen.stats import ERROR_KINDS, Recorder, format_result  # noqa: E402
from bench.loadgen.targets import PREDICT_METHOD, STREAM_METHOD, predictor_pb2  # noqa: E402
from bench.ref_servers import ServerProcess, start_ref_server  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http_server() -> Iterator[ServerProcess]:
    server, _ = start_ref_server("http", procs=2)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[ServerProcess]:
    server, _ = start_ref_server("grpc", procs=1)
    yield server
    assert server.stop() == 0, server.output()


def assert_clean(res: dict) -> None:
    assert res["errors"] == dict.fromkeys(ERROR_KINDS, 0), res["errors"]
    assert res["unanswered"] == 0
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    svc = res["service_ms"]
    assert 0 < svc["p50"] <= svc["p99"]
    assert res["client_cpu_us_per_request"] > 0


# --------------------------------------------------------------------------- schedule


def test_fixed_arrivals_interleave_across_processes() -> None:
    start = 10**12
    parts = [arrival_times_ns(start, 1.0, 1000, procs=3, proc_index=k) for k in range(3)]
    merged = sorted(t for p in parts for t in p)
    assert len(merged) == 1000
    assert merged == [start + i * 1_000_000 for i in range(1000)]


def test_poisson_arrivals_count_and_bounds() -> None:
    start = 10**12
    times = arrival_times_ns(start, 10.0, 1000, arrivals="poisson", seed=1)
    assert abs(len(times) - 10_000) < 500  # sd 100
    assert times == sorted(times)
    assert start <= times[0] and times[-1] < start + 10**10


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Target("http", 80, "10.1.2.3")
    assert Target("http", 80, "localhost").port == 80


# --------------------------------------------------------------------------- HTTP


def test_http_fixed_rate_keeps_the_schedule(http_server: ServerProcess) -> None:
    spec = LoadSpec(
        mode="rate", rate=300, arrivals="fixed", duration_s=1.0, warmup_s=0.2, connections=4
    )
    res = run_load(demo_http_target(http_server.port), spec, server_pid=http_server.pid)
    assert abs(res["requests"] - 300) <= 1
    assert res["answered"] == 360  # warm-up included
    assert 0.9 * 300 <= res["achieved_rate"] <= 1.1 * 300
    assert_clean(res)
    assert res["server_cpu_us_per_request"] >= 0
    assert "latency ms" in format_result(res)


def test_http_poisson_over_two_processes_merges(http_server: ServerProcess) -> None:
    spec = LoadSpec(mode="rate", rate=400, duration_s=1.0, warmup_s=0.1, connections=6, procs=2)
    res = run_load(demo_http_target(http_server.port), spec)
    assert 300 <= res["requests"] <= 500  # Poisson: mean 400, sd 20
    assert res["connections_per_proc"] == "3/3"
    assert_clean(res)


def test_http_closed_loop_max(http_server: ServerProcess) -> None:
    spec = LoadSpec(mode="max", duration_s=0.5, warmup_s=0.1, connections=4)
    res = run_load(demo_http_target(http_server.port), spec)
    assert res["requests"] > 100
    assert res["achieved_rate"] > 0
    assert_clean(res)
    # closed loop: the intended time is the send time
    assert res["latency_ms"]["p99"] == res["service_ms"]["p99"]


def test_cli_prints_the_table(http_server: ServerProcess) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.loadgen", "http", "--port", str(http_server.port),
            "--rate", "100", "--duration", "0.3", "--warmup", "0", "--arrivals", "fixed",
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "30 measured" in out.stdout
    assert "latency ms" in out.stdout and "client" in out.stdout


def test_slo_search_keeps_a_passing_rate(http_server: ServerProcess) -> None:
    spec = LoadSpec(mode="rate", arrivals="fixed", warmup_s=0.1, connections=2)
    doc = find_max_rate(
        demo_http_target(http_server.port), spec, slo_p99_ms=1000, hi=100, steps=3, step_s=0.3
    )
    assert doc["rate"] == 100  # the first step tries hi; it passes, so the search stops
    assert [s["passed"] for s in doc["steps"]] == [True]


def _unused_port() -> int:
    """A port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_a_clear_error(tmp_path: Path) -> None:
    port = _unused_port()
    spec = LoadSpec(mode="rate", rate=10, duration_s=0.2, warmup_s=0, connections=1)
    with pytest.raises(LoadError, match="load process 0"):
        run_load(demo_http_target(port), spec)


def test_server_going_away_fails_requests_and_the_run_still_ends() -> None:
    server, port = start_ref_server("http")
    spec = LoadSpec(
        mode="rate", rate=100, arrivals="fixed", duration_s=1.5, warmup_s=0, connections=2,
        timeout_s=0.3,
    )  # fmt: skip
    # failure injection, not a wait for readiness: the server stops 0.5 s into the run
    killer = threading.Timer(0.5, server.stop)
    try:
        res = run_load(demo_http_target(port), spec, on_start=lambda _: killer.start())
    finally:
        if killer.is_alive():
            killer.join()
        server.stop()
    assert 10 <= res["requests"] < 150
    assert res["errors"]["connection"] > 0
    assert res["requests"] + res["errors_total"] == 150  # every scheduled request accounted for
    assert res["connect_failures"] > 0


def test_server_cpu_covers_every_process(http_server: ServerProcess) -> None:
    pids = descendant_pids(http_server.pid)
    assert http_server.pid in pids and len(pids) >= 2  # the second SO_REUSEPORT process
    assert tree_cpu_s(http_server.pid) > 0
    assert tree_cpu_s(os.getpid()) > 0


# --------------------------------------------------------------------------- open loop


def test_open_loop_latency_includes_client_queueing() -> None:
    """One connection to a server that holds every answer 10 ms, sent twice its capacity.

    Request i is intended at 5i ms but can only go at 10i ms: its latency grows with i while the
    service time stays ~10 ms. A closed-loop tool would report ~10 ms for all of them.
    """
    server, port = start_ref_server("http", delay_ms=10)
    try:
        spec = LoadSpec(
            mode="rate", rate=200, arrivals="fixed", duration_s=0.5, warmup_s=0,
            connections=1, timeout_s=10,
        )  # fmt: skip
        res = run_load(demo_http_target(port), spec)
    finally:
        assert server.stop() == 0
    assert res["requests"] == 100
    assert_clean(res)
    lat, svc = res["latency_ms"], res["service_ms"]
    assert lat["p99"] > 5 * svc["p99"]  # the queue, not the service time
    assert lat["p99"] > 1.5 * lat["p50"]  # and it grows through the run
    assert res["achieved_rate"] < 0.75 * 200


# --------------------------------------------------------------------------- C open-loop client

needs_gcc = pytest.mark.skipif(not openloop_available(), reason="gcc not installed")


@pytest.fixture(scope="module")
def openloop_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built into the test's temp dir: the suite keeps the default cache dir empty
    return build_openloop(tmp_path_factory.mktemp("openloop-build"))


def assert_percentiles_ordered(res: dict) -> None:
    lat, svc = res["latency_ms"], res["service_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # every request's service time (from its actual send) is within its latency (from the
    # intended time), so each order statistic is too
    for k in ("p50", "p90", "p99", "p99.9", "max"):
        assert 0 < svc[k] <= lat[k], (k, svc, lat)


@needs_gcc
def test_openloop_c_against_the_http_reference(
    http_server: ServerProcess, openloop_exe: Path
) -> None:
    target = demo_http_target(http_server.port)
    spec = LoadSpec(mode="rate", rate=2000, duration_s=1.0, warmup_s=0.2, connections=8)
    res = run_openloop(target, spec, server_pid=http_server.pid, exe=openloop_exe)
    assert res["client"] == "openloop-c"
    assert 1800 <= res["measured_scheduled"] <= 2200  # Poisson: mean 2000, sd 45
    assert res["errors"] == dict.fromkeys(res["errors"], 0) and res["errors_total"] == 0
    assert res["requests"] == res["completed"] == res["measured_scheduled"]
    assert res["answered"] == res["scheduled"] and res["unanswered"] == 0
    # loose: a shared machine can stall the client near the end of the window
    assert 0.7 * 2000 <= res["achieved_rate"] <= 1.2 * 2000
    assert 0.7 * 2000 <= res["achieved_send_rate"] <= 1.2 * 2000
    assert_percentiles_ordered(res)
    assert res["latency_ms"]["p50"] < 50  # loopback, trivial server, 4% of its capacity
    assert res["client_cpu_us_per_request"] > 0 and res["server_cpu_us_per_request"] > 0
    # the window: 1 s, or longer if the client was stalled and sent its last requests late
    assert 1.0 <= res["window_s"] < 1.5

    # fixed arrivals: exactly rate x duration measured, none of the warm-up
    spec = replace(spec, arrivals="fixed", rate=1000, duration_s=0.3, warmup_s=0.1)
    res = run_openloop(target, spec, exe=openloop_exe)
    assert res["measured_scheduled"] == res["requests"] == 300
    assert res["scheduled"] == res["answered"] == 400
    assert res["errors_total"] == 0


@needs_gcc
def test_openloop_c_latency_counts_from_the_intended_time(openloop_exe: Path) -> None:
    """One connection to a server that holds every answer 5 ms, at twice its capacity.

    Request i is intended at 2.5i ms but can go only at ~5i ms: it waits in the client's
    backlog, and that wait is part of its latency, while the service time stays ~5 ms.
    """
    server, port = start_ref_server("http", delay_ms=5)
    try:
        spec = LoadSpec(
            mode="rate", rate=400, arrivals="fixed", duration_s=0.5, warmup_s=0,
            connections=1, timeout_s=10,
        )  # fmt: skip
        res = run_openloop(demo_http_target(port), spec, exe=openloop_exe)
    finally:
        assert server.stop() == 0
    assert res["requests"] == 200 and res["errors_total"] == 0
    assert_percentiles_ordered(res)
    lat, svc = res["latency_ms"], res["service_ms"]
    assert svc["p50"] >= 4.5  # the hold
    assert lat["p99"] > 5 * svc["p99"]  # the queue, not the service time
    assert lat["p99"] > 1.5 * lat["p50"]  # and it grows through the run
    assert lat["p99"] > 200  # the last requests waited about half the 0.5 s schedule
    assert res["max_backlog"] > 50
    assert res["achieved_rate"] < 0.75 * 400


class MisbehavingServer:
    """An HTTP/1.1 server on its own thread and event loop that answers by a cycle of six.

    Requests 0, 1, 2, ... (over every connection) get: 200; 500; the connection closed without
    an answer; no answer at all (held until the client gives up); a 200 without content-length
    (then close); 404. ``with`` starts it and returns once it listens.
    """

    OK = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n0.5\n"
    ERROR = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
    NO_LENGTH = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n0.5\n"
    NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"

    def __init__(self) -> None:
        self.port = 0
        self.count = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> MisbehavingServer:
        self._thread.start()
        assert self._ready.wait(30), "the test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                i = head.find(b"content-length:")
                n = int(head[i + 15 : head.find(b"\r\n", i)]) if i >= 0 else 0
                await reader.readexactly(n)
                kind = self.count % 6
                self.count += 1
                if kind == 2:
                    return
                if kind == 3:
                    await reader.read()  # until the client gives up on it and closes
                    return
                writer.write((self.OK, self.ERROR, b"", b"", self.NO_LENGTH, self.NOT_FOUND)[kind])
                await writer.drain()
                if kind == 4:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@needs_gcc
def test_openloop_c_counts_errors_and_ends(openloop_exe: Path) -> None:
    spec = LoadSpec(
        mode="rate", rate=200, arrivals="fixed", duration_s=0.5, warmup_s=0, connections=32,
        timeout_s=0.3,
    )  # fmt: skip
    with MisbehavingServer() as server:
        res = run_openloop(demo_http_target(server.port), spec, exe=openloop_exe)
    e = res["errors"]
    assert e["status_5xx"] > 0 and e["status_4xx"] > 0  # answered, but not 2xx
    assert e["conn"] > 0  # closed with the request in flight
    assert e["timeout"] > 0  # never answered: failed after timeout_s, connection reopened
    assert e["parse"] > 0  # no content-length
    assert res["requests"] > 0  # the 200s still count
    # every scheduled request is accounted for exactly once: answered 2xx or one error
    assert res["requests"] + res["errors_total"] == res["scheduled"] == 100
    assert res["reconnects"] > 0
    # bounded: schedule 0.5 s, then at most timeout_s of drain (plus process start-up)
    assert res["client_wall_s"] < 0.5 + 0.3 + 0.5


@needs_gcc
def test_openloop_c_server_going_away_fails_requests_and_ends(openloop_exe: Path) -> None:
    server, port = start_ref_server("http")
    spec = LoadSpec(
        mode="rate", rate=100, arrivals="fixed", duration_s=1.5, warmup_s=0, connections=2,
        timeout_s=0.3,
    )  # fmt: skip
    # failure injection, not a wait for readiness: the server stops ~0.5 s into the run
    killer = threading.Timer(0.5, server.stop)
    killer.start()
    try:
        res = run_openloop(demo_http_target(port), spec, exe=openloop_exe)
    finally:
        killer.join()
        server.stop()
    assert 10 <= res["requests"] < 150
    assert res["errors"]["conn"] > 0  # every connection refused: queued requests could not go
    assert res["requests"] + res["errors_total"] == res["scheduled"] == 150
    assert res["connect_failures"] > 0


@needs_gcc
def test_openloop_c_refused_connection_is_a_clear_error(openloop_exe: Path) -> None:
    port = _unused_port()
    spec = LoadSpec(mode="rate", rate=10, duration_s=0.2, warmup_s=0, connections=1)
    with pytest.raises(NativeClientError, match="cannot connect"):
        run_openloop(demo_http_target(port), spec, exe=openloop_exe)


def test_openloop_c_without_gcc_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bench.loadgen.native as native

    monkeypatch.setattr(native, "find_gcc", lambda: None)
    assert not native.openloop_available()
    with pytest.raises(NativeClientError, match="gcc not found"):
        native.build_openloop(tmp_path)


# --------------------------------------------------------------------------- gRPC


def test_grpc_unary_fixed_rate(grpc_server: ServerProcess) -> None:
    spec = LoadSpec(
        mode="rate", rate=200, arrivals="fixed", duration_s=1.0, warmup_s=0.2, connections=4
    )
    res = run_load(demo_grpc_target(grpc_server.port), spec, server_pid=grpc_server.pid)
    assert abs(res["requests"] - 200) <= 1
    assert_clean(res)


def test_grpc_stream_fixed_rate_matches_ids(grpc_server: ServerProcess) -> None:
    spec = LoadSpec(
        mode="rate", rate=200, arrivals="fixed", duration_s=1.0, warmup_s=0.2,
        connections=2, procs=2, stream_depth=4,
    )  # fmt: skip
    res = run_load(demo_grpc_target(grpc_server.port, stream=True), spec)
    assert abs(res["requests"] - 200) <= 2
    assert_clean(res)  # mismatched_id == 0 among the rest


def test_stream_matcher() -> None:
    m = StreamMatcher()
    m.expect("a", 1, 2)
    m.expect("b", 3, 4)
    assert m.match("b") == (3, 4)  # out of order is fine
    assert m.match("b") is None  # answered twice: stray
    assert m.match("zzz") is None  # never sent
    assert m.expire(older_than_ns=3) == 1  # "a" was sent at 2
    assert m.match("a") is None and m.is_late("a") and not m.is_late("a")
    assert not m.pending


def test_stream_reader_counts_mismatched_ids() -> None:
    """The stream pool's reader, fed answers by a fake call: stray ids are errors, not answers."""
    pb2 = predictor_pb2()

    async def scenario() -> Recorder:
        import grpc.aio

        rec = Recorder(0, 1 << 62)
        pool = StreamPool(demo_grpc_target(1), 1, rec, timeout_s=1, channels=1, depth=4)
        answers = [
            pb2.PredictResponse(request_id="x2", scores=[0.5]),  # out of order: fine
            pb2.PredictResponse(request_id="nope", scores=[0.5]),  # never sent
            pb2.PredictResponse(request_id="x1", scores=[0.5]),
        ]

        class FakeCall:
            async def read(self) -> object:
                if answers:
                    return answers.pop(0)
                pool.closing = True
                return grpc.aio.EOF

        from bench.loadgen.grpc_client import _Stream

        s = _Stream()
        s.call = FakeCall()
        for rid in ("x1", "x2"):
            s.matcher.expect(rid, 1, 1)
            s.inflight += 1
            pool.busy += 1
        await pool._reader(s, channel=None)  # type: ignore[arg-type]
        assert s.inflight == 0 and pool.busy == 0
        return rec

    rec = asyncio.run(scenario())
    assert rec.errors["mismatched_id"] == 1
    assert len(rec.latency) == 2


# --------------------------------------------------------------------------- h2load

# captured from `h2load --h1 -c 64 -t 1 -D 3 --warm-up-time 1 -d row.csv ...` (nghttp2 1.52.0)
H2LOAD_H1_OUTPUT = """\
starting benchmark...
spawning thread #0: 64 total client(s). Timing-based test with 1s of warm-up time and 2s of \
main duration for measurements.
Warm-up started for thread #0.
progress: 9% of clients started
progress: 100% of clients started
Application protocol: http/1.1
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 53525.00 req/s, 3.37MB/s
requests: 107050 total, 107050 started, 107050 done, 107050 succeeded, 0 failed, 0 errored, \
0 timeout
status codes: 107050 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 6.74MB (7065300) total, 5.42MB (5685680) headers (space savings 0.00%), 634.56KB \
(649792) data
                     min         max         mean         sd        +/- sd
time for request:      127us     13.10ms      1.19ms      1.01ms    96.41%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :     813.80      873.04      835.98       23.28    62.50%
"""

# a gRPC stream run, edited to show failures, non-2xx statuses and second-long requests
H2LOAD_H2_OUTPUT = """\
Application protocol: h2c
finished in 2.01s, 258.50 req/s, 644.11KB/s
requests: 520 total, 529 started, 517 done, 510 succeeded, 7 failed, 3 errored, 2 timeout
status codes: 520 2xx, 0 3xx, 4 4xx, 3 5xx
traffic: 1.26MB (1325039) total, 2.12KB (2172) headers (space savings 95.53%), 973.02KB \
(996375) data
                     min         max         mean         sd        +/- sd
time for request:    17.72ms      1.20s     30.57ms      8.89ms    69.44%
"""


def test_parse_h2load_http1_output() -> None:
    out = parse_h2load_output(H2LOAD_H1_OUTPUT)
    assert out["finished_s"] == 3.0 and out["req_per_s"] == 53525.0
    assert out["requests"] == {
        "total": 107050, "started": 107050, "done": 107050, "succeeded": 107050,
        "failed": 0, "errored": 0, "timeout": 0,
    }  # fmt: skip
    assert out["status"] == {"2xx": 107050, "3xx": 0, "4xx": 0, "5xx": 0}
    assert out["traffic"] == {"total": 7065300, "headers": 5685680, "data": 649792}
    assert out["request_ms"] == pytest.approx({"min": 0.127, "max": 13.1, "mean": 1.19, "sd": 1.01})
    assert out["protocol"] == "http/1.1"


def test_parse_h2load_counts_failures_and_units() -> None:
    out = parse_h2load_output(H2LOAD_H2_OUTPUT)
    assert out["requests"]["done"] == 517 and out["requests"]["failed"] == 7
    assert out["requests"]["errored"] == 3 and out["requests"]["timeout"] == 2
    assert out["status"] == {"2xx": 520, "3xx": 0, "4xx": 4, "5xx": 3}
    assert out["request_ms"]["max"] == pytest.approx(1200.0)
    assert out["protocol"] == "h2c"


def test_parse_h2load_rejects_output_without_a_summary() -> None:
    with pytest.raises(ValueError, match="finished in"):
        parse_h2load_output("connect: Connection refused\n")


def test_missing_answers_from_data_bytes() -> None:
    assert missing_answers(done=100, data_bytes=2800, answer_bytes=28) == 0
    assert missing_answers(done=100, data_bytes=2800 + 50, answer_bytes=28) == 0  # in flight
    assert missing_answers(done=100, data_bytes=2800 - 3 * 28, answer_bytes=28) == 3
    # streams: 64 answers of 30 bytes per request; one stream stopped after 10 answers
    assert missing_answers(done=10, data_bytes=9 * 1920 + 300, answer_bytes=1920, messages=64) == 54


def test_h2load_argv() -> None:
    run = http_run(demo_http_target(8080), connections=64, duration_s=2.5, warmup_s=0)
    argv = h2load_argv(run, "/tmp/body", run.duration_s)
    assert argv[:11] == [
        "h2load", "-c", "64", "-m", "1", "-t", "1", "-D", "2500ms", "-d", "/tmp/body",
    ]  # fmt: skip
    assert "--h1" in argv and argv[-1] == "http://127.0.0.1:8080/invocations"
    assert "content-type: text/csv" in argv
    target = demo_grpc_target(9000)
    run = grpc_run(target, grpc_unary_body(target), connections=8, streams=8, threads=4)
    argv = h2load_argv(run, "/tmp/body", 1.0)
    assert "--h1" not in argv and argv[-1] == "http://127.0.0.1:9000/rtbserve.v1.Predictor/Predict"
    assert argv[argv.index("-m") + 1] == "8" and argv[argv.index("-t") + 1] == "4"
    assert "content-type: application/grpc" in argv and "te: trailers" in argv
    with pytest.raises(ValueError, match="loopback"):
        H2Run("http://10.0.0.1:80/", b"")
    with pytest.raises(ValueError, match="HTTP/1.1"):
        H2Run("http://127.0.0.1:80/", b"", h1=True, streams=4)


def test_grpc_frame_round_trips_a_predict_request() -> None:
    pb2 = predictor_pb2()
    msg = pb2.PredictRequest(request_id="r1", rows=[1.0, float("nan")], n_features=2)
    raw = msg.SerializeToString()
    framed = grpc_frame(raw)
    assert framed[0] == 0 and int.from_bytes(framed[1:5], "big") == len(raw)
    assert grpc_unframe(framed) == [raw]
    back = pb2.PredictRequest.FromString(grpc_unframe(framed)[0])
    assert back.request_id == "r1" and back.n_features == 2 and back.rows[0] == 1.0

    target = demo_grpc_target(9000, stream=True)
    messages = [
        pb2.PredictRequest.FromString(m) for m in grpc_unframe(grpc_stream_body(target, 64))
    ]
    assert [m.request_id for m in messages] == [f"s{i}" for i in range(64)]
    assert all(len(m.rows) == m.n_features == 67 for m in messages)
    (unary,) = grpc_unframe(grpc_unary_body(demo_grpc_target(9000)))
    assert pb2.PredictRequest.FromString(unary).request_id == "u"

    with pytest.raises(ValueError, match="needs"):
        grpc_unframe(framed[:-1])
    with pytest.raises(ValueError, match="compressed flag"):
        grpc_unframe(b"\x01" + framed[1:])


def test_compare_answers_matches_request_ids() -> None:
    pb2 = predictor_pb2()
    reqs = [pb2.PredictRequest(request_id=i).SerializeToString() for i in ("a", "b")]

    def answer(rid: str, **kw: object) -> bytes:
        return pb2.PredictResponse(request_id=rid, scores=[0.5], **kw).SerializeToString()

    compare_answers(reqs, [answer("b"), answer("a")])  # any order
    with pytest.raises(H2loadError, match="missing \\['b'\\], unexpected \\['c'\\]"):
        compare_answers(reqs, [answer("a"), answer("c")])
    with pytest.raises(H2loadError, match="missing"):
        compare_answers(reqs, [answer("a")])
    with pytest.raises(H2loadError, match="error 3"):
        compare_answers(reqs, [answer("a"), answer("b", error=pb2.Error(code=3, message="x"))])


needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load not installed (apt-get install nghttp2-client)"
)


@needs_h2load
def test_h2load_run_against_the_http_reference(http_server: ServerProcess) -> None:
    target = demo_http_target(http_server.port)
    assert check_http_answer(target)["status"] == 200
    run = http_run(target, connections=4, duration_s=0.5, warmup_s=0.2)
    res = run_h2load(run, server_pid=http_server.pid)
    assert res["client"] == "h2load" and res["h2load"]["protocol"] == "http/1.1"
    assert res["requests"] > 100 and res["errors_total"] == 0
    assert res["achieved_rate"] == res["requests"] / 0.5
    assert res["client_cpu_us_per_request"] > 0 and res["server_cpu_us_per_request"] > 0
    assert res["warmup"]["requests"]["done"] > 0


@needs_h2load
def test_h2load_grpc_stream_and_unary_against_the_grpc_reference(
    grpc_server: ServerProcess,
) -> None:
    port = grpc_server.port
    target = demo_grpc_target(port, stream=True)
    body = grpc_stream_body(target, 16)
    check = check_grpc_answers("127.0.0.1", port, STREAM_METHOD, body)
    assert check["messages"] == 16
    run = grpc_run(
        target, body, messages=16, connections=2, duration_s=0.5, warmup_s=0,
        answer_bytes=check["answer_bytes"],
    )  # fmt: skip
    res = run_h2load(run)
    assert res["h2load"]["protocol"] == "h2c"
    assert res["requests"] > 10 and res["errors_total"] == 0
    assert res["answered"] == 16 * res["requests"]
    # the byte check sees answers missing when the expected size is larger than what came
    res = run_h2load(replace(run, answer_bytes=check["answer_bytes"] + 16))
    assert res["errors"]["missing_answers"] > 0

    target = demo_grpc_target(port)
    body = grpc_unary_body(target)
    check = check_grpc_answers("127.0.0.1", port, PREDICT_METHOD, body)
    run = grpc_run(
        target, body, connections=2, streams=4, duration_s=0.3, warmup_s=0,
        answer_bytes=check["answer_bytes"],
    )  # fmt: skip
    res = run_h2load(run)
    assert res["requests"] > 10 and res["errors_total"] == 0


def test_missing_h2load_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.h2load

    monkeypatch.setattr(bench.h2load, "h2load_path", lambda: None)
    with pytest.raises(H2loadError, match="apt-get install nghttp2-client"):
        run_h2load(http_run(demo_http_target(8080), duration_s=0.2, warmup_s=0))


@needs_h2load
def test_h2load_reports_a_server_that_is_not_there() -> None:
    port = _unused_port()
    with pytest.raises(H2loadError, match="no request"):
        run_h2load(http_run(demo_http_target(port), connections=1, duration_s=0.2, warmup_s=0))
