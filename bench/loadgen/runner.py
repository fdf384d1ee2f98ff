"""Runs: load processes, the open-loop dispatcher, closed-loop max, and the SLO rate search.

A run, as a timeline (every process on its own uvloop loop, started with ``spawn``)::

    parent: spawn P processes ............ all ready -> start_ns = now + 50 ms -> collect, merge
    child:  open its connections, "ready" -> wait for start_ns
            | warm-up (sent, answered, not sampled) | measured window (duration_s) | drain |
            start_ns                                measure_from_ns                  end + timeout_s

- Open loop (``mode="rate"``): every request's intended send time is fixed up front
  (``schedule.arrival_times_ns``); a ``Waker`` wakes the loop at the next one and the dispatcher
  hands every due request to the pool. Latency counts from the intended time.
- Closed loop (``mode="max"``): every connection (slot) sends back-to-back until the window ends;
  the figure is answers inside the window per second.
- The drain waits at most ``timeout_s`` past the schedule for answers; whatever is still queued
  or in flight then fails as a timeout, so a run always ends by itself.

Each process also reports its own CPU time (``time.process_time``, all threads), from which the
client's CPU per request is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from time import monotonic_ns
from typing import Any

from bench.loadgen import stats
from bench.loadgen.cpu import machine_busy_s, tree_cpu_s
from bench.loadgen.schedule import ARRIVALS, Waker, arrival_times_ns
from bench.loadgen.stats import Recorder
from bench.loadgen.targets import Target, predictor_pb2

MODES = ("rate", "max")
_READY_TIMEOUT_S = 60.0
_START_MARGIN_NS = 50_000_000
_EXPIRE_EVERY_S = 0.1
_FAR_FUTURE_NS = 1 << 62


class LoadError(RuntimeError):
    """A load process could not connect or failed; the message names the process and cause."""


@dataclass(frozen=True)
class LoadSpec:
    """How much load, for how long, over what.

    mode: ``rate`` (open loop at ``rate`` requests/s in total) or ``max`` (closed loop).
    arrivals: ``fixed`` interval or ``poisson`` (open loop only).
    duration_s: the measured window; ``warmup_s`` runs before it, unsampled.
    connections: total over all processes (split as evenly as possible): HTTP connections,
    concurrent unary gRPC calls, or gRPC streams.
    procs: load processes, each with its own loop and connections.
    timeout_s: a request older than this fails as a timeout; also the longest drain.
    channels: gRPC channels (TCP connections) per process.
    stream_depth: messages in flight per gRPC stream.
    """

    mode: str = "rate"
    rate: float = 1000.0
    arrivals: str = "poisson"
    duration_s: float = 2.0
    warmup_s: float = 0.5
    connections: int = 16
    procs: int = 1
    timeout_s: float = 2.0
    channels: int = 2
    stream_depth: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"unknown arrivals {self.arrivals!r}; choose from fixed, poisson")
        if self.procs < 1 or self.connections < self.procs:
            raise ValueError(
                f"expected procs >= 1 and connections >= procs, got procs {self.procs}, "
                f"connections {self.connections}"
            )
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ValueError("expected duration_s > 0, warmup_s >= 0 and timeout_s > 0")
        if self.mode == "rate" and self.rate <= 0:
            raise ValueError(f"expected a rate > 0 requests/s, got {self.rate}")

    def connections_of(self, index: int) -> int:
        base, extra = divmod(self.connections, self.procs)
        return base + (1 if index < extra else 0)


def run_load(
    target: Target,
    spec: LoadSpec,
    *,
    server_pid: int | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``spec`` against ``target``; returns the merged result (see ``stats.format_result``).

    server_pid: when given, that process tree's CPU time over the run is divided by the requests
    answered (warm-up included) into ``server_cpu_us_per_request``.
    on_start: called with the start time (``time.monotonic_ns``) once every load process is
    connected and told to start (tests use it to inject a failure mid-run).
    Raises ``LoadError`` when a load process cannot connect or fails. Blocks for about
    warmup_s + duration_s (+ drain).
    """
    if target.kind != "http":
        predictor_pb2()  # generate the private copy, if needed, once and before the children
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        for i in range(spec.procs):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=_child_main, args=(child_end, target, spec, i), daemon=True,
                name=f"loadgen-{i}",
            )  # fmt: skip
            p.start()
            child_end.close()
            pipes.append(parent_end)
            procs.append(p)
        for i, conn in enumerate(pipes):
            _expect(conn, "ready", i, _READY_TIMEOUT_S)
        server_cpu0 = tree_cpu_s(server_pid) if server_pid else 0.0
        busy0, wall0 = machine_busy_s(), time.perf_counter()
        start_ns = monotonic_ns() + _START_MARGIN_NS
        for conn in pipes:
            conn.send(("start", start_ns))
        if on_start is not None:
            on_start(start_ns)
        budget = spec.warmup_s + spec.duration_s + 2 * spec.timeout_s + 30
        parts = [_expect(conn, "result", i, budget) for i, conn in enumerate(pipes)]
        server_cpu_s = tree_cpu_s(server_pid) - server_cpu0 if server_pid else 0.0
        busy_s, wall_s = machine_busy_s() - busy0, time.perf_counter() - wall0
    finally:
        for conn in pipes:
            conn.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    res = merge_parts(target, spec, parts)
    res["wall_s"] = wall_s
    res["machine_cores_busy"] = busy_s / wall_s
    if server_pid:
        # what neither this load nor the measured server used: other engineers' jobs, mostly
        others = busy_s - res["client_cpu_s"] - server_cpu_s
        res["other_cores_busy"] = max(0.0, others / wall_s)
        res["server_pid"] = server_pid
        res["server_cpu_s"] = server_cpu_s
        res["server_cpu_us_per_request"] = server_cpu_s / max(res["answered"], 1) * 1e6
    return res


