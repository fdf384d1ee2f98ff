"""``rtbserve serve`` as a real process for tests: started on free ports, awaited by its readiness
line (never a sleep), its stdout collected by a thread so it can be searched and never blocks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "rtb-filter"


class ServerProcess:
    """One ``rtbserve serve`` run. ``http_url``, ``grpc_target`` and ``metrics_url`` are set from
    its ``listening on`` lines; ``start()`` returns once it printed ``ready:``."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *extra: str,
        workers: int = 2,
        grpc: bool = True,
        metrics_port: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        args = command or [sys.executable, "-m", "rtbserve.cli", "serve"]
        if command is None:
            if model is not None:
                args.append(str(model))
            args += ["--host", "127.0.0.1", "--http-port", "0", "--workers", str(workers)]
            args += ["--grpc-port", "0"] if grpc else ["--no-grpc"]
            if metrics_port:
                args += ["--metrics-port", "0"]
            if cache_dir is not None:
                args += ["--cache-dir", str(cache_dir)]
            args += list(extra)
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.stderr = ""
        self.http_url = ""
        self.grpc_target = ""
        self.metrics_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def launch(self) -> ServerProcess:
        """Start the process without waiting for readiness."""
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=ROOT,
        )
        out = threading.Thread(target=self._read_stdout, daemon=True)
        err = threading.Thread(target=self._read_stderr, daemon=True)
        self._readers = [out, err]
        out.start()
        err.start()
        return self

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        self.launch()
        try:
            line = self.wait_for(lambda s: s.startswith(("ready:", "stopped")), timeout_s)
        except TimeoutError:
            line = "timed out"
        if not line.startswith("ready:"):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"server did not start: {self.lines}\n{self.stderr}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- output --------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = 60.0) -> str:
        """The first stdout line (old or new) satisfying ``predicate``; waits for it."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self._eof):
                    raise TimeoutError(f"no matching line; output so far: {self.lines}")
                self._changed.wait(left)

    _eof = False

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self._changed:
                self.lines.append(line)
                self._parse(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def _parse(self, line: str) -> None:
        m = re.match(r"listening on (\w+)://([\w.:\[\]]+?)(/metrics)?$", line)
        if not m:
            return
        scheme, where, metrics = m.groups()
        if scheme == "grpc":
            self.grpc_target = where
        elif metrics:
            self.metrics_url = f"http://{where}/metrics"
        else:
            self.http_url = f"http://{where}"

    # -- processes -----------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """PIDs of the supervisor's worker processes (``rtbserve.worker serve``)."""
        assert self.proc is not None
        pids = []
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            children = Path(f"/proc/{self.proc.pid}/task/{tid}/children").read_text().split()
            for pid in map(int, children):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except FileNotFoundError:
                    continue
                if b"rtbserve.worker" in cmd and b"serve" in cmd:
                    pids.append(pid)
        return sorted(pids)
