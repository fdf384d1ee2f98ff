"""Serving benchmark: rtbserve's HTTP and gRPC front ends against trivial servers on the same stack.

Usage::

    python -m bench.serving [--quick] [--repeats N] [--workers N] [--ref-procs N]
                            [--client auto|h2load|python] [--h2load-threads N]
                            [--open-client c|python] [--client-procs N] [--json PATH]

One run starts three servers as subprocesses (waiting for their readiness lines, never
sleeping): ``rtbserve serve`` on the bundled demo model, the trivial uvloop + httptools HTTP
server and the trivial grpc.aio server (``bench.ref_servers``). It loads them, stops them, and
prints every figure as a ratio against the reference measured in the same run, interleaved (the
order alternates between repeats). The closed-loop rows (a, c, d) use h2load (``bench.h2load``)
when it is installed: for gRPC, the Python generator's own CPU per message is as large as the
servers', so on 2 shared cores those rows would measure the client. Without h2load
(``apt-get install nghttp2-client``) they fall back to ``bench.loadgen`` and say so. Row b is
driven by the C open-loop client (``bench/loadgen/openloop.c``, built with gcc on first use;
h2load has no open-loop latency, and the Python generator's ~29 us of CPU per request would
take most of a core at row b's rate); ``--open-client python`` (or no gcc) uses the Python
open-loop generator instead.

    a. HTTP ``/invocations``, one demo CSV row, closed loop at 64 connections: rtbserve req/s over
       the trivial HTTP server's (bar >= 0.50), and each server's CPU per request (rtbserve's
       bar <= 25 us).
    b. Open loop (Poisson) at half of rtbserve's max rate from (a), same connections as (a):
       p50/p99 from each request's intended send time (bar p99 <= 2 ms); the trivial server at
       the same rate shows the floor of this client on this machine.
    c. gRPC unary ``Predict``: rtbserve over the trivial grpc.aio server (bar >= 0.75).
    d. gRPC ``PredictStream`` messages/s over rtbserve's unary calls/s (bar >= 3x). With h2load,
       each stream carries 64 messages and half-closes; the server answers all 64, then ends it.
    e. In process, no server: the median of ``await batcher.submit(row)`` through rtbserve's
       MicroBatcher minus ``model.predict(row)`` called directly, on a uvloop loop (bar <= 50 us).

The load generator, rtbserve's workers and the reference servers all share the machine's 2
cores (and other engineers' jobs): absolute figures move between runs, the same-run ratios are
the ones to compare. Each figure is the median [min-max] over ``--repeats`` runs; PASS/FAIL is
judged on medians. Results go to ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.h2load import (
    INSTALL_HINT,
    H2Run,
    check_grpc_answers,
    check_http_answer,
    grpc_run,
    grpc_stream_body,
    grpc_unary_body,
    h2load_path,
    h2load_version,
    http_run,
    run_h2load,
)
from bench.loadgen import LoadSpec, demo_grpc_target, demo_http_target, run_load
from bench.loadgen.native import CLIENT_NAME as OPENLOOP_C
from bench.loadgen.native import (
    NativeClientError,
    build_openloop,
    openloop_available,
    run_openloop,
)
from bench.loadgen.stats import fmt_ms, fmt_rate
from bench.loadgen.targets import (
    PREDICT_METHOD,
    REPO,
    STREAM_METHOD,
    csv_row_to_floats,
    demo_csv_row,
)
from bench.ref_servers import ServerProcess, start_ref_server

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "serving.json"
DEMO_MODEL = REPO / "models" / "rtb-filter"

# bars from the issue
BAR_HTTP_RATIO = 0.50
BAR_HTTP_CPU_US = 25.0
BAR_OPEN_P99_MS = 2.0
BAR_GRPC_RATIO = 0.75
BAR_STREAM_VS_UNARY = 3.0
BAR_BATCHER_ADDED_US = 50.0

READY_TIMEOUT_S = 300.0  # a cold compile cache makes rtbserve compile the demo model first
PING_CONNECTIONS = 8  # fresh connections that must all see 200 (SO_REUSEPORT spreads them)


@dataclass(frozen=True)
class Config:
    """One run's settings. ``client`` is who drives rows a, c, d: ``h2load`` or ``python``."""

    quick: bool
    repeats: int
    warmup_s: float
    duration_s: float
    workers: int
    ref_procs: int
    client_procs: int  # Python load generator processes (row b; a, c, d without h2load)
    client: str = "h2load"
    open_client: str = "c"  # row b: "c" (bench/loadgen/openloop.c) or "python"
    openloop_exe: str = ""  # the built C client, when open_client is "c"
    http_connections: int = 64
    # h2load threads: at ~10 us per HTTP request one thread could drive ~100k req/s, more than
    # either server reaches on what is left of the 2 cores; a second one made no difference
    # beyond the noise, and costs more wake-ups per request
    h2load_threads: int = 1
    h2_grpc_connections: int = 8  # x h2_grpc_streams concurrent unary calls
    h2_grpc_streams: int = 8
    h2_stream_connections: int = 8  # one PredictStream at a time on each
    stream_messages: int = 64  # per PredictStream, sent at once, then half-close
    # Python load generator (no h2load)
    grpc_inflight: int = 64  # concurrent unary calls
    grpc_channels: int = 2  # per client process
    streams: int = 8
    stream_depth: int = 16
    batcher_calls: int = 20_000

    @classmethod
    def make(
        cls, args: argparse.Namespace, client: str, open_client: str = "c", exe: str = ""
    ) -> Config:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            repeats=args.repeats if args.repeats else (1 if quick else 3),
            warmup_s=0.5 if quick else 1.0,
            duration_s=2.0 if quick else 4.0,
            workers=args.workers,
            ref_procs=args.ref_procs,
            client_procs=args.client_procs,
            client=client,
            open_client=open_client,
            openloop_exe=exe,
            h2load_threads=args.h2load_threads,
            batcher_calls=5_000 if quick else 20_000,
        )

    @property
    def uses_h2load(self) -> bool:
        return self.client == "h2load"

    @property
    def open_client_label(self) -> str:
        """Row b's client as the table names it."""
        return OPENLOOP_C if self.open_client == "c" else "python"


