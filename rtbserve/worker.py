"""One worker process: its models, its micro-batchers, and HTTP + gRPC + metrics listeners, all on
one uvloop event loop.

The supervisor (``rtbserve.supervisor``) starts N of these with the same settings; each binds the
same ports with SO_REUSEPORT, so the kernel spreads connections across workers. Order matters: a
worker loads its models (from the compile cache the supervisor filled) *before* it binds, so a
restarted worker never answers 503 while its siblings serve. Then it prints ``ready`` on stdout
(the supervisor's readiness signal). SIGTERM/SIGINT: readiness turns false (``/ping`` 503, gRPC
health NOT_SERVING), listeners close, in-flight requests finish within ``drain_timeout_s``, exit 0.

On a SageMaker multi-model endpoint (``settings.multi_model``) models come and go at runtime
through ``rtbserve.model_registry``, whose shared state lives in the run directory (the
``metrics_dir`` argument) beside the metrics files; the worker checks it every second.

``python -m rtbserve.worker prepare SETTINGS_JSON`` is the supervisor's compile step: load every
model once (compile, verify, autotune into the cache), print one summary line each, exit. It also
imports and checks each handler script (``rtbserve.handlers``), but never calls ``model_fn``:
each worker calls it once, before it is ready.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rtbserve.config import ServerSettings, parse_log_level, settings_from_json
from rtbserve.dataplane import DataPlane
from rtbserve.errors import RtbError
from rtbserve.metrics import CONTENT_TYPE, WorkerMetrics, render
from rtbserve.transports.http import HttpLimits, HttpServerState, shutdown, start_http_server
from rtbserve.transports.http.inference_app import InferenceApp

log = logging.getLogger("rtbserve.worker")


def load_models(settings: ServerSettings, *, with_model_fn: bool = False) -> list[tuple[Any, Any]]:
    """(ModelSettings, model) for every model in ``settings``: rtbserve's Model (compiled into
    the cache if needed), or what the handler script's ``model_fn`` returns. Handler scripts are
    imported and checked; a model loaded by ``model_fn`` is left out unless ``with_model_fn``
    (the workers: prepare and ``serve compile`` never run user model code)."""
    from rtbserve import load_model

    loaded = []
    for m in settings.models:
        if m.handler_script is not None:
            from rtbserve import handlers

            script = handlers.load_script(m.handler_script)
            if script.model_fn is not None:
                if with_model_fn:
                    loaded.append((m, handlers.call_model_fn(script, handlers.model_dir_of(m))))
                continue
        model = load_model(
            m.path, backend=m.backend, threshold=m.threshold, cache_dir=settings.cache_dir
        )
        loaded.append((m, model))
    return loaded


def _say(message: str) -> None:
    # stdout lines are the protocol between worker and supervisor: flush each one
    print(message, flush=True)


class _MetricsOnlyApp:
    """The ``--metrics-port`` listener: ``/metrics`` and nothing else."""

    def __init__(self, app: InferenceApp) -> None:
        self._app = app

    def handle(self, request: Any) -> Any:
        return self._app.metrics_response(request)


async def serve_worker(settings: ServerSettings, slot: int, metrics_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = WorkerMetrics(metrics_dir, slot)
    # each model's metrics file exists from the start
    dataplane = DataPlane(metrics, multi_model=settings.multi_model is not None)
    handled = []
    for model_settings, model in load_models(settings, with_model_fn=True):
        if model_settings.handler_script is None:
            dataplane.add(model_settings, model)
        else:
            from rtbserve.handlers import serve_model

            handled.append(serve_model(dataplane, model_settings, model))
    extra_routes = None
    if settings.execution_parameters is not None:
        from rtbserve.sagemaker import http_routes

        extra_routes = http_routes(settings.execution_parameters)
    registry = None
    if settings.multi_model is not None:
        from rtbserve.model_registry import ModelRegistry

        registry = ModelRegistry(
            metrics_dir, dataplane, settings.multi_model, cache_dir=settings.cache_dir
        )
    app = InferenceApp(
        dataplane,
        metrics,
        render_metrics=lambda: (render(metrics_dir), CONTENT_TYPE),
        extra_routes=extra_routes,
        models=registry,
    )
    limits = HttpLimits(
        max_body_bytes=settings.max_body_bytes,
        idle_timeout_s=settings.idle_timeout_s,
        request_timeout_s=settings.request_timeout_s,
    )
    http_state = HttpServerState()
    await start_http_server(
        app, settings.host, settings.http_port, limits=limits, state=http_state, reuse_port=True
    )
    metrics_state = None
    if settings.metrics_port is not None:
        metrics_state = HttpServerState()
        await start_http_server(
            _MetricsOnlyApp(app),
            settings.host,
            settings.metrics_port,
            limits=limits,
            state=metrics_state,
            reuse_port=True,
        )
    grpc_server = None
    if settings.grpc_port is not None:
        from rtbserve.transports.grpc import start_grpc_server

        grpc_server = await start_grpc_server(
            dataplane, settings.host, settings.grpc_port, metrics=metrics
        )
    dataplane.mark_ready()
    syncing = None
    if registry is not None:
        registry.sync()  # a restarted worker loads the endpoint's models again (background)
        syncing = asyncio.ensure_future(registry.run_periodic_sync())
    if grpc_server is not None:
        grpc_server.set_serving(True)
    _say(f"ready worker {slot} pid {os.getpid()}")
    await stop.wait()
    if syncing is not None:
        syncing.cancel()
    dataplane.draining = True
    if grpc_server is not None:
        grpc_server.set_serving(False)
    drains = [shutdown(http_state, settings.drain_timeout_s)]
    if grpc_server is not None:
        drains.append(grpc_server.stop(settings.drain_timeout_s))
    await asyncio.gather(*drains)
    if metrics_state is not None:
        await shutdown(metrics_state, 1.0)
    for h in handled:
        if h is not None:
            h.close()
    if registry is not None:
        registry.close()
    metrics.close()
    return 0


def _die_with_parent() -> None:
    # a worker must not outlive a supervisor killed with SIGKILL (Linux only; best effort)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = sys.argv[1:] if argv is None else argv
    try:
        level = parse_log_level(os.environ.get("RTBSERVE_LOG_LEVEL", "WARNING"))
    except RtbError as exc:
        print(f"rtbserve: RTBSERVE_LOG_LEVEL: {exc}; using WARNING", file=sys.stderr)
        level = logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    _die_with_parent()
    try:
        if args[0] == "prepare":
            settings = settings_from_json(args[1])
            loaded = load_models(settings)
            for model_settings, model in loaded:
                _say(
                    f"model {model_settings.name!r}: {model.backend}, "
                    f"{model.n_features} features, {model.verification.summary()}"
                )
            compiled = {m.name for m, _ in loaded}
            for m in settings.models:
                if m.name not in compiled:
                    _say(
                        f"model {m.name!r}: loaded by model_fn ({m.handler_script}) in each worker"
                    )
            return 0
        if args[0] == "serve":
            settings = settings_from_json(args[1])
            return int(uvloop.run(serve_worker(settings, int(args[2]), Path(args[3]))))
    except RtbError as exc:
        print(f"rtbserve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"usage: python -m rtbserve.worker prepare|serve ... (got {args!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
