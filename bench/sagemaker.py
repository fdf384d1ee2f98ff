"""SageMaker stack comparison: rtbserve against an equivalent of the SageMaker XGBoost container.

Usage::

    python -m bench.sagemaker [--quick] [--repeats N] [--nginx auto|on|off] [--open-rate R]
                              [--no-anchor] [--rebuild-venv] [--json PATH]

The peer (``bench/sagemaker_stack/``) does per request what the container's serving stack does:
nginx -> gunicorn with 2 gevent workers -> a Flask app that sniffs the CSV dialect with
``csv.Sniffer``, parses the rows, builds an ``xgboost.DMatrix``, calls ``Booster.predict`` and
logs a line at INFO. It runs from its own venv (``bench/.cache/venv-sagemaker-stack``), built
from ``bench/sagemaker_stack/requirements.txt`` on first use and rebuilt when that file
changes. Both servers start as processes (``rtbserve serve --no-grpc --workers 2`` on the demo
model); each is ready once it says so on stdout and ``/ping`` answers 200 on 8 fresh
connections (never a sleep). Then, in the same run:

    a. one demo CSV row per request: closed loop with ``h2load --h1`` at 8 and 64 connections
       (req/s, h2load's mean/max latency, server CPU us/request from /proc over each process
       tree), and open loop (Poisson, the Python generator ``bench.loadgen``) at a fixed
       moderate rate both sustain (``--open-rate``, default 500 req/s) for p50/p99.
    b. 64-row requests at 8 connections, and 6 MiB MultiRecord requests (as many demo rows as
       fit in 6 MiB: 31,677) at a few connections, a fixed number of requests each
       (``h2load -n``, sized to last a few seconds): rows/s and MB/s.

Then, with both stopped, the peer alone on ``m200`` (200 trees, depth 6, 40 features), the model
shared/PEERS.md measured the real stack with: one-row and 64-row req/s at 8 connections, and
one-row p50/p99 closed loop at 8 connections (Python generator), next to PEERS.md's figures.

Before measuring, the peer's scores are checked against rtbserve's (and XGBoost's in this
process) on the demo sample, within 1e-6; every 64-row and 6 MiB answer checked has one score
per row, equal to that reference. Each figure is the median [min-max] over ``--repeats``
(``--quick``: 1 repeat, 2 s runs); within a repeat the two servers alternate who goes first.
The load generators and both servers share the machine's 2 cores (and other engineers' jobs,
shown as "other processes"). Results go to ``bench/results/sagemaker.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.h2load import (
    INSTALL_HINT,
    H2loadError,
    h2load_path,
    h2load_version,
    http_run,
    parse_h2load_output,
    run_h2load,
)
from bench.loadgen.cpu import machine_busy_s, tree_cpu_s
from bench.loadgen.stats import fmt_ms, fmt_rate
from bench.loadgen.targets import REPO, Target, csv_row_to_floats

BENCH_DIR = Path(__file__).resolve().parent
STACK_DIR = BENCH_DIR / "sagemaker_stack"
REQUIREMENTS = STACK_DIR / "requirements.txt"
VENV_DIR = BENCH_DIR / ".cache" / "venv-sagemaker-stack"
LOG_DIR = BENCH_DIR / ".cache" / "sagemaker-stack"
DEFAULT_JSON = BENCH_DIR / "results" / "sagemaker.json"
DEMO_DIR = REPO / "models" / "rtb-filter"
DEMO_MODEL_FILE = DEMO_DIR / "model.json"
DEMO_SAMPLE = DEMO_DIR / "sample.csv"

MAX_PAYLOAD = 6 * 1024 * 1024  # SageMaker's real-time limit; both servers' body limit
SCORE_TOL = 1e-6
READY_TIMEOUT_S = 300.0  # rtbserve compiles the demo model first when its cache is cold
PING_CONNECTIONS = 8

# targets: rtbserve over the peer, judged on medians
TARGET_ONE_ROW = 20.0
TARGET_BIG = 5.0

# the real stack on this kind of machine (shared/PEERS.md): one-row text/csv at 8 connections
ANCHOR_ROW1_RPS = 2055.0
ANCHOR_ROW1_P50_MS = 3.9
ANCHOR_ROW1_P99_MS = 6.9
ANCHOR_ROW1_CPU_US = 930.0
ANCHOR_ROWS64_RPS = 936.0
ANCHOR_ROWS64_P50_MS = 8.4
ANCHOR_ROWS64_P99_MS = 13.7


@dataclass(frozen=True)
class Config:
    quick: bool
    repeats: int
    warmup_s: float
    duration_s: float
    open_rate: float
    big_target_s: float  # each 6 MiB measurement lasts about this long (a whole number of requests)
    big_connections: tuple[int, ...]
    nginx: bool
    workers: int = 2
    row_connections: tuple[int, ...] = (8, 64)
    rows64_connections: int = 8
    open_connections: int = 32
    h2load_threads: int = 1

    @classmethod
    def make(cls, args: argparse.Namespace, nginx: bool) -> Config:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            repeats=args.repeats if args.repeats else (1 if quick else 3),
            warmup_s=0.5 if quick else 1.0,
            duration_s=2.0 if quick else 4.0,
            open_rate=args.open_rate,
            big_target_s=2.0 if quick else 3.0,
            big_connections=(1, 2) if quick else (1, 2, 4),
            nginx=nginx,
        )


# --------------------------------------------------------------------------- payloads


def sample_lines() -> list[str]:
    return [ln for ln in DEMO_SAMPLE.read_text().splitlines() if ln.strip()]


def csv_body(lines: Sequence[str], rows: int) -> bytes:
    """``rows`` lines cycling through ``lines``, each newline-terminated."""
    return "".join(f"{lines[i % len(lines)]}\n" for i in range(rows)).encode()


def fill_body(lines: Sequence[str], limit: int = MAX_PAYLOAD) -> tuple[bytes, int]:
    """As many lines (cycling through ``lines``) as fit in ``limit`` bytes: (body, rows)."""
    out: list[str] = []
    size = 0
    i = 0
    while True:
        line = lines[i % len(lines)] + "\n"
        if size + len(line) > limit:
            break
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode(), i


# --------------------------------------------------------------------------- the peer's venv


def venv_key() -> str:
    """What the venv is built from: the requirements and this Python's version."""
    h = hashlib.sha256(REQUIREMENTS.read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def venv_python(venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / "python"


def ensure_venv(rebuild: bool = False, venv: Path = VENV_DIR) -> dict[str, Any]:
    """Create (or reuse) the peer's venv; returns {"python", "created", "seconds", "versions"}.

    Reused when its stamp matches ``venv_key()``; otherwise removed and built again with this
    interpreter's ``venv`` module and pip. Raises ``RuntimeError`` when pip fails.
    """
    stamp = venv / ".rtbserve-bench-stamp"
    key = venv_key()
    t0 = time.perf_counter()
    created = False
    if rebuild or not stamp.is_file() or stamp.read_text().strip() != key:
        print(f"  building the peer's venv in {venv.relative_to(REPO)} (pip, from the registry)...")
        sys.stdout.flush()
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
        out = subprocess.run(
            [*pip, "-q", "-r", str(REQUIREMENTS)], capture_output=True, text=True
        )  # fmt: skip
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"pip install -r {REQUIREMENTS} failed:\n{tail}")
        stamp.write_text(key + "\n")
        created = True
    probe = (
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "('flask', 'werkzeug', 'gunicorn', 'gevent', 'xgboost-cpu', 'numpy')}))"
    )
    out = subprocess.run(
        [str(venv_python(venv)), "-c", probe], capture_output=True, text=True, check=True
    )
    return {
        "python": str(venv_python(venv)),
        "created": created,
        "seconds": time.perf_counter() - t0,
        "versions": json.loads(out.stdout),
    }


# --------------------------------------------------------------------------- servers


def _ping(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/ping", headers={"connection": "close"})
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (``bench.ref_servers.ServerProcess``) measured as one process tree."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        from bench.ref_servers import ServerProcess

        self.name = name
        self.argv = argv
        self.proc = ServerProcess(argv, env=env)
        self.pid = self.proc.pid
        self.port = 0
        self.ready_s = 0.0

    def await_ready(self, ready_line: str, port: int | None, deadline: float) -> None:
        """Wait for the ``ready_line`` pattern on stdout, then for ``/ping`` == 200 on
        ``PING_CONNECTIONS`` fresh connections in a row (between tries, wait at most 0.05 s
        for another stdout line: no sleeping)."""
        t0 = time.perf_counter()
        if port is None:
            port = self.proc.wait_listening("http", READY_TIMEOUT_S)
        self.port = port
        self.proc.wait_for(ready_line, max(1.0, deadline - time.monotonic()))
        while not all(_ping(port) == 200 for _ in range(PING_CONNECTIONS)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: /ping not 200 by the deadline")
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.proc.output()}")
            with contextlib.suppress(RuntimeError):
                self.proc.wait_for(r"$^", 0.05)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> int:
        return self.proc.stop(30)


def rtbserve_argv(workers: int) -> list[str]:
    exe = Path(sys.executable).with_name("rtbserve")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "rtbserve.cli"]
    return [
        *base, "serve", "--host", "127.0.0.1", "--http-port", "0", "--no-grpc",
        "--workers", str(workers), str(DEMO_DIR),
    ]  # fmt: skip


def start_rtbserve(cfg: Config) -> Server:
    srv = Server("rtbserve", rtbserve_argv(cfg.workers))
    try:
        srv.await_ready(r"^ready", None, time.monotonic() + READY_TIMEOUT_S)
    except BaseException:
        srv.stop()
        raise
    return srv


def start_peer(
    cfg: Config, python: str, run_dir: str, log: Path, model: Path = DEMO_MODEL_FILE
) -> Server:
    port = free_port()
    argv = [
        python, str(STACK_DIR / "serve.py"), "--port", str(port),
        "--model", str(model), "--run-dir", run_dir, "--log", str(log),
        "--workers", str(cfg.workers),
    ]  # fmt: skip
    if not cfg.nginx:
        argv.append("--no-nginx")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    srv = Server("SageMaker-like stack", argv, env=env)
    try:
        srv.await_ready(r"^ready", port, time.monotonic() + 120)
    except BaseException:
        srv.stop()
        raise
    return srv


def nginx_version() -> str:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", 1) else None)
    if exe is None:
        return ""
    out = subprocess.run([exe, "-v"], capture_output=True, text=True)
    m = re.search(r"nginx/\S+", out.stderr + out.stdout)
    return m.group(0) if m else "nginx"


# --------------------------------------------------------------------------- answers


def post(port: int, body: bytes, timeout_s: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(
            "POST", "/invocations", body=body,
            headers={"content-type": "text/csv", "accept": "text/csv"},
        )  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def parse_scores(data: bytes) -> list[float]:
    """One float per line (a trailing newline allowed)."""
    return [float(x) for x in data.decode().splitlines() if x.strip()]


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"expected equal lengths, got {len(a)} and {len(b)}")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def xgboost_scores(lines: Sequence[str], model: Path = DEMO_MODEL_FILE) -> list[float]:
    """XGBoost in this process (rtbserve's venv), ``nthread=1``: the common reference."""
    import numpy as np
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(model))
    booster.set_param("nthread", 1)
    X = np.array([csv_row_to_floats(ln) for ln in lines], dtype=np.float32)
    dmatrix = xgb.DMatrix(X, missing=np.nan)
    return booster.predict(dmatrix, validate_features=False).astype(float).tolist()


