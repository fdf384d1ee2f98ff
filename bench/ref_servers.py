"""Reference servers: the ceiling of our own stack, and the helper that runs servers for benches.

Usage::

    python -m bench.ref_servers http --port P [--procs N] [--delay-ms D]
    python -m bench.ref_servers grpc --port P [--procs N]

- ``http``: uvloop + httptools, HTTP/1.1 keep-alive; every request gets the same small
  ``text/csv`` body (``0.5\\n``). ``--delay-ms`` holds each answer that long (a deliberately slow
  server, for the load generator's own tests).
- ``grpc``: grpc.aio on uvloop implementing ``rtbserve.v1.Predictor``: ``Predict`` and
  ``PredictStream`` answer a fixed ``PredictResponse`` echoing ``request_id``.

Trivial on purpose: no model and no parsing beyond what the protocol stack does (httptools for
HTTP, protobuf for gRPC), so rtbserve's throughput over theirs is the share of the transport's
limit that rtbserve keeps. ``N`` processes share the port with SO_REUSEPORT: the first binds
(port 0 picks a free one), the others bind the same port. Once all listen, the first prints
``listening on http://127.0.0.1:P`` (or ``grpc://``) and flushes; SIGTERM or SIGINT stops all of
them, exit 0.

``ServerProcess`` starts any such command (or ``rtbserve serve``) as a subprocess and waits for a
line on its stdout, never sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

HTTP_BODY = b"0.5\n"
HTTP_REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\ncontent-length: %d\r\n\r\n%s" % (
    len(HTTP_BODY),
    HTTP_BODY,
)
HTTP_REPLY_CLOSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s" % (len(HTTP_BODY), HTTP_BODY)
)
HTTP_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


# --------------------------------------------------------------------------- HTTP


class FixedReplyProtocol(asyncio.Protocol):
    """Answers every complete request with ``HTTP_REPLY`` (after ``delay_s``, if set)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        import httptools

        self._parser = httptools.HttpRequestParser(self)
        self._errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
        self._delay_s = delay_s
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except self._errors:
            if self._transport is not None:
                self._transport.write(HTTP_BAD_REQUEST)
                self._transport.close()

    def on_message_complete(self) -> None:
        keep_alive = self._parser.should_keep_alive()
        if self._delay_s:
            asyncio.get_running_loop().call_later(self._delay_s, self._reply, keep_alive)
        else:
            self._reply(keep_alive)

    def _reply(self, keep_alive: bool) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        if keep_alive:
            t.write(HTTP_REPLY)  # syscall
        else:
            t.write(HTTP_REPLY_CLOSE)
            t.close()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket with SO_REUSEPORT (port 0 picks a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def _start_http(sock: socket.socket, delay_s: float) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FixedReplyProtocol(delay_s), sock=sock, backlog=4096)


# --------------------------------------------------------------------------- gRPC


def grpc_handler() -> Any:
    """A generic handler for ``rtbserve.v1.Predictor`` answering a fixed ``PredictResponse``."""
    import grpc

    from bench.loadgen.targets import predictor_pb2

    pb2 = predictor_pb2()
    response = pb2.PredictResponse

    async def predict(request: Any, context: Any) -> Any:
        return response(request_id=request.request_id, scores=[0.5], n_outputs=1, model="ref")

    async def predict_stream(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield response(request_id=request.request_id, scores=[0.5], n_outputs=1, model="ref")

    return grpc.method_handlers_generic_handler(
        "rtbserve.v1.Predictor",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=pb2.PredictRequest.FromString,
                response_serializer=response.SerializeToString,
            ),
            "PredictStream": grpc.stream_stream_rpc_method_handler(
                predict_stream,
                request_deserializer=pb2.PredictRequest.FromString,
                response_serializer=response.SerializeToString,
            ),
        },
    )


