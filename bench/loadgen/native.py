"""The C open-loop HTTP/1.1 client (``openloop.c``): build it once, run it, read its JSON.

Why: the Python generator spends ~29 us of CPU per open-loop request (0.76 of a core at 26k
req/s) on the same 2 cores as the server it measures, so at bench.serving's row-b rate its own
CPU shapes the tail. ``openloop`` is one single-threaded epoll process with a precomputed
schedule, latency from the *intended* send time, and exact percentiles (see the C file's header).

- ``build_openloop(build_dir=None)``: compiles ``openloop.c`` with gcc ``-O2`` into
  ``<cache>/bench-openloop/<key>/openloop`` once (``<cache>`` is ``$RTBSERVE_CACHE_DIR``, else
  ``~/.cache/rtbserve``; the key hashes the source, the flags and gcc's version) and returns the
  path. Raises ``NativeClientError`` when gcc is missing or the build fails.
- ``openloop_available()``: whether gcc is on ``PATH`` (so callers can fall back to Python).
- ``run_openloop(target, spec, server_pid=...)``: one open-loop run over ``spec.connections``
  connections, returning a dict shaped like ``bench.loadgen.run_load``'s where the keys overlap
  (``achieved_rate``, ``requests``, ``answered``, ``errors``, ``errors_total``, ``latency_ms``,
  ``service_ms``, ``dispatch_lag_ms``, ``client_cpu_us_per_request``, ``server_cpu_us_per_request``,
  ``other_cores_busy``, ...), plus the client's own fields (``achieved_send_rate``,
  ``max_backlog``, ``window_s``). ``errors`` uses the C client's kinds: ``status_4xx``,
  ``status_5xx``, ``status_other``, ``conn``, ``timeout``, ``parse`` (whole run, warm-up
  included).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen.cpu import machine_busy_s, tree_cpu_s
from bench.loadgen.runner import LoadSpec
from bench.loadgen.targets import Target, http_request_bytes

SOURCE = Path(__file__).resolve().with_name("openloop.c")
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra")
LIBS = ("-lm",)
ERROR_KINDS = ("status_4xx", "status_5xx", "status_other", "conn", "timeout", "parse")
CLIENT_NAME = "openloop-c"
_RUN_MARGIN_S = 30.0  # beyond warm-up + duration + drain, before the run is declared hung


class NativeClientError(RuntimeError):
    """The C client could not be built or run; the message says why."""


def find_gcc() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")


def openloop_available() -> bool:
    """True when gcc is on PATH (the build itself may still fail: see ``build_openloop``)."""
    return find_gcc() is not None


def default_build_dir() -> Path:
    env = os.environ.get("RTBSERVE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "rtbserve"
    return base / "bench-openloop"


def _gcc_version(gcc: str) -> str:
    try:
        out = subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeClientError(f"{gcc} --version failed: {exc}") from None
    return out.stdout.splitlines()[0] if out.stdout else ""


def build_openloop(build_dir: Path | None = None) -> Path:
    """The compiled client (built once per source/flags/compiler; later calls reuse it)."""
    gcc = find_gcc()
    if gcc is None:
        raise NativeClientError(
            "gcc not found: the C open-loop client cannot be built (apt-get install gcc); "
            "use the Python generator instead"
        )
    src = SOURCE.read_bytes()
    ident = "\0".join((*CFLAGS, *LIBS, _gcc_version(gcc))).encode()
    key = hashlib.sha256(src + ident).hexdigest()[:16]
    out_dir = (build_dir or default_build_dir()) / key
    exe = out_dir / "openloop"
    if os.access(exe, os.X_OK):
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    # compile to a temporary name and rename: concurrent builders each publish a whole binary
    fd, tmp = tempfile.mkstemp(prefix=".openloop-", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run(
            [gcc, *CFLAGS, "-o", tmp, str(SOURCE), *LIBS],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            raise NativeClientError(f"gcc failed to build {SOURCE.name}:\n{res.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return exe


def openloop_argv(exe: Path, target: Target, spec: LoadSpec, request_file: Path) -> list[str]:
    return [
        str(exe),
        "--host", target.host,
        "--port", str(target.port),
        "--conns", str(spec.connections),
        "--rate", repr(float(spec.rate)),
        "--duration", repr(float(spec.duration_s)),
        "--warmup", repr(float(spec.warmup_s)),
        "--arrival", spec.arrivals,
        "--seed", str(spec.seed),
        "--timeout", repr(float(spec.timeout_s)),
        "--request-file", str(request_file),
    ]  # fmt: skip


def run_openloop(
    target: Target,
    spec: LoadSpec,
    *,
    server_pid: int | None = None,
    build_dir: Path | None = None,
    exe: Path | None = None,
) -> dict[str, Any]:
    """One open-loop run of the C client; blocks for about warmup + duration (+ drain).

    spec: ``mode="rate"``; ``rate``, ``arrivals``, ``duration_s``, ``warmup_s``,
    ``connections``, ``timeout_s`` and ``seed`` are used (one process: ``procs`` is ignored).
    server_pid: that process tree's CPU over the run, divided by the requests answered (warm-up
    included), becomes ``server_cpu_us_per_request``.
    Raises ``NativeClientError`` if the client cannot be built, cannot connect, or fails.
    """
    if target.kind != "http":
        raise ValueError(f"the C open-loop client speaks HTTP/1.1 only, not {target.kind!r}")
    if spec.mode != "rate":
        raise ValueError("the C open-loop client runs open loop only (spec.mode='rate')")
    exe = exe or build_openloop(build_dir)
    with tempfile.TemporaryDirectory(prefix="rtbserve-openloop-") as tmp:
        request_file = Path(tmp) / "request.bin"
        request_file.write_bytes(http_request_bytes(target))
        argv = openloop_argv(exe, target, spec, request_file)
        budget = spec.warmup_s + spec.duration_s + spec.timeout_s + _RUN_MARGIN_S
        server_cpu0 = tree_cpu_s(server_pid) if server_pid else 0.0
        busy0, wall0 = machine_busy_s(), time.perf_counter()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
        except subprocess.TimeoutExpired:
            raise NativeClientError(f"openloop did not finish within {budget:.0f} s") from None
        server_cpu_s = tree_cpu_s(server_pid) - server_cpu0 if server_pid else 0.0
        busy_s, wall_s = machine_busy_s() - busy0, time.perf_counter() - wall0
    if proc.returncode != 0:
        raise NativeClientError(
            f"openloop exited {proc.returncode}: {proc.stderr.strip() or '(no message)'}"
        )
    try:
        raw = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        head = proc.stdout[:200]
        raise NativeClientError(f"openloop printed no JSON ({exc}): {head!r}") from None
    return to_result(raw, target, spec, server_pid, server_cpu_s, busy_s, wall_s)


def to_result(
    raw: dict[str, Any],
    target: Target,
    spec: LoadSpec,
    server_pid: int | None,
    server_cpu_s: float,
    busy_s: float,
    wall_s: float,
) -> dict[str, Any]:
    """The client's JSON in ``run_load``'s shape (its own fields kept alongside)."""
    res: dict[str, Any] = {
        "client": CLIENT_NAME,
        "target": target.describe(),
        "kind": target.kind,
        "mode": "rate",
        "rate": spec.rate,
        "arrivals": spec.arrivals,
        "procs": 1,
        "connections": spec.connections,
        "connections_per_proc": str(spec.connections),
        "slot_name": "connections",
        "duration_s": spec.duration_s,
        "warmup_s": spec.warmup_s,
        # as in run_load: measured requests answered 2xx (the latency samples)
        "requests": raw["ok"],
        "scheduled": raw["scheduled"],
        "measured_scheduled": raw["measured_scheduled"],
        "completed": raw["completed"],
        "answered": raw["answered"],
        "unanswered": raw["unanswered"],
        "achieved_rate": raw["achieved_rate"],
        "achieved_send_rate": raw["achieved_send_rate"],
        "window_s": raw["window_s"],
        "errors": {k: raw["errors"].get(k, 0) for k in ERROR_KINDS},
        "errors_total": raw["errors_total"],
        "measured_errors": raw["measured_errors"],
        "connect_failures": raw["connect_failures"],
        "reconnects": raw["reconnects"],
        "stray_responses": raw["stray_responses"],
        "max_backlog": raw["max_backlog"],
        "latency_ms": _dist(raw["latency_ms"]),
        "service_ms": _dist(raw["service_ms"]),
        "dispatch_lag_ms": _dist(raw["dispatch_lag_ms"]),
        "client_cpu_s": raw["client_cpu_s"],
        "client_cpu_user_s": raw["client_cpu_user_s"],
        "client_cpu_sys_s": raw["client_cpu_sys_s"],
        "client_cpu_us_per_request": raw["client_cpu_us_per_request"],
        "precise_timer": True,
        "timer": raw["timer"],
        "client_wall_s": raw["wall_s"],
        "wall_s": wall_s,
        "machine_cores_busy": busy_s / wall_s if wall_s > 0 else 0.0,
    }
    if server_pid:
        others = busy_s - raw["client_cpu_s"] - server_cpu_s
        res["other_cores_busy"] = max(0.0, others / wall_s) if wall_s > 0 else 0.0
        res["server_pid"] = server_pid
        res["server_cpu_s"] = server_cpu_s
        res["server_cpu_us_per_request"] = server_cpu_s / max(raw["answered"], 1) * 1e6
    return res


def _dist(d: dict[str, Any]) -> dict[str, float | None]:
    return {k: d.get(k) for k in ("p50", "p90", "p99", "p99.9", "max", "mean")}
