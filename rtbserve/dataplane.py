"""The dataplane: readiness, model lookup and batched inference; it knows no transport.

Transports decode a payload into rows, ask the dataplane for the model, submit the rows to that
model's micro-batcher and encode what comes back. Errors are ``RtbError`` subclasses; each
transport maps their codes to its own statuses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtbserve.batching import MicroBatcher
from rtbserve.errors import ModelNotFound, ModelNotReady, Overloaded


@dataclass
class ServedModel:
    name: str
    model: Any  # rtbserve.Model
    batcher: MicroBatcher

    @property
    def n_features(self) -> int:
        return int(self.model.n_features)


class DataPlane:
    """Models served by this worker. Not thread-safe: owned by the worker's event loop."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._default: str | None = None
        self._ready = False
        self.draining = False

    def add(
        self,
        name: str,
        model: Any,
        *,
        default: bool = False,
        max_batch_rows: int = 256,
        max_batch_delay_us: int = 500,
        max_queue_rows: int = 65_536,
    ) -> ServedModel:
        """Serve ``model`` as ``name``; the first added (or ``default=True``) is the default."""

        def score(rows: np.ndarray) -> np.ndarray:
            return model.predict(rows)  # releases GIL; rows arrive as float32 C-order

        served = ServedModel(
            name,
            model,
            MicroBatcher(
                score,
                max_batch_rows=max_batch_rows,
                max_batch_delay_us=max_batch_delay_us,
                max_queue_rows=max_queue_rows,
            ),
        )
        self._models[name] = served
        if default or self._default is None:
            self._default = name
        return served

    def mark_ready(self) -> None:
        self._ready = True

    @property
    def is_ready(self) -> bool:
        return self._ready and not self.draining and bool(self._models)

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str | None = None) -> ServedModel:
        """The named model, or the default one; ``ModelNotFound`` lists what is loaded."""
        if not self._ready:
            raise ModelNotReady("models are still loading")
        key = self._default if name is None else name
        served = self._models.get(key) if key is not None else None
        if served is None:
            loaded = ", ".join(self.model_names) or "none"
            raise ModelNotFound(f"unknown model {name!r}; loaded: {loaded}")
        return served

    def check_capacity(self, served: ServedModel, n_rows: int = 1) -> None:
        """Shed before decoding: raise ``Overloaded`` when the model's queue is full."""
        if served.batcher.would_shed(n_rows):
            raise Overloaded(
                f"model {served.name!r} is overloaded: {served.batcher.queue_rows} rows queued"
            )

    def infer(
        self, served: ServedModel, rows: np.ndarray, deadline_ms: float | None = None
    ) -> asyncio.Future[Any]:
        """Submit decoded rows; ``deadline_ms`` is relative to now. Resolves to the scores."""
        deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3
        return served.batcher.submit(rows, deadline)
