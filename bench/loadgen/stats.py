"""Measurements of one run: raw per-process samples, HDR histograms, the merged summary.

The hot path appends nanosecond integers to ``array('q')`` (~50 ns); the HDR histograms
(microseconds, 1 us .. 60 s, 3 significant digits) are built from them once the run is over, so
the client spends no per-request time on ``record_value`` (~1.2 us each in ``hdrhistogram``).
Each process sends its histograms encoded; the parent decodes and adds them.

Three distributions per run:

- latency: response time minus the request's *intended* send time. In open-loop runs this
  includes any wait for a free connection and any lateness of the client itself, so coordinated
  omission cannot hide a stall; in closed-loop (``max``) runs the intended time is the send time.
- service: response time minus the time the bytes were actually written (what a closed-loop
  tool would report).
- dispatch lag: how late the client's scheduler handed a request to the connection pool.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

ERROR_KINDS = ("status", "connection", "timeout", "mismatched_id")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
HDR_LOWEST_US = 1
HDR_HIGHEST_US = 60_000_000
HDR_DIGITS = 3


class Recorder:
    """One process's samples and counters (not thread-safe: loop thread only).

    measure_from_ns: requests intended before it are warm-up: sent, answered, not sampled.
    window_end_ns: closed-loop runs count throughput only for answers before it.
    """

    __slots__ = (
        "measure_from_ns",
        "window_end_ns",
        "latency",
        "service",
        "lag",
        "errors",
        "answered",
        "in_window",
        "last_ns",
        "connect_failures",
    )

    def __init__(self, measure_from_ns: int, window_end_ns: int) -> None:
        self.measure_from_ns = measure_from_ns
        self.window_end_ns = window_end_ns
        self.latency = array("q")
        self.service = array("q")
        self.lag = array("q")
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.answered = 0  # every answered request, warm-up included, errors included
        self.in_window = 0
        self.last_ns = 0
        self.connect_failures = 0  # reconnect attempts that failed (not requests)

    def ok(self, intended_ns: int, sent_ns: int, now_ns: int) -> None:
        self.answered += 1
        if intended_ns >= self.measure_from_ns:
            self.latency.append(now_ns - intended_ns)
            self.service.append(now_ns - sent_ns)
            self.last_ns = now_ns
            if now_ns <= self.window_end_ns:
                self.in_window += 1

    def error(self, kind: str, answered: bool = True) -> None:
        self.errors[kind] += 1
        if answered:
            self.answered += 1


def samples_to_hdr(samples_ns: array | np.ndarray) -> HdrHistogram:
    """An HDR histogram in microseconds from nanosecond samples (clamped to 1 us .. 60 s)."""
    h = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)
    if len(samples_ns):
        us = np.clip(np.frombuffer(samples_ns, dtype=np.int64) // 1000, 1, HDR_HIGHEST_US)
        values, counts = np.unique(us, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            h.record_value(v, c)
    return h


def encode_hdr(h: HdrHistogram) -> str:
    return h.encode().decode("ascii")


def merge_hdr(encoded: list[str]) -> HdrHistogram:
    total = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)
    for e in encoded:
        total.add(HdrHistogram.decode(e.encode("ascii")))
    return total


def summarize_ms(h: HdrHistogram) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, max and mean in milliseconds (None when there are no samples)."""
    if h.get_total_count() == 0:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    out: dict[str, float | None] = {
        _pname(p): h.get_value_at_percentile(p) / 1000 for p in PERCENTILES
    }
    out["max"] = h.get_max_value() / 1000
    out["mean"] = h.get_mean_value() / 1000
    return out


def _pname(p: float) -> str:
    return f"p{p:g}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 10_000:
        return f"{r / 1000:.1f}k"
    return f"{r:.0f}"


def format_result(res: dict[str, Any]) -> str:
    """The run as a small table (what ``python -m bench.loadgen`` prints)."""
    errors = res["errors"]
    err = ", ".join(f"{k} {v}" for k, v in errors.items())
    if res["mode"] == "rate":
        mode = f"open loop, {res['rate']:g} req/s {res['arrivals']} arrivals"
    else:
        mode = "closed loop (max), back-to-back"
    rows = [
        ("target", res["target"]),
        (
            "load",
            f"{mode}; {res['procs']} procs x {res['connections_per_proc']} "
            f"{res['slot_name']}, {res['duration_s']:g} s after {res['warmup_s']:g} s warm-up",
        ),
        (
            "requests",
            f"{res['requests']} measured, achieved {fmt_rate(res['achieved_rate'])} req/s, "
            f"{res['unanswered']} unanswered",
        ),
        ("errors", f"{sum(errors.values())} ({err}; whole run)"),
    ]
    for name, key, note in (
        ("latency ms", "latency_ms", "from intended send time"),
        ("service ms", "service_ms", "from actual send"),
    ):
        s = res[key]
        cells = "  ".join(f"{k} {fmt_ms(s[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        rows.append((name, f"{cells}  ({note})"))
    lag = res["dispatch_lag_ms"]
    rows.append(
        (
            "client",
            f"CPU {res['client_cpu_us_per_request']:.1f} us/request over {res['procs']} procs; "
            f"dispatch lag p99 {fmt_ms(lag['p99'])} ms, max {fmt_ms(lag['max'])} ms"
            + ("" if res["precise_timer"] else " (ms timer: no timerfd)"),
        )
    )
    if res.get("server_cpu_us_per_request") is not None:
        rows.append(
            (
                "server",
                f"CPU {res['server_cpu_us_per_request']:.1f} us/request "
                f"(pid {res['server_pid']} and its descendants); other processes kept "
                f"{res['other_cores_busy']:.2f} cores busy",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
