"""Autotune: time each verified backend on this model and host, per batch-size bucket.

Buckets are named by the batch they are timed at (1, 8, 64, 1024 rows) and cover the row counts
nearest to them: [1, 3], [4, 31], [32, 511], [512, inf). The fastest backend per bucket (median of
repeated single-thread calls) serves that bucket; the choice is persisted with the cached
artifacts, keyed by the set of candidates, so later loads skip the timing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

BUCKET_ROWS = (1, 8, 64, 1024)
BUCKET_UPPER = (4, 32, 512)  # a batch of n rows uses the first bucket whose upper bound exceeds n
_BUDGET_S = 0.05  # timing budget per (backend, bucket)


def bucket_index(n_rows: int) -> int:
    for i, upper in enumerate(BUCKET_UPPER):
        if n_rows < upper:
            return i
    return len(BUCKET_UPPER)


def time_backends(predictors: dict[str, Any], X: np.ndarray) -> dict[str, dict[str, float]]:
    """Median seconds per call, {bucket_rows: {backend: s}}, on rows drawn from X."""
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    for rows in BUCKET_ROWS:
        # distinct batches, cycled: one batch repeated would train the branch predictor and
        # flatter if/else code (TL2cgen) far beyond what real traffic sees
        n_batches = max(2, min(64, 4096 // rows))
        batches = [
            np.ascontiguousarray(X[rng.integers(0, X.shape[0], size=rows)])
            for _ in range(n_batches)
        ]
        results[str(rows)] = {}
        for name, p in predictors.items():
            out = np.empty(rows * p.n_outputs, dtype=p.out_dtype)
            p.predict_into(batches[0], out, 0, rows, False)  # warm
            samples = []
            deadline = time.perf_counter() + _BUDGET_S
            while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 2000):
                batch = batches[len(samples) % n_batches]
                t0 = time.perf_counter()
                p.predict_into(batch, out, 0, rows, False)
                samples.append(time.perf_counter() - t0)
            results[str(rows)][name] = float(np.median(samples))
    return results


def choose(timings: dict[str, dict[str, float]]) -> list[str]:
    """The fastest backend per bucket, in BUCKET_ROWS order."""
    return [min(timings[str(r)], key=timings[str(r)].__getitem__) for r in BUCKET_ROWS]