def check_answer(port: int, body: bytes, reference: Sequence[float]) -> dict[str, Any]:
    """POST ``body``; its scores must cycle through ``reference`` (the sample's scores) within
    ``SCORE_TOL``, one per row. Returns what was seen; raises ``H2loadError`` otherwise."""
    t0 = time.perf_counter()
    status, data = post(port, body)
    seconds = time.perf_counter() - t0
    if status != 200:
        raise H2loadError(f"port {port}: expected 200, got {status}: {data[:200]!r}")
    scores = parse_scores(data)
    rows = body.count(b"\n")
    if len(scores) != rows:
        raise H2loadError(f"port {port}: {rows} rows sent, {len(scores)} scores back")
    expected = [reference[i % len(reference)] for i in range(rows)]
    diff = max_abs_diff(scores, expected)
    if diff > SCORE_TOL:
        raise H2loadError(f"port {port}: scores differ from the reference by up to {diff:.3g}")
    return {"status": status, "rows": rows, "max_abs_diff": diff, "seconds": seconds}


def score_check(rtb_port: int, peer_port: int, lines: Sequence[str]) -> dict[str, Any]:
    """Both servers' scores on every sample row, against each other and in-process XGBoost."""
    body = csv_body(lines, len(lines))
    got = {}
    for name, port in (("rtbserve", rtb_port), ("peer", peer_port)):
        status, data = post(port, body)
        if status != 200:
            raise RuntimeError(f"{name}: the sample got {status}: {data[:200]!r}")
        got[name] = parse_scores(data)
    ref = xgboost_scores(lines)
    out = {
        "rows": len(lines),
        "peer_vs_rtbserve": max_abs_diff(got["peer"], got["rtbserve"]),
        "peer_vs_xgboost": max_abs_diff(got["peer"], ref),
        "rtbserve_vs_xgboost": max_abs_diff(got["rtbserve"], ref),
        "tolerance": SCORE_TOL,
        "reference": got["rtbserve"],
    }
    out["ok"] = out["peer_vs_rtbserve"] <= SCORE_TOL
    return out


