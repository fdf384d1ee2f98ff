"""One serving process: load the model, serve HTTP on uvloop, drain on SIGTERM.

Start-up order: the socket opens first (``/ping`` answers 503 while the model loads, compiles and
is verified), then the model is added to the dataplane and ``/ping`` turns 200. SIGTERM or SIGINT:
``/ping`` turns 503, the listener closes, in-flight requests finish (bounded by
``drain_timeout_s``), and the process exits 0. Worker processes, gRPC and metrics arrive with the
rest of issue 3.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from rtbserve.dataplane import DataPlane
from rtbserve.transports.http import HttpLimits, HttpServerState, shutdown, start_http_server
from rtbserve.transports.http.inference_app import InferenceApp

log = logging.getLogger("rtbserve.server")


@dataclass(frozen=True)
class ServerSettings:
    model_path: Path
    host: str = "0.0.0.0"
    http_port: int = 8080
    backend: str = "auto"
    cache_dir: str | None = None
    drain_timeout_s: float = 20.0
    max_batch_rows: int = 256
    max_batch_delay_us: int = 500


async def serve(settings: ServerSettings) -> int:
    from rtbserve import load_model

    loop = asyncio.get_running_loop()
    dataplane = DataPlane()
    state = HttpServerState()
    server = await start_http_server(
        InferenceApp(dataplane), settings.host, settings.http_port, state=state,
        limits=HttpLimits(),
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    _say(f"listening on http://{settings.host}:{port}")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    model = await loop.run_in_executor(
        None,
        lambda: load_model(
            settings.model_path, backend=settings.backend, cache_dir=settings.cache_dir
        ),
    )
    name = model.path.parent.name if model.path.parent.name else model.path.stem
    dataplane.add(
        name,
        model,
        max_batch_rows=settings.max_batch_rows,
        max_batch_delay_us=settings.max_batch_delay_us,
    )
    dataplane.mark_ready()
    _say(f"ready: model {name!r} ({model.backend}, {model.verification.summary()})")
    await stop.wait()
    _say("draining")
    dataplane.draining = True
    await shutdown(state, settings.drain_timeout_s)
    _say("stopped")
    return 0


def _say(message: str) -> None:
    # stdout lines are the readiness protocol for supervisors and tests: flush each one
    print(message, flush=True)


def run(settings: ServerSettings) -> int:
    import uvloop

    return int(uvloop.run(serve(settings)))
