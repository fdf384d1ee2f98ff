"""The supervisor: compile once, start N worker processes on shared ports, restart the ones that
die, and shut everything down cleanly.

Timeline of ``rtbserve serve``::

    reserve ports ── HTTP, gRPC and metrics ports are bound (SO_REUSEPORT, not listening) so
                     port 0 resolves once and every worker binds the same port; with
                     ``port_range`` gRPC/metrics take the range's first free ports, and with
                     ``skip_unavailable_ports`` a taken one disables that listener (a warning)
    starting ─────── a stand-in HTTP listener answers every request 503 ("starting"), so /ping
                     says "not ready" instead of refusing connections
    prepare ──────── one child process loads every model: compile, verify, autotune into the
                     cache (the workers then load in ~0.5 s from it); a failure stops here, exit 2
    workers ──────── N workers start; each loads its models, binds, prints "ready"
    ready ────────── the stand-in closes; "ready: ..." is printed (the readiness line)
    serving ──────── a worker that exits is restarted (backoff 0.1 s doubling to 5 s while it
                     keeps dying young); its metrics slot continues where it stopped
    SIGTERM/SIGINT ─ "draining": every worker gets SIGTERM and drains (bounded by
                     drain_timeout_s); stragglers get SIGKILL after a grace; "stopped", exit 0

The run directory (``metrics_dir``, private, removed at exit) is shared by every worker: their
metrics files, and on a SageMaker multi-model endpoint the models registry
(``rtbserve.model_registry``), so a restarted worker loads the endpoint's models again.

The supervisor never imports numba or the models: it stays small and responsive. As PID 1 (a
container's first process) ``run_as_init_if_pid1`` puts a minimal init in front of it that
forwards signals and reaps orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rtbserve.config import ServerSettings, settings_to_json
from rtbserve.errors import ConfigError
from rtbserve.transports.http import HttpResponse, HttpServerState, shutdown, start_http_server

log = logging.getLogger("rtbserve.supervisor")
_RESTART_MIN_S = 0.1
_RESTART_MAX_S = 5.0
_YOUNG_S = 10.0  # a worker that dies younger than this backs off further
_KILL_GRACE_S = 5.0


def _say(message: str) -> None:
    # stdout lines are the readiness protocol for process managers and tests
    print(message, flush=True)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT; workers then bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def is_port_free(host: str, port: int) -> bool:
    """Whether nobody else listens on ``host:port``. A plain bind (no SO_REUSEPORT) fails on a
    port another process serves even with SO_REUSEPORT, which ``reserve_port`` would share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class _StartingApp:
    """Answers 503 while the models compile: the stand-in before workers listen."""

    _RESPONSE = HttpResponse(
        503,
        b'{"code":503,"type":"model_not_ready","message":"starting: models are loading",'
        b'"error":"starting: models are loading"}',
        "application/json",
    )

    def handle(self, request: object) -> HttpResponse:
        return self._RESPONSE


class _Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.backoff_s = _RESTART_MIN_S
        self.ready = asyncio.Event()