# --------------------------------------------------------------------------- measurements


def h2_count_run(
    url: str,
    body: bytes,
    *,
    connections: int,
    requests: int,
    server_pid: int,
    threads: int = 1,
    exe: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """``h2load --h1 -n requests -c connections`` POSTing ``body``: a fixed number of requests.

    For bodies whose requests take too long for a timed run to count enough of them. The rate
    is requests over h2load's own "finished in" time; server CPU (its process tree), h2load's
    CPU and the machine's busy time cover the h2load process.
    """
    exe = exe or h2load_path()
    if exe is None:
        raise H2loadError(f"h2load not found; install it with `{INSTALL_HINT}`")
    with tempfile.NamedTemporaryFile(prefix="rtbserve-h2load-", suffix=".body") as f:
        f.write(body)
        f.flush()
        argv = [
            exe, "--h1", "-n", str(requests), "-c", str(connections),
            "-t", str(min(threads, connections)), "-d", f.name,
            "-H", "content-type: text/csv", "-H", "accept: text/csv", url,
        ]  # fmt: skip
        server0 = tree_cpu_s(server_pid)
        busy0, wall0 = machine_busy_s(), time.perf_counter()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise H2loadError(f"h2load did not finish within {timeout_s:.0f} s") from exc
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_s, wall_s = machine_busy_s() - busy0, time.perf_counter() - wall0
        server_cpu_s = tree_cpu_s(server_pid) - server0
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise H2loadError(f"h2load exited with {out.returncode}:\n{text[-500:]}")
    try:
        res = parse_h2load_output(text)
    except ValueError as exc:
        raise H2loadError(str(exc)) from None
    done = res["requests"]["succeeded"]
    st = res["status"]
    errors = {
        "failed": res["requests"]["failed"],
        "errored": res["requests"]["errored"],
        "timeout": res["requests"]["timeout"],
        "non_2xx": st["3xx"] + st["4xx"] + st["5xx"],
    }
    client_cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    seconds = res["finished_s"]
    return {
        "client": "h2load",
        "argv": [a if a != f.name else "<body>" for a in argv],
        "connections": connections,
        "requests": done,
        "seconds": seconds,
        "requests_per_s": done / seconds if seconds else 0.0,
        "errors": errors,
        "errors_total": sum(errors.values()),
        "latency_ms": res["request_ms"],
        "server_cpu_s": server_cpu_s,
        "server_cpu_ms_per_request": server_cpu_s / max(done, 1) * 1e3,
        "client_cpu_s": client_cpu_s,
        "wall_s": wall_s,
        "other_cores_busy": max(0.0, (busy_s - client_cpu_s - server_cpu_s) / wall_s),
    }


def big_run(
    cfg: Config,
    srv: Server,
    body: bytes,
    rows: int,
    connections: int,
    reference: list[float] | None,
) -> dict[str, Any]:
    """6 MiB requests at ``connections``: a checked request (when ``reference`` is given), a
    warm-up round (one request per connection) that sizes the measured run to about
    ``cfg.big_target_s``, then the run."""
    check = check_answer(srv.port, body, reference) if reference is not None else None
    url = f"http://127.0.0.1:{srv.port}/invocations"
    warm = h2_count_run(
        url, body, connections=connections, requests=connections, server_pid=srv.pid
    )
    if not warm["requests"]:
        raise H2loadError(f"no request of the warm-up round succeeded: {warm['errors']}")
    n = requests_for(cfg.big_target_s, warm["requests_per_s"], connections)
    res = h2_count_run(url, body, connections=connections, requests=n, server_pid=srv.pid)
    mb = len(body) / 1e6
    res |= {
        "body_bytes": len(body),
        "rows_per_request": rows,
        "rows_per_s": res["requests_per_s"] * rows,
        "mb_per_s": res["requests_per_s"] * mb,
        "answer_check": check,
        "warmup": {k: warm[k] for k in ("requests", "seconds", "requests_per_s")},
    }
    return res


def requests_for(target_s: float, rate: float, connections: int) -> int:
    """Requests for a run of about ``target_s`` at ``rate`` req/s: at least two per connection,
    a whole number per connection, at most 5,000."""
    n = max(2 * connections, math.ceil(target_s * rate))
    n = min(n, 5000)
    return math.ceil(n / connections) * connections


def one_repeat(
    i: int,
    cfg: Config,
    servers: dict[str, Server],
    bodies: dict[str, Any],
    reference: list[float],
) -> dict[str, Any]:
    """Every figure once, for both servers; the first server alternates between repeats."""
    log: list[dict[str, Any]] = []
    out: dict[str, Any] = {"runs": log}
    order = ["rtbserve", "peer"] if i % 2 == 0 else ["peer", "rtbserve"]

    def measure(key: str, label: str, fn: Callable[[Server], dict[str, Any]], show: str) -> None:
        for who in order:
            res = logged_run(f"{label} {who}", lambda who=who: fn(servers[who]), show)
            log.append(res)
            out[f"{key}_{who}"] = res

    one_row = bodies["one_row"]
    for c in cfg.row_connections:

        def row_run(srv: Server, c: int = c) -> dict[str, Any]:
            return h2_timed(cfg, srv, one_row, c)

        measure(f"row1_c{c}", f"a  1 row, h2load {c} conns", row_run, "h2load")

    def open_run(srv: Server) -> dict[str, Any]:
        return python_run(
            cfg, srv, one_row, mode="rate", rate=cfg.open_rate, arrivals="poisson",
            connections=cfg.open_connections, timeout_s=2.0,
        )  # fmt: skip

    rate = fmt_rate(cfg.open_rate)
    measure("open", f"a  1 row, open loop {rate}/s", open_run, "open")

    rows64 = bodies["rows64"]

    def rows64_run(srv: Server) -> dict[str, Any]:
        check = check_answer(srv.port, rows64, reference)
        res = h2_timed(cfg, srv, rows64, cfg.rows64_connections)
        res["answer_check"] = check
        res["rows_per_s"] = res["achieved_rate"] * 64
        return res

    c64 = cfg.rows64_connections
    measure(f"rows64_c{c64}", f"b  64 rows, h2load {c64} conns", rows64_run, "h2load")

    for c in cfg.big_connections:

        def big_fn(srv: Server, c: int = c) -> dict[str, Any]:
            # one checked 6 MiB answer per server and repeat is enough (the peer's takes ~1.2 s)
            ref = reference if c == cfg.big_connections[0] else None
            return big_run(cfg, srv, bodies["big"], bodies["big_rows"], c, ref)

        measure(f"big_c{c}", f"b  6 MiB, h2load -n, {c} conns", big_fn, "big")
    return out


def float_csv(row: Any) -> str:
    """One float32 row as a CSV line: each cell's shortest float32 repr (which reads back as the
    same float32), NaN as an empty cell (a missing value)."""
    import numpy as np

    return ",".join("" if np.isnan(v) else str(v) for v in np.asarray(row, dtype=np.float32))


def anchor_phase(cfg: Config, python: str, run_dir: str, log: Path) -> dict[str, Any]:
    """The peer alone on ``m200`` (200 trees, depth 6, 40 features: the model shared/PEERS.md
    measured the real stack with), as measured there: one-row req/s and server CPU at 8
    connections (h2load), p50/p99 at 8 connections (closed loop, the Python generator), and
    64-row req/s at 8 connections (h2load)."""
    from bench.models import bench_rows, model_path

    model = model_path("m200")
    rows = bench_rows("m200", 64)
    lines = [float_csv(r) for r in rows]
    one_row = (lines[0] + "\n").encode()
    rows64 = csv_body(lines, 64)
    reference = xgboost_scores(lines, model)
    out: dict[str, Any] = {"model": str(model.relative_to(REPO)), "features": rows.shape[1]}
    print(f"  the peer alone on m200 ({rows.shape[1]} features), for shared/PEERS.md's figures")
    srv = start_peer(cfg, python, run_dir, log, model=model)
    try:
        out["answer_check"] = check_answer(srv.port, rows64, reference)
        c = cfg.row_connections[0]
        out["row1_h2load"] = logged_run(
            f"m200 1 row, h2load {c} conns peer", lambda: h2_timed(cfg, srv, one_row, c), "h2load"
        )
        out["row1_python"] = logged_run(
            f"m200 1 row, python {c} conns peer",
            lambda: python_run(cfg, srv, one_row, mode="max", connections=c, timeout_s=5.0),
            "open",
        )
        c64 = cfg.rows64_connections
        out["rows64_h2load"] = logged_run(
            f"m200 64 rows, h2load {c64} conns peer",
            lambda: h2_timed(cfg, srv, rows64, c64),
            "h2load",
        )
    finally:
        srv.stop()
    return out


def logged_run(name: str, fn: Callable[[], dict[str, Any]], show: str) -> dict[str, Any]:
    """Run ``fn`` and print one line; a failure becomes ``{"error": ...}`` (the run goes on)."""
    print(f"    {name:<42s}", end="", flush=True)
    try:
        res = fn()
    except Exception as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        res = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        print(describe(res, show), flush=True)
    res["label"] = name
    return res


def h2_timed(cfg: Config, srv: Server, body: bytes, connections: int) -> dict[str, Any]:
    """Closed loop, ``h2load --h1`` for ``cfg.duration_s`` after a ``cfg.warmup_s`` run."""
    target = Target("http", srv.port, body=body)
    run = http_run(
        target, connections=connections, threads=cfg.h2load_threads,
        duration_s=cfg.duration_s, warmup_s=cfg.warmup_s,
    )  # fmt: skip
    return run_h2load(run, server_pid=srv.pid)


def python_run(cfg: Config, srv: Server, body: bytes, **spec: Any) -> dict[str, Any]:
    """The Python load generator (``bench.loadgen``), one process; ``spec``: LoadSpec fields."""
    from bench.loadgen import LoadSpec, run_load

    load = LoadSpec(duration_s=cfg.duration_s, warmup_s=cfg.warmup_s, procs=1, **spec)
    res = run_load(Target("http", srv.port, body=body), load, server_pid=srv.pid)
    res.pop("latency_hdr", None)
    return res


def describe(res: dict[str, Any], kind: str) -> str:
    """One progress line for a run."""
    others = f"others {res.get('other_cores_busy', 0.0):.2f} cores"
    errors = f"errors {res.get('errors_total', 0)}"
    if kind == "h2load":
        lat = res["latency_ms"]
        return (
            f"{fmt_rate(res['achieved_rate']):>7} req/s  mean {fmt_ms(lat['mean'])} "
            f"max {fmt_ms(lat['max'])} ms  server {_us(res['server_cpu_us_per_request'])} us/req  "
            f"{errors}  {others}"
        )
    if kind == "open":
        lat = res["latency_ms"]
        return (
            f"{fmt_rate(res['achieved_rate']):>7} req/s  p50 {fmt_ms(lat['p50'])} "
            f"p99 {fmt_ms(lat['p99'])} ms  server {_us(res['server_cpu_us_per_request'])} us/req"
            f"  {errors}  {others}"
        )
    return (
        f"{res['requests']} x 6 MiB in {res['seconds']:.2f} s: "
        f"{fmt_rate(res['rows_per_s'])} rows/s, {res['mb_per_s']:.1f} MB/s  "
        f"server {res['server_cpu_ms_per_request']:.0f} ms/req  {errors}  {others}"
    )


# --------------------------------------------------------------------------- figures


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    vs = [v for v in values if v is not None]
    if not vs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def _get(r: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def metric_specs(cfg: Config) -> list[tuple[str, str, tuple[str, ...]]]:
    """(figure, run key, value path) for every per-server figure of a repeat."""
    specs = []
    for c in cfg.row_connections:
        specs += [
            (f"row1_c{c}_rps", f"row1_c{c}", ("achieved_rate",)),
            (f"row1_c{c}_mean_ms", f"row1_c{c}", ("latency_ms", "mean")),
            (f"row1_c{c}_max_ms", f"row1_c{c}", ("latency_ms", "max")),
            (f"row1_c{c}_cpu_us", f"row1_c{c}", ("server_cpu_us_per_request",)),
        ]
    specs += [
        ("open_rate", "open", ("achieved_rate",)),
        ("open_p50_ms", "open", ("latency_ms", "p50")),
        ("open_p99_ms", "open", ("latency_ms", "p99")),
        ("open_cpu_us", "open", ("server_cpu_us_per_request",)),
    ]
    c64 = cfg.rows64_connections
    specs += [
        (f"rows64_c{c64}_rps", f"rows64_c{c64}", ("achieved_rate",)),
        (f"rows64_c{c64}_rows_s", f"rows64_c{c64}", ("rows_per_s",)),
        (f"rows64_c{c64}_mean_ms", f"rows64_c{c64}", ("latency_ms", "mean")),
        (f"rows64_c{c64}_cpu_us", f"rows64_c{c64}", ("server_cpu_us_per_request",)),
    ]
    for c in cfg.big_connections:
        specs += [
            (f"big_c{c}_rows_s", f"big_c{c}", ("rows_per_s",)),
            (f"big_c{c}_mb_s", f"big_c{c}", ("mb_per_s",)),
            (f"big_c{c}_mean_ms", f"big_c{c}", ("latency_ms", "mean")),
            (f"big_c{c}_cpu_ms", f"big_c{c}", ("server_cpu_ms_per_request",)),
        ]
    return specs


RATIO_FIGURES = ("_rps", "_rows_s", "_mb_s")  # rtbserve / peer: higher is better for rtbserve
INVERSE_FIGURES = ("_ms", "_cpu_us", "_cpu_ms")  # peer / rtbserve


def figures(reps: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Median [min-max] over repeats of every figure and of its per-repeat ratio."""
    f: dict[str, Any] = {}
    for name, key, path in metric_specs(cfg):
        rtb = [_get(r, f"{key}_rtbserve", *path) for r in reps]
        peer = [_get(r, f"{key}_peer", *path) for r in reps]
        f[f"{name}_rtb"] = spread(rtb)
        f[f"{name}_peer"] = spread(peer)
        if name.endswith(RATIO_FIGURES):
            f[f"{name}_ratio"] = spread([_ratio(a, b) for a, b in zip(rtb, peer, strict=True)])
        elif name.endswith(INVERSE_FIGURES):
            f[f"{name}_ratio"] = spread([_ratio(b, a) for a, b in zip(rtb, peer, strict=True)])
    runs = [run for r in reps for run in r["runs"]]
    f["errors_total"] = sum(run.get("errors_total") or 0 for run in runs if "error" not in run)
    f["failed_runs"] = [run["label"] for run in runs if "error" in run]
    f["other_cores"] = spread([run.get("other_cores_busy") for run in runs if "error" not in run])
    return f


def gates(f: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    out = []

    def add(what: str, key: str, bar: float) -> None:
        v = f[key]["median"]
        status = "n/a" if v is None else ("PASS" if v >= bar else "FAIL")
        out.append(
            {"target": what, "key": key, "value": v, "bar": f">= {bar:g}x", "status": status}
        )

    for c in cfg.row_connections:
        add(f"1 row req/s at {c} conns, rtbserve / peer", f"row1_c{c}_rps_ratio", TARGET_ONE_ROW)
    for c in cfg.big_connections:
        add(f"6 MiB rows/s at {c} conns, rtbserve / peer", f"big_c{c}_rows_s_ratio", TARGET_BIG)
    return out


def anchors(f: dict[str, Any], cfg: Config, anchor: dict[str, Any]) -> list[dict[str, Any]]:
    """The peer's figures next to the real stack's (shared/PEERS.md: one run each, on m200)."""
    c = cfg.row_connections[0]
    c64 = cfg.rows64_connections

    def a(*keys: str) -> float | None:
        return _get(anchor, *keys)

    rows = [
        (f"m200: 1 row req/s, {c} conns (h2load)", a("row1_h2load", "achieved_rate"),
         ANCHOR_ROW1_RPS),
        (f"m200: 1 row req/s, {c} conns (python)", a("row1_python", "achieved_rate"),
         ANCHOR_ROW1_RPS),
        (f"m200: 1 row p50 ms, {c} conns (python)", a("row1_python", "latency_ms", "p50"),
         ANCHOR_ROW1_P50_MS),
        (f"m200: 1 row p99 ms, {c} conns (python)", a("row1_python", "latency_ms", "p99"),
         ANCHOR_ROW1_P99_MS),
        (f"m200: 1 row server CPU us/req, {c} conns", a("row1_h2load", "server_cpu_us_per_request"),
         ANCHOR_ROW1_CPU_US),
        (f"m200: 64 rows req/s, {c64} conns (h2load)", a("rows64_h2load", "achieved_rate"),
         ANCHOR_ROWS64_RPS),
        (f"demo: 1 row req/s, {c} conns (h2load)", f[f"row1_c{c}_rps_peer"]["median"],
         ANCHOR_ROW1_RPS),
        (f"demo: 1 row server CPU us/req, {c} conns", f[f"row1_c{c}_cpu_us_peer"]["median"],
         ANCHOR_ROW1_CPU_US),
        (f"demo: 64 rows req/s, {c64} conns (h2load)", f[f"rows64_c{c64}_rps_peer"]["median"],
         ANCHOR_ROWS64_RPS),
    ]  # fmt: skip
    return [
        {"figure": what, "peer": v, "real": real, "ratio": _ratio(v, real)}
        for what, v, real in rows
    ]


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _x(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def cell(s: dict[str, Any], fmt: Callable[[float], str]) -> str:
    """``median [min-max]`` (just the median for one repeat; ``-`` when nothing was measured)."""
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def table_rows(f: dict[str, Any], cfg: Config, gl: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """(figure, client, rtbserve, peer, ratio, target, status) rows of the printed table."""
    status = {g["key"]: (g["bar"], g["status"]) for g in gl}
    rows: list[tuple[str, ...]] = []

    def row(
        label: str, client: str, name: str, fmt: Callable[[float], str], note: str = ""
    ) -> None:
        ratio_key = f"{name}_ratio"
        bar, st = status.get(ratio_key, ("", ""))
        ratio = cell(f[ratio_key], _x) if ratio_key in f else ""
        rows.append(
            (
                label, client, cell(f[f"{name}_rtb"], fmt), cell(f[f"{name}_peer"], fmt),
                ratio + note, bar, st,
            )
        )  # fmt: skip

    for c in cfg.row_connections:
        row(f"a  1 row, closed loop {c} conns: req/s", "h2load", f"row1_c{c}_rps", fmt_rate)
        row("     mean latency ms", "", f"row1_c{c}_mean_ms", fmt_ms)
        row("     max latency ms", "", f"row1_c{c}_max_ms", fmt_ms)
        row("     server CPU us/request", "", f"row1_c{c}_cpu_us", _us)
    row(
        f"a  1 row, open loop {fmt_rate(cfg.open_rate)} req/s: p50 ms",
        "python",
        "open_p50_ms",
        fmt_ms,
    )
    row("     p99 ms", "", "open_p99_ms", fmt_ms)
    row("     server CPU us/request", "", "open_cpu_us", _us)
    c64 = cfg.rows64_connections
    row(f"b  64 rows, closed loop {c64} conns: req/s", "h2load", f"rows64_c{c64}_rps", fmt_rate)
    row("     rows/s", "", f"rows64_c{c64}_rows_s", fmt_rate)
    row("     server CPU us/request", "", f"rows64_c{c64}_cpu_us", _us)
    for c in cfg.big_connections:
        row(f"b  6 MiB, {c} conns: rows/s", "h2load -n", f"big_c{c}_rows_s", fmt_rate)
        row("     MB/s", "", f"big_c{c}_mb_s", _mb)
        row("     mean latency ms", "", f"big_c{c}_mean_ms", fmt_ms)
    return rows


def format_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return lines


def print_report(
    f: dict[str, Any],
    cfg: Config,
    gl: list[dict[str, Any]],
    al: list[dict[str, Any]],
    notes: list[str],
) -> None:
    print()
    head = ("figure", "client", "rtbserve", "peer", "ratio", "target", "")
    for ln in format_table(head, table_rows(f, cfg, gl)):
        print("  " + ln)
    print(
        "  ratio: rtbserve / peer for rates, peer / rtbserve for latencies and CPU (so > 1x "
        "favours rtbserve);\n  each cell is the median [min-max] over "
        f"{cfg.repeats} repeat(s); MB = 10^6 bytes of request body"
    )
    print()
    print(
        "  the peer against the real SageMaker XGBoost stack (shared/PEERS.md: single runs on "
        "m200;\n  demo is the bigger model measured above, for scale):"
    )
    arows = [
        (a["figure"], fmt_ms(a["peer"]) if "ms" in a["figure"] else fmt_rate(a["peer"]),
         f"{a['real']:g}", _x(a["ratio"]))
        for a in al
    ]  # fmt: skip
    for ln in format_table(("figure", "peer", "real stack", "peer / real"), arows):
        print("    " + ln)
    print(
        "  other processes (neither the measured server nor the load generator) kept "
        f"{cell(f['other_cores'], lambda x: f'{x:.2f}')} of the 2 cores busy during the runs; "
        "client and servers share the 2 cores"
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


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _log_counts(log: Path) -> dict[str, int]:
    """Per-request lines in the peer's log: the app's INFO line and nginx's access line."""
    app = access = 0
    with contextlib.suppress(OSError), log.open("rb") as fh:
        for line in fh:
            if b"Determined delimiter" in line:
                app += 1
            elif line.startswith(b"127.0.0.1 - ") and b'"POST /invocations' in line:
                access += 1
    return {"app_info_lines": app, "nginx_access_lines": access}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 s runs (~1-2 min)")
    ap.add_argument("--repeats", type=int, help="default 3 (1 with --quick)")
    ap.add_argument(
        "--nginx",
        choices=("auto", "on", "off"),
        default="auto",
        help="nginx in front of the peer's gunicorn: when installed (auto), required, or not",
    )
    ap.add_argument(
        "--open-rate",
        type=float,
        default=500.0,
        help="open-loop one-row rate, req/s (default 500: a third to a half of the peer's max)",
    )
    ap.add_argument(
        "--no-anchor",
        dest="anchor",
        action="store_false",
        help="skip the peer's runs on m200 (the model of shared/PEERS.md's figures)",
    )
    ap.add_argument("--rebuild-venv", action="store_true", help="rebuild the peer's venv")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)
    h2 = h2load_path()
    if h2 is None:
        ap.error(f"h2load not found; install it with `{INSTALL_HINT}`")
    nginx = nginx_version()
    if args.nginx == "on" and not nginx:
        ap.error("nginx not found; install it with `apt-get install nginx`")
    cfg = Config.make(args, nginx=bool(nginx) and args.nginx != "off")
    from bench.core import host_facts

    t_run = time.perf_counter()
    load_start = _loadavg()
    host = host_facts()
    print(
        f"SageMaker stack comparison ({'quick' if cfg.quick else 'full'}, {cfg.repeats} "
        f"repeat(s), {cfg.duration_s:g} s runs after {cfg.warmup_s:g} s warm-up): "
        "client and servers share the 2 cores"
    )
    print(
        f"  {host['cpu']}, {host['cores']} cores; load average at start {load_start}; "
        f"Python {host['python']}; {h2load_version(h2)}"
    )
    notes: list[str] = []
    venv = ensure_venv(args.rebuild_venv)
    made = "built" if venv["created"] else "reused"
    vers = ", ".join(f"{k} {v}" for k, v in venv["versions"].items())
    print(f"  peer venv {made} in {venv['seconds']:.1f} s: {vers}")
    front = f"{nginx} (2 workers) -> " if cfg.nginx else "no nginx: "
    print(
        f"  peer: {front}gunicorn {cfg.workers} gevent workers -> Flask (csv.Sniffer, DMatrix, "
        "Booster.predict, INFO line per request), OMP_NUM_THREADS=1"
    )
    if not cfg.nginx:
        why = (
            "--nginx off" if args.nginx == "off" else "nginx not installed (apt-get install nginx)"
        )
        notes.append(f"the peer ran without nginx in front ({why})")
    print(f"  rtbserve: serve --no-grpc --workers {cfg.workers} {DEMO_DIR.relative_to(REPO)}")

    lines = sample_lines()
    big, big_rows = fill_body(lines)
    bodies = {
        "one_row": (lines[0] + "\n").encode(),
        "rows64": csv_body(lines, 64),
        "big": big,
        "big_rows": big_rows,
    }
    print(
        f"  payloads: 1 row ({len(bodies['one_row'])} B), 64 rows ({len(bodies['rows64'])} B), "
        f"6 MiB MultiRecord: {big_rows} rows ({len(big)} B)"
    )
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    peer_log = LOG_DIR / "peer.log"
    peer_log.write_bytes(b"")
    run_dir = tempfile.mkdtemp(prefix="rtbserve-smstack-")
    sys.stdout.flush()

    reps: list[dict[str, Any]] = []
    started: list[Server] = []
    servers: dict[str, Server] = {}
    scores: dict[str, Any] = {}
    try:
        servers["rtbserve"] = start_rtbserve(cfg)
        started.append(servers["rtbserve"])
        servers["peer"] = start_peer(cfg, venv["python"], run_dir, peer_log)
        started.append(servers["peer"])
        print(
            "  servers ready: rtbserve on "
            f"{servers['rtbserve'].port} in {servers['rtbserve'].ready_s:.1f} s, peer on "
            f"{servers['peer'].port} in {servers['peer'].ready_s:.1f} s",
            flush=True,
        )
        scores = score_check(servers["rtbserve"].port, servers["peer"].port, lines)
        verdict = "OK" if scores["ok"] else "FAIL"
        print(
            f"  scores on the {scores['rows']} sample rows: max |peer - rtbserve| "
            f"{scores['peer_vs_rtbserve']:.2g} (<= {SCORE_TOL:g}: {verdict}); vs XGBoost "
            f"in process: peer {scores['peer_vs_xgboost']:.2g}, rtbserve "
            f"{scores['rtbserve_vs_xgboost']:.2g}",
            flush=True,
        )
        if not scores["ok"]:
            notes.append(
                f"the peer's scores differ from rtbserve's by {scores['peer_vs_rtbserve']:.3g}"
            )
        reference = scores["reference"]
        for i in range(cfg.repeats):
            print(f"  repeat {i + 1}/{cfg.repeats}", flush=True)
            reps.append(one_repeat(i, cfg, servers, bodies, reference))
    except Exception:
        traceback.print_exc()
        notes.append("the run stopped early (traceback above)")
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                s.stop()
    anchor: dict[str, Any] = {}
    try:
        if args.anchor and reps:
            anchor = anchor_phase(cfg, venv["python"], run_dir, peer_log)
    except Exception:
        traceback.print_exc()
        notes.append("the m200 anchor runs failed (traceback above)")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    f = figures(reps, cfg)
    for r in reps:
        for run in r["runs"]:
            if run.get("errors_total"):
                bad = ", ".join(f"{k} {v}" for k, v in run["errors"].items() if v)
                notes.append(f"{run['label'].strip()}: {bad} (of {run['requests']} answered)")
    if f["failed_runs"]:
        notes.append("failed runs: " + ", ".join(f["failed_runs"]))
    peer_max = f[f"row1_c{cfg.row_connections[0]}_rps_peer"]["min"]
    if peer_max is not None and peer_max < 1.5 * cfg.open_rate:
        notes.append(
            f"the open-loop rate ({cfg.open_rate:g} req/s) is near or above the peer's closed-loop "
            f"max ({peer_max:.0f} req/s): its p99 there is a queue; lower --open-rate"
        )
    counts = _log_counts(peer_log)
    notes.append(
        f"peer log ({peer_log.relative_to(REPO)}): {counts['app_info_lines']} app INFO lines, "
        f"{counts['nginx_access_lines']} nginx access lines for POST /invocations"
    )
    gl = gates(f, cfg)
    al = anchors(f, cfg, anchor)
    print_report(f, cfg, gl, al, notes)
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
        "peer": {
            "venv": venv,
            "nginx": nginx if cfg.nginx else None,
            "argv": servers["peer"].argv if "peer" in servers else None,
            "log_lines": counts,
        },
        "rtbserve": {"argv": servers["rtbserve"].argv if "rtbserve" in servers else None},
        "payloads": {
            "one_row_bytes": len(bodies["one_row"]),
            "rows64_bytes": len(bodies["rows64"]),
            "big_bytes": len(big),
            "big_rows": big_rows,
        },
        "score_check": {k: v for k, v in scores.items() if k != "reference"},
        "repeats": [
            {
                **{k: v for k, v in r.items() if k != "runs"},
                "order": [x["label"] for x in r["runs"]],
            }
            for r in reps
        ],
        "figures": f,
        "targets": gl,
        "anchor_runs": anchor,
        "anchors": al,
        "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
