"""The reference libraries as backends: XGBoost, LightGBM, or Treelite's GTIL for checkpoints.

They are the specification the compiled backends are verified against, and the fallback when no
compiled backend can serve a model. XGBoost's ``inplace_predict`` is thread-safe; rows are split
across threads by the caller, each call uses one thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtbserve.predictors.source import ModelSource


class ReferencePredictor:
    """Scores rows with the library that trained the model. Thread-safe."""

    def __init__(self, source: ModelSource) -> None:
        self.name = source.reference_name
        self.source = source
        self.n_features = source.n_features
        self.n_outputs = source.output.n_outputs
        self.out_dtype = np.dtype(np.float64 if source.reference_name == "lightgbm" else np.float32)
        _ = source.reference  # load now, so errors surface at load time

    def predict_into(
        self, X: np.ndarray, out: np.ndarray, begin: int, end: int, margin: bool
    ) -> None:
        if end <= begin:
            return
        scores = self.source.reference_predict(X[begin:end], margin=margin)
        k = self.n_outputs
        out[begin * k : end * k] = scores.reshape(-1)

    def bind(self, margin: bool) -> Any:
        """``run(X, begin, end, out)`` with the output kind pre-bound."""
        return lambda X, begin, end, out: self.predict_into(X, out, begin, end, margin)

    def warm_up(self) -> None:
        x = np.zeros((1, self.n_features), dtype=np.float32)
        self.predict_into(x, np.empty(self.n_outputs, self.out_dtype), 0, 1, False)