async def _start_grpc(host: str, port: int) -> tuple[Any, int]:
    import grpc.aio

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((grpc_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server, bound


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _child(kind: str, host: str, port: int, delay_s: float, conn: Connection) -> None:
    stop = _stop_event()
    if kind == "http":
        http_server = await _start_http(reuseport_socket(host, port), delay_s)
        conn.send("ready")
        await stop.wait()
        http_server.close()
    else:
        server, _ = await _start_grpc(host, port)
        conn.send("ready")
        await stop.wait()
        await server.stop(0.5)


def _child_main(kind: str, host: str, port: int, delay_s: float, conn: Connection) -> None:
    import uvloop

    _die_with_parent()
    try:
        uvloop.run(_child(kind, host, port, delay_s, conn))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(f"error: {type(exc).__name__}: {exc}")
        raise


async def _main(kind: str, host: str, port: int, procs: int, delay_s: float) -> int:
    stop = _stop_event()
    if kind == "http":
        sock = reuseport_socket(host, port)
        sock.listen(4096)
        port = sock.getsockname()[1]
        grpc_server = None
    else:
        grpc_server, port = await _start_grpc(host, port)
    ctx = multiprocessing.get_context("spawn")
    children = []
    for _ in range(procs - 1):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_child_main, args=(kind, host, port, delay_s, child_end))
        p.start()
        child_end.close()
        children.append((p, parent_end))
    try:
        for p, conn in children:
            if not conn.poll(30):
                raise RuntimeError(f"server process {p.pid} did not start within 30 s")
            msg = conn.recv()
            if msg != "ready":
                raise RuntimeError(f"server process {p.pid}: {msg}")
        http_server = await _start_http(sock, delay_s) if kind == "http" else None
        print(f"listening on {kind}://{host}:{port} ({procs} processes)", flush=True)
        await stop.wait()
        if http_server is not None:
            http_server.close()
        if grpc_server is not None:
            await grpc_server.stop(0.5)
    finally:
        for p, _ in children:
            if p.is_alive():
                p.terminate()  # SIGTERM: the child stops its server and exits 0
        for p, _ in children:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ref_servers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("kind", choices=("http", "grpc"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--procs", type=int, default=1, help="processes sharing the port")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="http: hold each answer (ms)")
    args = ap.parse_args(argv)
    if args.procs < 1:
        ap.error("--procs must be >= 1")
    if args.delay_ms and args.kind != "http":
        ap.error("--delay-ms is for the http server only")
    import uvloop

    return int(uvloop.run(_main(args.kind, args.host, args.port, args.procs, args.delay_ms / 1e3)))


# --------------------------------------------------------------------------- running servers


class ServerProcess:
    """A server subprocess whose stdout lines are the readiness protocol.

    ``wait_for(pattern, timeout_s)`` blocks until a stdout line matches (a reader thread feeds a
    queue: no sleeping, no polling) and returns the match; it raises ``RuntimeError`` with the
    output so far if the process exits or the time runs out. ``stop()`` sends SIGTERM and waits
    (SIGKILL after ``timeout_s``); it returns the exit code. Also a context manager.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.port: int | None = None  # the first port ``wait_listening`` saw
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"stdout-{self.pid}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(self._explain(f"no line matching {pattern!r} in {timeout_s} s"))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise RuntimeError(
                    self._explain(f"exited ({self.proc.returncode}) before {pattern!r}")
                )
            self.lines.append(line)
            m = rx.search(line)
            if m:
                return m

    def wait_listening(self, scheme: str, timeout_s: float = 60.0) -> int:
        """The port of the first ``listening on {scheme}://host:port`` line."""
        m = self.wait_for(rf"listening on {scheme}://[^:/\s]+:(\d+)", timeout_s)
        port = int(m.group(1))
        if self.port is None:
            self.port = port
        return port

    def _explain(self, what: str) -> str:
        tail = "\n".join(self.lines[-20:])
        return f"{' '.join(self.argv)}: {what}; output so far:\n{tail}"

    def output(self) -> str:
        """Every line read so far, including any not yet consumed by ``wait_for``."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ref_server(
    kind: str, *, procs: int = 1, delay_ms: float = 0.0, timeout_s: float = 30.0
) -> tuple[ServerProcess, int]:
    """Start ``python -m bench.ref_servers KIND`` on a free port; returns (process, port) once
    it listens."""
    argv = [sys.executable, "-m", "bench.ref_servers", kind, "--port", "0", "--procs", str(procs)]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    server = ServerProcess(argv, env=env)
    try:
        port = server.wait_listening(kind, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server, port


if __name__ == "__main__":
    sys.exit(main())
