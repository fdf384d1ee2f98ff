"""The compiled core: one module per backend, all scoring rows into a caller's output array.

Every predictor has ``name``, ``n_features``, ``n_outputs``, ``out_dtype`` and
``predict_into(X, out, begin, end, margin)``: score rows [begin, end) of a float32 C-order
matrix into ``out`` (n, K), releasing the GIL where the backend can.
"""

from __future__ import annotations

COMPILED_BACKENDS = ("numba", "tl2cgen")
REFERENCE_BACKENDS = ("xgboost", "lightgbm", "gtil")
BACKEND_NAMES = ("auto", *COMPILED_BACKENDS, *REFERENCE_BACKENDS)
