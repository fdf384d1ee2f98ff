"""The load generator (bench.loadgen) against the reference servers, over real loopback sockets.

Servers are subprocesses that print a readiness line; the tests wait for that line, never sleep.
Runs are short (about a second) and low-rate: they check that the schedule is kept, answers are
counted and matched, and that open-loop latency includes client-side queueing; precise numbers
belong to ``python -m bench.serving``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

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
from bench.loadgen.schedule import arrival_times_ns  # noqa: E402
from bench.loadgen.stats import ERROR_KINDS, Recorder, format_result  # noqa: E402
from bench.loadgen.targets import predictor_pb2  # noqa: E402
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


def test_refused_connection_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