# --------------------------------------------------------------------------- servers


def rtbserve_argv() -> list[str]:
    exe = Path(sys.executable).with_name("rtbserve")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "rtbserve.cli"]


def rtbserve_features() -> dict[str, bool]:
    """Which ``rtbserve serve`` options this checkout has (others are landing concurrently)."""
    try:
        out = subprocess.run(
            [*rtbserve_argv(), "serve", "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return {
        "grpc_port": "--grpc-port" in out,
        "no_grpc": "--no-grpc" in out,
        "workers": "--workers" in out,
    }


def _ping(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/ping", headers={"connection": "close"})
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


class Rtbserve:
    """``rtbserve serve`` on free ports; ready once ``/ping`` is 200 on fresh connections."""

    def __init__(self, cfg: Config, features: dict[str, bool]) -> None:
        argv = [*rtbserve_argv(), "serve", "--host", "127.0.0.1", "--http-port", "0"]
        if features["grpc_port"]:
            argv += ["--grpc-port", "0"]
        elif features.get("no_grpc"):
            argv += ["--no-grpc"]
        if features["workers"]:
            argv += ["--workers", str(cfg.workers)]
        self.argv = argv
        self.server = ServerProcess(argv)
        self.pid = self.server.pid
        self.grpc_port: int | None = None
        try:
            self.http_port = self.server.wait_listening("http", READY_TIMEOUT_S)
            if features["grpc_port"]:
                self.grpc_port = self.server.wait_listening("grpc", READY_TIMEOUT_S)
            self._await_ping(time.monotonic() + READY_TIMEOUT_S)
        except BaseException:
            self.server.stop()
            raise

    def _await_ping(self, deadline: float) -> None:
        # /ping answers 503 while models load; between polls, wait for the next stdout line
        # (such as "ready"), at most 0.1 s
        while True:
            if all(_ping(self.http_port) == 200 for _ in range(PING_CONNECTIONS)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"rtbserve /ping not 200 after {READY_TIMEOUT_S:.0f} s")
            with contextlib.suppress(RuntimeError):
                self.server.wait_for(r"^ready", 0.1)
            if self.server.proc.poll() is not None:
                raise RuntimeError(
                    f"rtbserve exited ({self.server.proc.returncode}):\n{self.server.output()}"
                )

    def stop(self) -> int:
        return self.server.stop(30)


# --------------------------------------------------------------------------- measurements


def spec_for(cfg: Config, **kw: Any) -> LoadSpec:
    base = LoadSpec(
        mode="max",
        duration_s=cfg.duration_s,
        warmup_s=cfg.warmup_s,
        connections=cfg.http_connections,
        procs=cfg.client_procs,
        timeout_s=2.0,
        channels=cfg.grpc_channels,
        stream_depth=cfg.stream_depth,
    )
    return replace(base, **kw)


def _slim(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "latency_hdr"}


def _run(
    label: str,
    target: Any,
    spec: LoadSpec,
    pid: int,
    log: list[dict[str, Any]],
    load: Callable[..., dict[str, Any]] = run_load,
    client: str = "python",
) -> dict[str, Any]:
    """One ``bench.loadgen`` run (or ``load``, e.g. the C open-loop client); a failure is logged
    as ``{"error": ...}``, not raised."""
    print(f"    {label:<34s}", end="", flush=True)
    try:
        res = load(target, spec, server_pid=pid)
    except Exception as exc:  # keep the run going: report what failed
        print(f"FAILED: {exc}", flush=True)
        res = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        res["client"] = client
        lat = res["latency_ms"]
        unit = "msg" if target.kind == "grpc-stream" else "req"
        print(
            f"{fmt_rate(res['achieved_rate']):>7} {unit}/s  p50 {fmt_ms(lat['p50'])} "
            f"p99 {fmt_ms(lat['p99'])} ms  errors {res['errors_total']}  "
            f"server {res['server_cpu_us_per_request']:.0f} us/{unit}  "
            f"{client} client {res['client_cpu_us_per_request']:.0f} us/{unit}"
            + (
                f" (lag p99 {fmt_ms(res['dispatch_lag_ms']['p99'])} ms)"
                if res["mode"] == "rate"
                else ""
            )
            + f"  others {res['other_cores_busy']:.2f} cores",
            flush=True,
        )
    res = _slim(res)
    res["label"] = label
    log.append(res)
    return res


def h2_http(cfg: Config, port: int) -> tuple[H2Run, dict[str, Any]]:
    """Row a for h2load, after one checked request (200 and a CSV score)."""
    target = demo_http_target(port)
    check = check_http_answer(target)
    run = http_run(
        target, connections=cfg.http_connections, threads=cfg.h2load_threads,
        duration_s=cfg.duration_s, warmup_s=cfg.warmup_s,
    )  # fmt: skip
    return run, check


def h2_grpc(cfg: Config, port: int, *, stream: bool) -> tuple[H2Run, dict[str, Any]]:
    """Rows c (unary) and d (``stream``) for h2load, after a Python grpc client sent the same
    messages once and checked status OK and every request_id (h2load reads no grpc-status)."""
    target = demo_grpc_target(port, stream=stream)
    if stream:
        body = grpc_stream_body(target, cfg.stream_messages)
        method, messages = STREAM_METHOD, cfg.stream_messages
        connections, streams = cfg.h2_stream_connections, 1
    else:
        body = grpc_unary_body(target)
        method, messages = PREDICT_METHOD, 1
        connections, streams = cfg.h2_grpc_connections, cfg.h2_grpc_streams
    check = check_grpc_answers(target.host, port, method, body)
    run = grpc_run(
        target, body, messages=messages, connections=connections, streams=streams,
        threads=cfg.h2load_threads, duration_s=cfg.duration_s, warmup_s=cfg.warmup_s,
        answer_bytes=check["answer_bytes"],
    )  # fmt: skip
    return run, check


def _run_h2(
    label: str,
    prepare: Callable[[], tuple[H2Run, dict[str, Any]]],
    pid: int,
    log: list[dict[str, Any]],
) -> dict[str, Any]:
    """One h2load run (``prepare`` checks an answer, then builds it); failures are logged."""
    print(f"    {label:<34s}", end="", flush=True)
    try:
        run, check = prepare()
        res = run_h2load(run, server_pid=pid)
    except Exception as exc:  # keep the run going: report what failed
        print(f"FAILED: {exc}", flush=True)
        res = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        res["answer_check"] = check
        unit = "msg" if run.messages > 1 else "req"
        lat = res["latency_ms"]
        print(
            f"{fmt_rate(res['achieved_rate']):>7} {unit}/s  mean {fmt_ms(lat['mean'])} "
            f"max {fmt_ms(lat['max'])} ms  errors {res['errors_total']}  "
            f"server {res['server_cpu_us_per_request']:.0f} us/{unit}  "
            f"h2load {res['client_cpu_us_per_request']:.1f} us/{unit}  "
            f"others {res['other_cores_busy']:.2f} cores",
            flush=True,
        )
    res["label"] = label
    log.append(res)
    return res


def open_loader(cfg: Config) -> tuple[Callable[..., dict[str, Any]], str]:
    """Row b's runner and client name: the C open-loop client (one process, the spec's
    connections) or the Python generator (``cfg.client_procs`` processes)."""
    if cfg.open_client != "c":
        return run_load, "python"
    exe = Path(cfg.openloop_exe) if cfg.openloop_exe else None

    def load(target: Any, spec: LoadSpec, *, server_pid: int) -> dict[str, Any]:
        return run_openloop(target, spec, server_pid=server_pid, exe=exe)

    return load, OPENLOOP_C


def one_repeat(
    i: int, cfg: Config, rtb: Rtbserve, ref_http: tuple[int, int], ref_grpc: tuple[int, int]
) -> dict[str, Any]:
    """Rows a-d once; rtbserve and the reference alternate who goes first."""
    log: list[dict[str, Any]] = []
    out: dict[str, Any] = {"runs": log}

    def pair(
        name: str, rtb_run: Callable[[], dict[str, Any]], ref_run: Callable[[], dict[str, Any]]
    ) -> None:
        if i % 2 == 0:
            out[f"{name}_rtb"] = rtb_run()
            out[f"{name}_ref"] = ref_run()
        else:
            out[f"{name}_ref"] = ref_run()
            out[f"{name}_rtb"] = rtb_run()

    rtb_http = demo_http_target(rtb.http_port)
    ref_http_t = demo_http_target(ref_http[1])
    if cfg.uses_h2load:
        pair(
            "http_max",
            lambda: _run_h2(
                "a  rtbserve HTTP max", lambda: h2_http(cfg, rtb.http_port), rtb.pid, log
            ),
            lambda: _run_h2(
                "a  reference HTTP max", lambda: h2_http(cfg, ref_http[1]), ref_http[0], log
            ),
        )
    else:
        hmax = spec_for(cfg, connections=cfg.http_connections)
        pair(
            "http_max",
            lambda: _run("a  rtbserve HTTP max", rtb_http, hmax, rtb.pid, log),
            lambda: _run("a  reference HTTP max", ref_http_t, hmax, ref_http[0], log),
        )
    rate = out["http_max_rtb"].get("achieved_rate", 0) / 2
    out["open_rate"] = rate
    if rate > 0:
        open_spec = spec_for(cfg, mode="rate", rate=rate, arrivals="poisson")
        load, who = open_loader(cfg)
        pair(
            "open",
            lambda: _run(
                f"b  rtbserve open {fmt_rate(rate)}/s", rtb_http, open_spec, rtb.pid, log,
                load, who,
            ),
            lambda: _run(
                f"b  reference open {fmt_rate(rate)}/s", ref_http_t, open_spec, ref_http[0], log,
                load, who,
            ),
        )  # fmt: skip
    if rtb.grpc_port is not None and cfg.uses_h2load:
        rtb_grpc = rtb.grpc_port
        pair(
            "grpc_unary",
            lambda: _run_h2(
                "c  rtbserve gRPC unary",
                lambda: h2_grpc(cfg, rtb_grpc, stream=False),
                rtb.pid,
                log,
            ),
            lambda: _run_h2(
                "c  reference gRPC unary",
                lambda: h2_grpc(cfg, ref_grpc[1], stream=False),
                ref_grpc[0],
                log,
            ),
        )
        pair(
            "grpc_stream",
            lambda: _run_h2(
                "d  rtbserve gRPC stream",
                lambda: h2_grpc(cfg, rtb_grpc, stream=True), rtb.pid, log,
            ),
            lambda: _run_h2(
                "d  reference gRPC stream",
                lambda: h2_grpc(cfg, ref_grpc[1], stream=True), ref_grpc[0], log,
            ),
        )  # fmt: skip
    elif rtb.grpc_port is not None:
        unary = spec_for(cfg, connections=cfg.grpc_inflight)
        stream = spec_for(cfg, connections=max(cfg.streams, cfg.client_procs))
        pair(
            "grpc_unary",
            lambda: _run(
                "c  rtbserve gRPC unary", demo_grpc_target(rtb.grpc_port), unary, rtb.pid, log
            ),
            lambda: _run(
                "c  reference gRPC unary", demo_grpc_target(ref_grpc[1]), unary, ref_grpc[0], log
            ),
        )
        pair(
            "grpc_stream",
            lambda: _run(
                "d  rtbserve gRPC stream",
                demo_grpc_target(rtb.grpc_port, stream=True), stream, rtb.pid, log,
            ),
            lambda: _run(
                "d  reference gRPC stream",
                demo_grpc_target(ref_grpc[1], stream=True), stream, ref_grpc[0], log,
            ),
        )  # fmt: skip
    return out


def batcher_overhead(cfg: Config) -> list[dict[str, Any]]:
    """Row e: median ``await batcher.submit(row)`` vs ``model.predict(row)``, per repeat.

    Calls alternate in blocks of 500 so drift (other engineers' jobs) hits both sides alike;
    rows cycle through the demo sample; GC is paused while timing.
    """
    import gc

    import numpy as np
    import uvloop

    from rtbserve import load_model
    from rtbserve.batching.micro_batcher import MicroBatcher

    model = load_model(DEMO_MODEL)
    lines = [ln for ln in (DEMO_MODEL / "sample.csv").read_text().splitlines() if ln.strip()]
    rows = [np.array([csv_row_to_floats(ln)], dtype=np.float32) for ln in lines]
    block = 500

    async def measure() -> list[dict[str, Any]]:
        batcher = MicroBatcher(model.predict)
        perf = time.perf_counter_ns
        for x in rows:  # warm both paths
            model.predict(x)
            await batcher.submit(x)
        out = []
        for _ in range(cfg.repeats):
            direct: list[int] = []
            batched: list[int] = []
            gc.disable()
            try:
                for start in range(0, cfg.batcher_calls, block):
                    for k in range(start, start + block):
                        x = rows[k % len(rows)]
                        t = perf()
                        model.predict(x)
                        direct.append(perf() - t)
                    for k in range(start, start + block):
                        x = rows[k % len(rows)]
                        t = perf()
                        await batcher.submit(x)
                        batched.append(perf() - t)
            finally:
                gc.enable()
            d = statistics.median(direct) / 1e3
            b = statistics.median(batched) / 1e3
            out.append({"direct_us": d, "submit_us": b, "added_us": b - d, "calls": len(direct)})
        return out

    return uvloop.run(measure())


# --------------------------------------------------------------------------- figures


def spread(values: list[float | None]) -> dict[str, Any]:
    vs = [v for v in values if v is not None]
    if not vs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def _get(r: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def figures(reps: list[dict[str, Any]], batcher: list[dict[str, Any]]) -> dict[str, Any]:
    def col(fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        return spread([fn(r) for r in reps])

    def rate(r: dict[str, Any], k: str) -> Any:
        return _get(r, k, "achieved_rate")

    f = {
        "http_rtb": col(lambda r: rate(r, "http_max_rtb")),
        "http_ref": col(lambda r: rate(r, "http_max_ref")),
        "http_ratio": col(lambda r: _ratio(rate(r, "http_max_rtb"), rate(r, "http_max_ref"))),
        "http_cpu_rtb": col(lambda r: _get(r, "http_max_rtb", "server_cpu_us_per_request")),
        "http_cpu_ref": col(lambda r: _get(r, "http_max_ref", "server_cpu_us_per_request")),
        "http_client_cpu": col(lambda r: _get(r, "http_max_rtb", "client_cpu_us_per_request")),
        "open_rate": col(lambda r: r.get("open_rate")),
        "open_p50_rtb": col(lambda r: _get(r, "open_rtb", "latency_ms", "p50")),
        "open_p99_rtb": col(lambda r: _get(r, "open_rtb", "latency_ms", "p99")),
        "open_p50_ref": col(lambda r: _get(r, "open_ref", "latency_ms", "p50")),
        "open_p99_ref": col(lambda r: _get(r, "open_ref", "latency_ms", "p99")),
        "open_errors_rtb": col(lambda r: _get(r, "open_rtb", "errors_total")),
        "open_client_cpu": col(lambda r: _get(r, "open_rtb", "client_cpu_us_per_request")),
        "open_lag_p99": col(lambda r: _get(r, "open_ref", "dispatch_lag_ms", "p99")),
        "grpc_rtb": col(lambda r: rate(r, "grpc_unary_rtb")),
        "grpc_ref": col(lambda r: rate(r, "grpc_unary_ref")),
        "grpc_ratio": col(lambda r: _ratio(rate(r, "grpc_unary_rtb"), rate(r, "grpc_unary_ref"))),
        "grpc_cpu_rtb": col(lambda r: _get(r, "grpc_unary_rtb", "server_cpu_us_per_request")),
        "grpc_cpu_ref": col(lambda r: _get(r, "grpc_unary_ref", "server_cpu_us_per_request")),
        "grpc_client_cpu": col(lambda r: _get(r, "grpc_unary_rtb", "client_cpu_us_per_request")),
        "stream_rtb": col(lambda r: rate(r, "grpc_stream_rtb")),
        "stream_ref": col(lambda r: rate(r, "grpc_stream_ref")),
        "stream_vs_unary": col(
            lambda r: _ratio(rate(r, "grpc_stream_rtb"), rate(r, "grpc_unary_rtb"))
        ),
        "stream_cpu_rtb": col(lambda r: _get(r, "grpc_stream_rtb", "server_cpu_us_per_request")),
        "stream_cpu_ref": col(lambda r: _get(r, "grpc_stream_ref", "server_cpu_us_per_request")),
        "stream_client_cpu": col(lambda r: _get(r, "grpc_stream_rtb", "client_cpu_us_per_request")),
        "errors_total": sum(
            _get(run, "errors_total") or 0 for r in reps for run in r["runs"] if "error" not in run
        ),
        "failed_runs": [run["label"] for r in reps for run in r["runs"] if "error" in run],
        "other_cores": spread(
            [run.get("other_cores_busy") for r in reps for run in r["runs"] if "error" not in run]
        ),
    }
    f["batcher_direct_us"] = spread([b["direct_us"] for b in batcher])
    f["batcher_submit_us"] = spread([b["submit_us"] for b in batcher])
    f["batcher_added_us"] = spread([b["added_us"] for b in batcher])
    return f


def gates(f: dict[str, Any], grpc_available: bool) -> list[dict[str, Any]]:
    out = []

    def add(row: str, what: str, value: float | None, ok: bool | None, bar: str) -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"row": row, "target": what, "value": value, "bar": bar, "status": status})

    def med(key: str) -> float | None:
        return f[key]["median"]

    def check(v: float | None, pred: Callable[[float], bool]) -> bool | None:
        return None if v is None else pred(v)

    v = med("http_ratio")
    add(
        "a", "HTTP req/s, rtbserve / trivial", v, check(v, lambda x: x >= BAR_HTTP_RATIO), ">= 0.50"
    )
    v = med("http_cpu_rtb")
    add("a", "rtbserve server CPU us/request", v, check(v, lambda x: x <= BAR_HTTP_CPU_US), "<= 25")
    v = med("open_p99_rtb")
    add("b", "open-loop p99 ms at half max", v, check(v, lambda x: x <= BAR_OPEN_P99_MS), "<= 2")
    if grpc_available:
        v = med("grpc_ratio")
        add("c", "gRPC unary, rtbserve / trivial", v, check(v, lambda x: x >= 0.75), ">= 0.75")
        v = med("stream_vs_unary")
        add("d", "PredictStream msgs/s / unary", v, check(v, lambda x: x >= 3.0), ">= 3")
    else:
        add("c", "gRPC unary, rtbserve / trivial", None, None, ">= 0.75")
        add("d", "PredictStream msgs/s / unary", None, None, ">= 3")
    v = med("batcher_added_us")
    add("e", "batcher added median us", v, check(v, lambda x: x <= BAR_BATCHER_ADDED_US), "<= 50")
    return out


def _cell(s: dict[str, Any], fmt: Callable[[float], str]) -> str:
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def _r2(x: float) -> str:
    return f"{x:.2f}"


def _us(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def print_table(f: dict[str, Any], gl: list[dict[str, Any]], cfg: Config, notes: list[str]) -> None:
    status = {(g["row"], g["target"]): g["status"] for g in gl}

    def st(row: str, key: str) -> str:
        return status.get((row, key), "")

    closed = cfg.client  # who drove rows a, c, d
    if cfg.uses_h2load:
        unary_what = f"{cfg.h2_grpc_connections} conns x {cfg.h2_grpc_streams} streams"
        stream_what = f"{cfg.h2_stream_connections} streams of {cfg.stream_messages} msgs"
    else:
        unary_what = f"{cfg.grpc_inflight} in flight"
        stream_what = f"{cfg.streams} streams x {cfg.stream_depth}"
    rows: list[tuple[str, ...]] = [
        (
            f"a  HTTP /invocations, closed loop, {cfg.http_connections} conns: req/s",
            closed,
            _cell(f["http_rtb"], fmt_rate),
            _cell(f["http_ref"], fmt_rate),
            _cell(f["http_ratio"], _r2),
            ">= 0.50",
            st("a", "HTTP req/s, rtbserve / trivial"),
        ),
        (
            "   server CPU us/request",
            "",
            _cell(f["http_cpu_rtb"], _us),
            _cell(f["http_cpu_ref"], _us),
            "",
            "<= 25",
            st("a", "rtbserve server CPU us/request"),
        ),
        (
            f"b  open loop (Poisson) at {_cell(f['open_rate'], fmt_rate)} req/s: p50 ms",
            cfg.open_client_label,
            _cell(f["open_p50_rtb"], fmt_ms),
            _cell(f["open_p50_ref"], fmt_ms),
            "",
            "",
            "",
        ),
        (
            "   p99 ms",
            "",
            _cell(f["open_p99_rtb"], fmt_ms),
            _cell(f["open_p99_ref"], fmt_ms),
            "",
            "<= 2",
            st("b", "open-loop p99 ms at half max"),
        ),
        (
            f"c  gRPC unary Predict, {unary_what}: req/s",
            closed,
            _cell(f["grpc_rtb"], fmt_rate),
            _cell(f["grpc_ref"], fmt_rate),
            _cell(f["grpc_ratio"], _r2),
            ">= 0.75",
            st("c", "gRPC unary, rtbserve / trivial"),
        ),
        (
            "   server CPU us/request",
            "",
            _cell(f["grpc_cpu_rtb"], _us),
            _cell(f["grpc_cpu_ref"], _us),
            "",
            "",
            "",
        ),
        (
            f"d  PredictStream, {stream_what}: msgs/s",
            closed,
            _cell(f["stream_rtb"], fmt_rate),
            _cell(f["stream_ref"], fmt_rate),
            _cell(f["stream_vs_unary"], _r2) + " x unary" if f["stream_vs_unary"]["n"] else "-",
            ">= 3",
            st("d", "PredictStream msgs/s / unary"),
        ),
        (
            "   server CPU us/message",
            "",
            _cell(f["stream_cpu_rtb"], _us),
            _cell(f["stream_cpu_ref"], _us),
            "",
            "",
            "",
        ),
        (
            "e  batcher, concurrency 1: median us (submit / direct)",
            "in process",
            _cell(f["batcher_submit_us"], _us),
            _cell(f["batcher_direct_us"], _us),
            "+" + _cell(f["batcher_added_us"], _us) if f["batcher_added_us"]["n"] else "-",
            "<= +50",
            st("e", "batcher added median us"),
        ),
    ]
    head = ("figure", "client", "rtbserve", "reference", "ratio", "bar", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print()
    print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(
        "  reference: a/b trivial uvloop+httptools server, c/d trivial grpc.aio server; "
        "e: model.predict(row) called directly"
    )
    client = ", ".join(
        f"{row} {who} {_cell(f[key], _us)}"
        for row, who, key in (
            ("a", closed, "http_client_cpu"),
            ("b", cfg.open_client_label, "open_client_cpu"),
            ("c", closed, "grpc_client_cpu"),
            ("d", closed, "stream_client_cpu"),
        )
    )
    print(f"  client CPU us/request (d: per message), with rtbserve: {client}")
    print(
        "  other processes (neither the measured server nor the load generator) kept "
        f"{_cell(f['other_cores'], _r2)} of the 2 cores busy during the runs"
    )
    for n in notes:
        print(f"  NOTE: {n}")
    n_pass = sum(g["status"] == "PASS" for g in gl)
    n_fail = sum(g["status"] == "FAIL" for g in gl)
    print(
        f"  {n_pass} PASS, {n_fail} FAIL, {len(gl) - n_pass - n_fail} not measured "
        "(judged on medians)"
    )


# --------------------------------------------------------------------------- main


def _failure_summary(output: str) -> str:
    """The telling lines of a failed start: exception messages and the server's own verdict."""
    errors: list[str] = []
    verdict = ""
    for ln in output.splitlines():
        ln = ln.strip()
        if re.match(r"^[\w.]*(Error|Exception): ", ln) and ln not in errors:
            errors.append(ln)
        elif ln.startswith("stopped"):
            verdict = ln
    picked = errors[:2] + ([verdict] if verdict else [])
    return " | ".join(picked) if picked else output.strip().splitlines()[-1][:200]


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 repeat, short runs (~1-2 min)")
    ap.add_argument("--repeats", type=int, help="default 3 (1 with --quick)")
    ap.add_argument("--workers", type=int, default=2, help="rtbserve --workers (default 2)")
    ap.add_argument("--ref-procs", type=int, default=2, help="reference server processes")
    ap.add_argument(
        "--client",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="closed-loop client for rows a, c, d: h2load when installed (auto), or the Python "
        "load generator (whose own CPU caps these rows)",
    )
    ap.add_argument("--h2load-threads", type=int, default=1, help="h2load -t (default 1)")
    ap.add_argument(
        "--open-client",
        choices=("c", "python"),
        default=None,
        help="open-loop client for row b: c (bench/loadgen/openloop.c, built with gcc; the "
        "default when gcc is installed) or python (the Python generator, --client-procs "
        "processes, ~29 us of CPU per request)",
    )
    ap.add_argument("--client-procs", type=int, default=2, help="Python load generator processes")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)
    h2load_exe = h2load_path()
    if args.client == "h2load" and h2load_exe is None:
        ap.error(f"h2load not found; install it with `{INSTALL_HINT}`")
    client = "h2load" if args.client != "python" and h2load_exe else "python"
    open_client = args.open_client or ("c" if openloop_available() else "python")
    open_note = ""
    exe = ""
    if open_client == "c":
        try:
            exe = str(build_openloop())
        except NativeClientError as exc:
            if args.open_client == "c":
                ap.error(str(exc))
            open_client = "python"
            open_note = f"row b used the Python open-loop generator: {exc}"
    elif args.open_client is None:
        open_note = (
            "gcc not found: row b used the Python open-loop generator, whose own CPU "
            "(~29 us per request) shares the 2 cores with the server"
        )
    cfg = Config.make(args, client, open_client, exe)
    from bench.core import host_facts

    t_run = time.perf_counter()
    load_start = _loadavg()
    host = host_facts()
    features = rtbserve_features()
    print(
        f"rtbserve serving benchmark ({'quick' if cfg.quick else 'full'}, {cfg.repeats} repeat(s), "
        f"{cfg.duration_s:g} s runs after {cfg.warmup_s:g} s warm-up): "
        "client and server share the 2 cores"
    )
    print(
        f"  {host['cpu']}, {host['cores']} cores; load average at start {load_start}; "
        f"Python {host['python']}"
    )
    workers = f"--workers {cfg.workers}" if features["workers"] else "1 process (no --workers yet)"
    print(
        f"  rtbserve: {workers}, demo model ({DEMO_MODEL.name}, 1 CSV row of "
        f"{len(csv_row_to_floats(demo_csv_row()))} features); reference servers: "
        f"{cfg.ref_procs} processes"
    )
    python_client = f"the Python load generator ({cfg.client_procs} processes)"
    if cfg.open_client == "c":
        open_client_desc = f"the C open-loop client ({OPENLOOP_C}, 1 process, epoll)"
    else:
        open_client_desc = python_client
    clients = {"b": open_client_desc}
    if cfg.uses_h2load:
        version = h2load_version(h2load_exe)
        threads = f"{cfg.h2load_threads} thread{'s' if cfg.h2load_threads > 1 else ''}"
        h2 = f"h2load {version} ({threads}, after its own warm-up run)"
        clients |= {"a": h2, "c": h2, "d": h2}
        print(
            f"  clients: a, c, d {h2}; b {open_client_desc}; gRPC answers checked once per run "
            "with a Python grpc client (h2load reads no grpc-status)"
        )
    else:
        clients |= {"a": python_client, "c": python_client, "d": python_client}
        print(f"  clients: a, c, d {python_client}; b {open_client_desc}")
    notes: list[str] = []
    if open_note:
        notes.append(open_note)
        print(f"  NOTE: {open_note}")
    if h2load_exe is None:
        notes.append(
            "h2load not found: rows a, c and d used the Python load generator, whose own CPU "
            "per gRPC message (~110-210 us, about what the servers spend) shares the 2 cores "
            f"with the server and caps rows c and d; install h2load with `{INSTALL_HINT}`"
        )
        print(f"  NOTE: {notes[-1]}")
    elif not cfg.uses_h2load:
        notes.append(
            "--client python: rows c and d measure the Python client as much as the server"
        )
    if not features["workers"]:
        notes.append("rtbserve serve has no --workers yet: it ran as one process")
    if not features["grpc_port"]:
        notes.append(
            "gRPC rows c and d not available: `rtbserve serve` does not accept --grpc-port yet"
        )
    sys.stdout.flush()

    reps: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    started: list[Any] = []
    try:
        ref_http, ref_http_port = start_ref_server("http", procs=cfg.ref_procs)
        started.append(ref_http)
        ref_grpc, ref_grpc_port = start_ref_server("grpc", procs=cfg.ref_procs)
        started.append(ref_grpc)
        t0 = time.perf_counter()
        try:
            rtb = Rtbserve(cfg, features)
        except RuntimeError as exc:
            if not features["grpc_port"]:
                raise
            # the gRPC transport is landing concurrently: measure HTTP alone rather than nothing
            why = _failure_summary(str(exc))
            notes.append(
                f"rtbserve with --grpc-port failed to start, gRPC rows c and d not measured: {why}"
            )
            print(f"  rtbserve with gRPC failed to start ({why}); retrying with HTTP only")
            features = {**features, "grpc_port": False}
            t0 = time.perf_counter()
            rtb = Rtbserve(cfg, features)
        started.append(rtb)
        servers = {
            "rtbserve": {"argv": rtb.argv, "http_port": rtb.http_port, "grpc_port": rtb.grpc_port},
            "ref_http_port": ref_http_port,
            "ref_grpc_port": ref_grpc_port,
            "rtbserve_ready_s": round(time.perf_counter() - t0, 2),
        }
        print(
            f"  servers ready (rtbserve in {servers['rtbserve_ready_s']} s): rtbserve "
            f"http {rtb.http_port}" + (f" grpc {rtb.grpc_port}" if rtb.grpc_port else "")
            + f", reference http {ref_http_port}, grpc {ref_grpc_port}",
            flush=True,
        )  # fmt: skip
        for i in range(cfg.repeats):
            print(f"  repeat {i + 1}/{cfg.repeats}", flush=True)
            reps.append(
                one_repeat(
                    i, cfg, rtb, (ref_http.pid, ref_http_port), (ref_grpc.pid, ref_grpc_port)
                )
            )
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                s.stop()
    print("  e  batcher in process (servers stopped)", flush=True)
    try:
        batcher = batcher_overhead(cfg)
    except Exception as exc:
        traceback.print_exc()
        notes.append(f"row e failed: {type(exc).__name__}: {exc}")
        batcher = []

    f = figures(reps, batcher)
    if f["errors_total"]:
        notes.append(f"{f['errors_total']} request errors over the run (see the JSON)")
    if f["failed_runs"]:
        notes.append("failed runs: " + ", ".join(f["failed_runs"]))
    gl = gates(f, features["grpc_port"])
    print_table(f, gl, cfg, notes)
    load_end = _loadavg()
    total = time.perf_counter() - t_run
    print(f"  load average at end {load_end}; total {total:.0f} s")
    doc = {
        "mode": "quick" if cfg.quick else "full",
        "config": asdict(cfg),
        "host": host,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": total,
        "rtbserve_features": features,
        "clients": clients,
        "servers": servers,
        # each repeat's runs by name; "order" is the order they ran in
        "repeats": [
            {
                **{k: v for k, v in r.items() if k != "runs"},
                "order": [x["label"] for x in r["runs"]],
            }
            for r in reps
        ],
        "batcher": batcher,
        "figures": f,
        "targets": gl,
        "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
