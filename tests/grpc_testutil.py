"""Shared helpers for the gRPC tests: a server on its own uvloop loop, and test models.

``GrpcServerThread`` runs ``start_grpc_server`` on a fresh uvloop loop in a background thread
(127.0.0.1, port 0); ``start()`` returns once the server is bound and serving (an Event, never a
sleep). Anything that reaches the loop's exception handler is recorded in ``loop_errors`` for the
fixture to fail on. The DataPlane is built on the loop thread, which owns it from then on; tests
touch it only through ``call``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from rtbserve.config import ModelSettings
from rtbserve.dataplane import DataPlane
from rtbserve.transports.grpc import GrpcServer, start_grpc_server

WAIT_S = 10.0  # upper bound for any single wait; tests never sleep to synchronise
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "rtb-filter"
N_FEATURES = 67


@functools.cache
def demo_model(cache_dir: str) -> Any:
    """The demo model, loaded once per test process (the first caller's cache dir wins)."""
    from rtbserve import load_model

    return load_model(DEMO_MODEL_DIR, cache_dir=cache_dir)


def demo_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 rows of the demo model's features, with some NaN (missing) values."""
    rng = np.random.default_rng(seed)
    rows = rng.random((n, N_FEATURES), dtype=np.float32) * 4 - 1
    rows[rng.random(rows.shape) < 0.05] = np.nan
    return rows


class GatedModel:
    """The wrapped model, except that batches of more than ``min_rows`` rows (which the
    micro-batcher runs in its executor) wait for ``gate``; ``entered`` is set when one does.

    Keeps a model's kernel deterministically busy so later requests queue behind it.
    """

    def __init__(self, model: Any, min_rows: int = 512) -> None:
        self._model = model
        self.n_features = model.n_features
        self.n_outputs = model.n_outputs
        self.backend = model.backend
        self.min_rows = min_rows
        self.gate = threading.Event()
        self.entered = threading.Event()

    def predict(self, rows: np.ndarray, output: str = "probability") -> np.ndarray:
        if rows.shape[0] > self.min_rows:
            self.entered.set()
            if not self.gate.wait(WAIT_S):
                raise TimeoutError("the test never opened the gate")
        return self._model.predict(rows, output=output)


def settings(name: str, **kw: Any) -> ModelSettings:
    return ModelSettings(name=name, path=DEMO_MODEL_DIR, **kw)


class GrpcServerThread:
    """A gRPC server over a DataPlane of ``models`` ((settings, model) pairs; the first is the
    default) on its own uvloop loop in a background thread. ``metrics``: a
    ``rtbserve.metrics.WorkerMetrics`` for the DataPlane (and so the server), or None."""

    def __init__(
        self,
        models: list[tuple[ModelSettings, Any]],
        *,
        is_ready: bool = True,
        port: int = 0,
        metrics: Any = None,
        **server_kwargs: Any,
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._is_ready = is_ready
        self._port = port
        self._server_kwargs = server_kwargs
        self.loop = uvloop.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.dataplane: DataPlane | None = None
        self.server: GrpcServer | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._is_stopped = False
        self._thread = threading.Thread(target=self._run, name="grpc-test-server", daemon=True)

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    async def _start(self) -> None:
        dp = DataPlane(self._metrics)
        for model_settings, model in self._models:
            dp.add(model_settings, model)
        if self._is_ready:
            dp.mark_ready()
        self.dataplane = dp
        self.server = await start_grpc_server(dp, "127.0.0.1", self._port, **self._server_kwargs)

    def start(self) -> GrpcServerThread:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "server did not start"
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread and return its result (awaited if awaitable)."""

        async def run() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT_S)

    def stop(self, grace_s: float = 1.0) -> None:
        if self._is_stopped or self._startup_error is not None:
            return
        self._is_stopped = True
        assert self.server is not None
        self.call(lambda: self.server.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "server thread did not stop"


def let_pass(deadline: float) -> None:
    """Let the monotonic clock pass ``deadline`` (time must elapse; no thread is awaited)."""
    while time.monotonic() <= deadline:
        time.sleep(max(deadline - time.monotonic(), 0.0) + 1e-4)


def watch_submits(server: GrpcServerThread, model_name: str) -> queue.SimpleQueue[Any]:
    """A queue receiving the deadline of each request queued on the model's micro-batcher."""
    seen: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def install() -> None:
        assert server.dataplane is not None
        batcher = server.dataplane.get(model_name).batcher
        original = batcher._push  # both submit() and submit_callback() queue through it

        def push(rows: np.ndarray, deadline: float | None, *args: Any) -> None:
            original(rows, deadline, *args)
            seen.put(deadline)

        batcher._push = push  # type: ignore[method-assign]

    server.call(install)
    return seen