def _expect(conn: Connection, kind: str, index: int, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise LoadError(f"load process {index}: no {kind!r} within {timeout_s:.0f} s")
    try:
        tag, payload = conn.recv()
    except EOFError:
        raise LoadError(f"load process {index} exited before sending {kind!r}") from None
    if tag == "error":
        raise LoadError(f"load process {index}: {payload}")
    return payload


def merge_parts(target: Target, spec: LoadSpec, parts: list[dict[str, Any]]) -> dict[str, Any]:
    latency = stats.merge_hdr([p["latency"] for p in parts])
    service = stats.merge_hdr([p["service"] for p in parts])
    lag = stats.merge_hdr([p["lag"] for p in parts])
    measured = sum(p["measured"] for p in parts)
    answered = sum(p["answered"] for p in parts)
    errors = {k: sum(p["errors"][k] for p in parts) for k in stats.ERROR_KINDS}
    measure_from = parts[0]["measure_from_ns"]
    if spec.mode == "max":
        achieved = sum(p["in_window"] for p in parts) / spec.duration_s
    else:
        last = max(p["last_ns"] for p in parts)
        achieved = measured / ((last - measure_from) / 1e9) if last > measure_from else 0.0
    cpu_s = sum(p["cpu_s"] for p in parts)
    return {
        "target": target.describe(),
        "kind": target.kind,
        "spec": asdict(spec),
        "mode": spec.mode,
        "rate": spec.rate if spec.mode == "rate" else None,
        "arrivals": spec.arrivals,
        "procs": spec.procs,
        "connections": spec.connections,
        "connections_per_proc": "/".join(str(p["slots"]) for p in parts),
        "slot_name": parts[0]["slot_name"],
        "duration_s": spec.duration_s,
        "warmup_s": spec.warmup_s,
        "requests": measured,
        "answered": answered,
        "unanswered": sum(p["unanswered"] for p in parts),
        "achieved_rate": achieved,
        "errors": errors,
        "errors_total": sum(errors.values()),
        "connect_failures": sum(p["connect_failures"] for p in parts),
        "latency_ms": stats.summarize_ms(latency),
        "service_ms": stats.summarize_ms(service),
        "dispatch_lag_ms": stats.summarize_ms(lag),
        "client_cpu_s": cpu_s,
        "client_cpu_us_per_request": cpu_s / max(answered, 1) * 1e6,
        "precise_timer": all(p["precise_timer"] for p in parts),
        "latency_hdr": stats.encode_hdr(latency),
    }


# --------------------------------------------------------------------------- load process


def _child_main(conn: Connection, target: Target, spec: LoadSpec, index: int) -> None:
    import uvloop

    _fine_timer_slack()
    try:
        result = uvloop.run(_child_run(conn, target, spec, index))
    except BaseException as exc:  # report every failure to the parent, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("result", result))
    finally:
        conn.close()


def _fine_timer_slack() -> None:
    # Linux batches timer expiries within 50 us by default ("timer slack"); 1 us keeps the
    # schedule's send times precise (PR_SET_TIMERSLACK)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000)


def make_pool(target: Target, spec: LoadSpec, slots: int, rec: Recorder, index: int) -> Any:
    if target.kind == "http":
        from bench.loadgen.http_client import HttpPool

        return HttpPool(target, slots, rec, timeout_s=spec.timeout_s)
    from bench.loadgen.grpc_client import StreamPool, UnaryPool

    if target.kind == "grpc":
        return UnaryPool(target, slots, rec, timeout_s=spec.timeout_s, channels=spec.channels)
    return StreamPool(
        target, slots, rec, timeout_s=spec.timeout_s, channels=spec.channels,
        depth=spec.stream_depth, id_prefix=f"{index}.",
    )  # fmt: skip


async def _child_run(conn: Connection, target: Target, spec: LoadSpec, index: int) -> dict:
    loop = asyncio.get_running_loop()
    slots = spec.connections_of(index)
    rec = Recorder(_FAR_FUTURE_NS, _FAR_FUTURE_NS)
    pool = make_pool(target, spec, slots, rec, index)
    await pool.open()
    conn.send(("ready", None))
    if not conn.poll(_READY_TIMEOUT_S):
        raise LoadError("no start from the parent")
    _, start_ns = conn.recv()
    rec.measure_from_ns = start_ns + int(spec.warmup_s * 1e9)
    end_ns = rec.measure_from_ns + int(spec.duration_s * 1e9)
    if spec.mode == "max":
        rec.window_end_ns = end_ns
    cpu0 = time.process_time()

    finished: asyncio.Future[None] = loop.create_future()
    dispatcher = _Dispatcher(pool, rec, finished)
    waker = Waker(loop, dispatcher.tick)
    dispatcher.waker = waker
    if spec.mode == "rate":
        dispatcher.times = arrival_times_ns(
            start_ns, spec.warmup_s + spec.duration_s, spec.rate, arrivals=spec.arrivals,
            proc_index=index, procs=spec.procs, seed=spec.seed,
        )  # fmt: skip
    else:
        dispatcher.closed_loop_end_ns = end_ns
    waker.arm(start_ns)

    expiry = _Expiry(loop, pool)
    try:
        await finished
        drained: asyncio.Future[None] = loop.create_future()

        def on_idle() -> None:
            if not drained.done():
                drained.set_result(None)

        pool.on_idle = on_idle
        if pool.outstanding == 0:
            on_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained, spec.timeout_s)
        unanswered = pool.abandon()
    finally:
        expiry.stop()
        precise_timer = waker.is_precise
        waker.close()
    cpu_s = time.process_time() - cpu0
    await pool.close()
    return {
        "latency": stats.encode_hdr(stats.samples_to_hdr(rec.latency)),
        "service": stats.encode_hdr(stats.samples_to_hdr(rec.service)),
        "lag": stats.encode_hdr(stats.samples_to_hdr(rec.lag)),
        "measured": len(rec.latency),
        "in_window": rec.in_window,
        "answered": rec.answered,
        "unanswered": unanswered,
        "errors": rec.errors,
        "connect_failures": rec.connect_failures,
        "last_ns": rec.last_ns,
        "measure_from_ns": rec.measure_from_ns,
        "cpu_s": cpu_s,
        "slots": slots,
        "slot_name": pool.slot_name,
        "precise_timer": precise_timer,
    }


