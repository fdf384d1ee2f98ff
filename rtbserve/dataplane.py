"""The dataplane: readiness, model lookup, metadata and batched inference; it knows no transport.

Transports decode a payload into rows, ask the dataplane for the model, ``await predict(...)``
and encode what comes back. Errors are ``RtbError`` subclasses; each transport maps their codes
to its own statuses. Fail-open lives here, so every transport answers a missed deadline (and,
when configured, a full queue) with the same default decision and the same flag.

A model with a handler script (``rtbserve.handlers``) is added with ``add_handled`` too: its
``HandledModel`` answers ``/invocations`` (``invocations_handler``). When the script replaces
the model or the prediction, that is the model's only route; ``get`` says so.

Models may come and go at runtime (SageMaker multi-model endpoints, ``rtbserve.model_registry``):
``add`` and ``remove`` run on the loop, between requests. A request keeps the ``ServedModel`` it
looked up, so one in flight when its model is removed still finishes; the model's memory goes
when the last such request is answered.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from rtbserve.batching import MicroBatcher
from rtbserve.config import ModelSettings
from rtbserve.errors import DeadlineExceeded, ModelNotFound, ModelNotReady, Overloaded, RtbError

_F32 = np.dtype(np.float32)


class ServedModel:
    """One model as this worker serves it: settings, the loaded model and its micro-batcher."""

    __slots__ = (
        "name",
        "settings",
        "model",
        "batcher",
        "n_features",
        "n_outputs",
        "fail_open",
        "metrics",
        "out_datatype",
    )

    def __init__(
        self, settings: ModelSettings, model: Any, batcher: MicroBatcher, metrics: Any = None
    ) -> None:
        self.name = settings.name
        self.metrics = metrics  # rtbserve.metrics.ModelMetrics, or None
        self.settings = settings
        self.model = model
        self.batcher = batcher
        self.n_features = int(model.n_features)
        self.n_outputs = int(model.n_outputs)
        self.fail_open = settings.fail_open
        # the Open Inference Protocol datatype of the output, whatever answers (model or default)
        self.out_datatype = "INT32" if settings.output == "label" else "FP32"

    def fail_open_scores(self, n_rows: int) -> np.ndarray:
        """The configured default decision for ``n_rows`` rows (shape as ``predict`` returns)."""
        assert self.fail_open is not None
        shape = (n_rows, self.n_outputs) if self.n_outputs > 1 else (n_rows,)
        return np.full(shape, self.fail_open.score, dtype=_F32)

    def metadata(self) -> dict[str, Any]:
        """Open Inference Protocol model metadata: one FP32 input [-1, F], one output."""
        out_shape = [-1, self.n_outputs] if self.n_outputs > 1 else [-1]
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": f"rtbserve-{self.model.backend}",
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, self.n_features]}],
            "outputs": [{"name": "output-0", "datatype": self.out_datatype, "shape": out_shape}],
        }


class DataPlane:
    """Models served by this worker. Not thread-safe: owned by the worker's event loop.

    multi_model: models are added and removed at runtime (a SageMaker multi-model endpoint):
    there is no default model (every request names one) and the worker is ready with none.
    """

    def __init__(self, metrics: Any = None, *, multi_model: bool = False) -> None:
        self.metrics = metrics  # rtbserve.metrics.WorkerMetrics, or None (tests, tools)
        self.multi_model = multi_model
        self._models: dict[str, ServedModel] = {}
        self._default: ServedModel | None = None
        # name -> rtbserve.handlers.HandledModel; the one /invocations runs, if any
        self._handled: dict[str, Any] = {}
        self.invocations_handler: Any = None
        self._ready = False
        self.draining = False

    def add(self, settings: ModelSettings, model: Any, *, executor: Any = None) -> ServedModel:
        """Serve ``model`` under ``settings.name``; the first added (or the one marked default)
        answers requests that name no model."""
        output = settings.output
        predict = model.predict

        if output == "probability":
            score = predict  # releases GIL; rows arrive as float32 C-order
        else:

            def score(rows: np.ndarray) -> np.ndarray:
                return predict(rows, output=output)  # releases GIL

        b = settings.batching
        metrics = None if self.metrics is None else self.metrics.model(settings.name)
        served = ServedModel(
            settings,
            model,
            MicroBatcher(
                score,
                max_batch_rows=b.max_batch_rows,
                max_batch_delay_us=b.max_batch_delay_us,
                max_queue_rows=b.max_queue_rows,
                executor=executor,
                metrics=metrics,
            ),
            metrics,
        )
        self._models[settings.name] = served
        if self.multi_model:
            return served  # every request names its model
        if settings.is_default or (self._default is None and self.invocations_handler is None):
            self._default = served
        return served

    def remove(self, name: str) -> ServedModel:
        """Stop serving ``name``; return its ``ServedModel``. Requests already holding it
        finish (their batcher keeps flushing); later lookups raise ``ModelNotFound``."""
        served = self._models.pop(name, None)
        if served is None:
            loaded = ", ".join(self.model_names) or "none"
            raise ModelNotFound(f"unknown model {name!r}; loaded: {loaded}")
        if self._default is served:
            self._default = None
        return served

    def add_handled(self, settings: ModelSettings, handled: Any) -> None:
        """Answer ``/invocations`` for ``settings.name`` with ``handled`` (a
        ``rtbserve.handlers.HandledModel``) when the model is the default one (marked, or the
        first added); add its ``ServedModel`` first when it also serves natively."""
        self._handled[settings.name] = handled
        if settings.is_default or (self._default is None and self.invocations_handler is None):
            self.invocations_handler = handled
            if handled.served is None:
                self._default = None  # /invocations only: no other route serves it by default
        elif self._default is not None and self._default.name == settings.name:
            self.invocations_handler = handled

    def mark_ready(self) -> None:
        self._ready = True

    @property
    def is_ready(self) -> bool:
        return (
            self._ready
            and not self.draining
            and (self.multi_model or bool(self._models or self._handled))
        )

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    @property
    def served_models(self) -> list[ServedModel]:
        """Every model added, ready or not (start-up checks), in name order."""
        return [self._models[name] for name in sorted(self._models)]

    @property
    def default_name(self) -> str | None:
        return None if self._default is None else self._default.name

    def get(self, name: str | None = None) -> ServedModel:
        """The named model, or the default one (``None`` or ``""``); ``ModelNotFound`` lists
        what is loaded."""
        if not self._ready:
            raise ModelNotReady("models are still loading")
        served = self._default if not name else self._models.get(name)
        if served is None:
            loaded = ", ".join(self.model_names) or "none"
            handled = self._handled.get(name or "") or (None if name else self.invocations_handler)
            if handled is not None:
                raise ModelNotFound(
                    f"model {handled.name!r} is served by its handler script "
                    f"({handled.script.label}) on POST /invocations only; other routes serve: "
                    f"{loaded}"
                )
            if not name and self.multi_model:
                raise ModelNotFound(
                    f"a multi-model endpoint has no default model: name one; loaded: {loaded}"
                )
            raise ModelNotFound(f"unknown model {name!r}; loaded: {loaded}")
        return served

    def check_ready(self) -> None:
        """Raise ``ModelNotReady`` until the worker marked its models ready."""
        if not self._ready:
            raise ModelNotReady("models are still loading")

    def is_model_ready(self, name: str) -> bool:
        return self.is_ready and name in self._models

    def check_capacity(self, served: ServedModel, n_rows: int = 1) -> None:
        """Shed before decoding: raise ``Overloaded`` when the model's queue is full (unless the
        model fails open on overload: then ``predict`` answers the default decision)."""
        if served.batcher.would_shed(n_rows) and not (
            served.fail_open is not None and served.fail_open.on_overload
        ):
            raise Overloaded(
                f"model {served.name!r} is overloaded: {served.batcher.queue_rows} rows queued "
                f"(limit {served.batcher.max_queue_rows}); retry later"
            )

    def fail_open(self, served: ServedModel, n_rows: int, exc: RtbError) -> np.ndarray:
        """The default decision for ``exc`` when ``served`` fails open for it; else re-raise it."""
        fo = served.fail_open
        if fo is not None and (
            isinstance(exc, DeadlineExceeded) or (fo.on_overload and isinstance(exc, Overloaded))
        ):
            return served.fail_open_scores(n_rows)
        raise exc

    async def predict(
        self, served: ServedModel, rows: np.ndarray, deadline_ms: float | None = None
    ) -> tuple[np.ndarray, bool]:
        """Score decoded rows (float32, (n, F)) through the model's micro-batcher.

        deadline_ms: time budget from now, or None. Returns ``(scores, failed_open)``; with
        fail-open configured, a missed deadline (or a full queue, if ``on_overload``) returns the
        default decision and ``True`` instead of raising.
        """
        deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3
        try:
            return await served.batcher.submit(rows, deadline), False
        except DeadlineExceeded:
            if served.fail_open is None:
                raise
        except Overloaded:
            if served.fail_open is None or not served.fail_open.on_overload:
                raise
        return served.fail_open_scores(rows.shape[0]), True