class Supervisor:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="rtbserve-metrics-"))
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.stopping = False
        self._stop = asyncio.Event()
        self._settings_json = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        s = self.settings
        reserved = [reserve_port(s.host, s.http_port)]
        http_port = reserved[0].getsockname()[1]
        grpc_port = metrics_port = None
        taken = {http_port}
        if s.grpc_port is not None:
            sock = self._reserve_side_port("gRPC", s.grpc_port, taken)
            if sock is not None:
                reserved.append(sock)
                grpc_port = sock.getsockname()[1]
                taken.add(grpc_port)
        if s.metrics_port is not None:
            sock = self._reserve_side_port("metrics", s.metrics_port, taken)
            if sock is not None:
                reserved.append(sock)
                metrics_port = sock.getsockname()[1]
        resolved = replace(s, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
        self._settings_json = settings_to_json(resolved)
        starting = HttpServerState()
        await start_http_server(_StartingApp(), s.host, http_port, state=starting, reuse_port=True)
        _say(f"listening on http://{s.host}:{http_port}")
        if grpc_port is not None:
            _say(f"listening on grpc://{s.host}:{grpc_port}")
        if metrics_port is not None:
            _say(f"listening on http://{s.host}:{metrics_port}/metrics")
        try:
            code = await self._serve(starting)
        finally:
            for sock in reserved:
                sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return code

    def _reserve_side_port(self, what: str, port: int, taken: set[int]) -> socket.socket | None:
        """Reserve the gRPC or metrics port: ``port``, or with ``port_range`` and port 0 the
        range's first free port outside ``taken``. None (with a warning) when it is unavailable
        and ``skip_unavailable_ports``; ConfigError otherwise."""
        s = self.settings
        if port == 0 and s.port_range is not None:
            lo, hi = s.port_range
            for candidate in range(lo, hi + 1):
                if candidate not in taken and is_port_free(s.host, candidate):
                    with contextlib.suppress(OSError):
                        return reserve_port(s.host, candidate)
            problem = f"no free port in {lo}-{hi} besides {', '.join(map(str, sorted(taken)))}"
        elif port in taken:
            problem = f"port {port} is already this server's"
        elif s.skip_unavailable_ports and not is_port_free(s.host, port):
            problem = f"port {port} is in use"
        else:
            try:
                return reserve_port(s.host, port)
            except OSError as exc:
                problem = f"port {port}: {exc.strerror or exc}"
        if not s.skip_unavailable_ports:
            raise ConfigError(f"cannot serve {what}: {problem}")
        log.warning("serving without %s: %s", what, problem)
        return None

    async def _serve(self, starting: HttpServerState) -> int:
        prepare = asyncio.ensure_future(self._prepare())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([prepare, stop], return_when=asyncio.FIRST_COMPLETED)
        if not prepare.done():
            prepare.cancel()
            await shutdown(starting, 1.0)
            _say("stopped")
            return 0
        if not prepare.result():
            await shutdown(starting, 1.0)
            return 2
        monitors = [asyncio.ensure_future(self._keep_running(w)) for w in self.workers]
        all_ready = asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in self.workers)))
        first_exit = asyncio.ensure_future(
            asyncio.wait(monitors, return_when=asyncio.FIRST_COMPLETED)
        )
        try:
            await asyncio.wait([all_ready, stop, first_exit], return_when=asyncio.FIRST_COMPLETED)
            await shutdown(starting, 1.0)
            if first_exit.done() and not all_ready.done():
                # a worker failed before every worker was ready: a start-up error, not a crash
                self.stopping = True
                await self._stop_workers()
                await asyncio.gather(*monitors, return_exceptions=True)
                _say("stopped: a worker failed to start")
                return 2
            if all_ready.done():
                _say(f"ready: {len(self.workers)} workers")
            await stop
            _say("draining")
            self.stopping = True
            await self._stop_workers()
            await asyncio.gather(*monitors, return_exceptions=True)
            _say("stopped")
            return 0
        finally:
            # the helper futures are retrieved here, whichever way we leave
            for helper in (all_ready, first_exit, stop):
                helper.cancel()
            await asyncio.gather(all_ready, first_exit, stop, return_exceptions=True)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def _prepare(self) -> bool:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rtbserve.worker",
            "prepare",
            self._settings_json,
            stdout=asyncio.subprocess.PIPE,
            env=self._child_env(),
        )
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                _say(line.decode().rstrip())
            code = await proc.wait()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if code != 0:
            _say(f"stopped: preparing the models failed (exit {code}); see the error above")
        return code == 0

    async def _keep_running(self, worker: _Worker) -> None:
        """Run one worker slot; restart it while the server is not stopping. Returns only when a
        worker exits before the server was ever ready, or on shutdown."""
        while True:
            worker.started_at = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rtbserve.worker",
                "serve",
                self._settings_json,
                str(worker.slot),
                str(self.metrics_dir),
                stdout=asyncio.subprocess.PIPE,
                env=self._child_env(),
            )
            worker.process = proc
            assert proc.stdout is not None
            async for line in proc.stdout:
                text = line.decode().rstrip()
                if text.startswith("ready"):
                    if worker.ready.is_set():  # a restart: say so, the first start is quiet
                        _say(f"worker {worker.slot} ready again (pid {proc.pid})")
                    worker.ready.set()
                else:
                    _say(text)
            code = await proc.wait()
            if self.stopping:
                return
            if not all(w.ready.is_set() for w in self.workers) and not worker.ready.is_set():
                _say(f"worker {worker.slot} exited with {_describe(code)} during start-up")
                return
            lived_s = time.monotonic() - worker.started_at
            if lived_s > _YOUNG_S:
                worker.backoff_s = _RESTART_MIN_S
            _say(
                f"worker {worker.slot} (pid {proc.pid}) exited with {_describe(code)}; "
                f"restarting in {worker.backoff_s:.1f} s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), worker.backoff_s)
            if self.stopping or self._stop.is_set():
                return
            worker.backoff_s = min(worker.backoff_s * 2, _RESTART_MAX_S)

    async def _stop_workers(self) -> None:
        procs = [
            w.process
            for w in self.workers
            if w.process is not None and w.process.returncode is None
        ]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not procs:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        _, pending = await asyncio.wait(
            waits, timeout=self.settings.drain_timeout_s + _KILL_GRACE_S
        )
        for proc in procs:
            if proc.returncode is None:
                log.warning("worker pid %d did not drain in time: killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


_FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def run_as_init_if_pid1(main: Callable[[], int]) -> int:
    """``main()``'s exit code; as PID 1 (a container's first process), ``main`` runs in a child
    and this process is a minimal init: it forwards signals to the child and reaps every process.

    Why: PID 1 inherits every orphan (a gcc or model-parsing child left behind by a worker that
    was killed), and uvloop reaps only the children it started, so orphans would stay zombies;
    and the kernel drops signals PID 1 has no handler for. Call it before any import that starts
    threads (numpy's BLAS does): the child is forked.
    """
    if os.getpid() != 1:
        return main()
    child = 0
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if child == 0:
            pending.append(signum)  # arrived between fork() and knowing the child's pid
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in _FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    child = os.fork()
    if child == 0:
        for sig in _FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        code = 1
        try:
            code = main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    for signum in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)
    while True:
        pid, status = os.wait()  # every child, orphans included; retried after a signal
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell


def run(settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    import uvloop

    async def main() -> int:
        return await Supervisor(settings).run()

    return int(uvloop.run(main()))