class _Dispatcher:
    """Hands due requests to the pool at their intended times (open loop), or starts max mode."""

    def __init__(self, pool: Any, rec: Recorder, finished: asyncio.Future[None]) -> None:
        self.pool = pool
        self.rec = rec
        self.finished = finished
        self.waker: Waker | None = None
        self.times: list[int] = []
        self.i = 0
        self.closed_loop_end_ns = 0

    def tick(self) -> None:
        if self.closed_loop_end_ns:
            if not self.pool.closed_loop:
                self.pool.start_closed_loop()
                self.waker.arm(self.closed_loop_end_ns)  # type: ignore[union-attr]
            elif monotonic_ns() >= self.closed_loop_end_ns:
                self._finish()
            else:
                self.waker.arm(self.closed_loop_end_ns)  # type: ignore[union-attr]
            return
        times = self.times
        n = len(times)
        i = self.i
        now = monotonic_ns()
        dispatch = self.pool.dispatch
        lag = self.rec.lag
        while i < n:
            t = times[i]
            if t > now:
                break
            lag.append(now - t)
            dispatch(t)
            i += 1
        self.i = i
        if i < n:
            self.waker.arm(times[i])  # type: ignore[union-attr]
        else:
            self._finish()

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class _Expiry:
    """Every 100 ms: fail requests older than the timeout (bounded queues, bounded runs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Any) -> None:
        self.loop = loop
        self.pool = pool
        self.handle = loop.call_later(_EXPIRE_EVERY_S, self._run)

    def _run(self) -> None:
        self.pool.expire(monotonic_ns())
        self.handle = self.loop.call_later(_EXPIRE_EVERY_S, self._run)

    def stop(self) -> None:
        self.handle.cancel()


# --------------------------------------------------------------------------- SLO search


def find_max_rate(
    target: Target,
    spec: LoadSpec,
    slo_p99_ms: float,
    *,
    hi: float | None = None,
    steps: int = 6,
    step_s: float = 1.5,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """The highest open-loop rate whose p99 latency is <= ``slo_p99_ms``, by bisection.

    Each step is a short bounded run (``step_s`` measured, ``spec.warmup_s`` warm-up) at one rate.
    A rate passes when p99 <= SLO and there are no errors (an answer missing at the end of the
    drain counts as a timeout): then every request was answered within the SLO, so the server
    kept up with the schedule. ``hi`` defaults to 1.2x a short closed-loop max probe at
    ``spec.connections``. Returns {"rate": best passing rate or 0, "steps": [...], "probe": ...}.
    """
    probe = None
    if hi is None:
        probe = run_load(
            target, replace(spec, mode="max", duration_s=step_s), server_pid=server_pid
        )
        hi = 1.2 * probe["achieved_rate"]
    lo = 0.0
    log: list[dict[str, Any]] = []
    for _ in range(steps):
        rate = hi if not log and probe is None else (lo + hi) / 2
        res = run_load(
            target, replace(spec, mode="rate", rate=rate, duration_s=step_s), server_pid=server_pid
        )
        p99 = res["latency_ms"]["p99"]
        ok = p99 is not None and p99 <= slo_p99_ms and res["errors_total"] == 0
        log.append({"rate": rate, "passed": ok, "result": res})
        if ok:
            lo = rate
            if rate == hi:
                break
        else:
            hi = rate
    return {"rate": lo, "slo_p99_ms": slo_p99_ms, "steps": log, "probe": probe}
