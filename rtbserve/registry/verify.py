"""The verification gate: a backend may serve a model only if it scores like the reference library.

The probe set is built from the model itself: random rows, then for every distinct split
threshold a row with that feature exactly on the threshold and on both float32 neighbours (where
an off-by-one-ulp comparison would show), then rows of NaN (missing), +-inf, +-0, subnormals and
float32 extremes. Scores (the model's output and the raw margin) must agree within 1e-5 absolute,
or relative where the reference value exceeds 1 in magnitude.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from rtbserve.errors import VerificationFailed
from rtbserve.predictors.source import ModelSource

TOLERANCE = 1e-5
MAX_PROBE_ROWS = 120_000
SMALL_PROBE_ROWS = 64


class RowPredictor(Protocol):
    name: str
    n_outputs: int
    out_dtype: Any

    def predict_into(
        self, X: np.ndarray, out: np.ndarray, begin: int, end: int, margin: bool
    ) -> None: ...


@dataclass
class VerificationReport:
    backend: str
    reference: str
    rows_checked: int
    max_abs_error: float  # on the model's output (probability / value)
    max_abs_error_margin: float
    max_scaled_error: float  # the gated quantity: |a - b| / max(1, |b|), worst of both outputs
    tolerance: float
    decision_flips: int  # rows whose label differs from the reference's at the threshold
    threshold: float | None
    passed: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    kind: str = "full"  # "full" at compile time, "quick" on load from the cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        status = "passed" if self.passed else "FAILED"
        return (
            f"{self.backend} vs {self.reference}: {status} on {self.rows_checked} rows "
            f"({self.kind}); max abs error {self.max_abs_error:.3g} (output), "
            f"{self.max_abs_error_margin:.3g} (margin); decision flips {self.decision_flips}"
        )


def split_thresholds(source: ModelSource) -> tuple[np.ndarray, np.ndarray]:
    """(feature, threshold) of every distinct numerical split in the model."""
    tl = source.treelite
    feats, thrs = [], []
    for t in range(tl.num_tree):
        acc = tl.get_tree_accessor(t)
        internal = (acc.get_field("cleft") >= 0) & (acc.get_field("node_type") == 1)
        feats.append(acc.get_field("split_index")[internal])
        thrs.append(acc.get_field("threshold")[internal].astype(np.float64))
    if not feats:
        return np.zeros(0, np.int64), np.zeros(0)
    pairs = np.unique(np.rec.fromarrays([np.concatenate(feats), np.concatenate(thrs)], names="f,t"))
    return pairs["f"].astype(np.int64), pairs["t"]


def build_probe(
    source: ModelSource, *, seed: int = 0, max_rows: int = MAX_PROBE_ROWS
) -> np.ndarray:
    """The probe set (float32, C order); see the module docstring."""
    rng = np.random.default_rng(seed)
    n_features = source.n_features
    feats, thrs = split_thresholds(source)
    # random rows drawn around each feature's thresholds, 10% missing
    center = np.zeros(n_features)
    spread = np.ones(n_features)
    if feats.size:
        for f in np.unique(feats):
            ts = thrs[feats == f]
            ts = ts[np.isfinite(ts)]
            if ts.size:
                center[f] = np.median(ts)
                spread[f] = max(float(ts.max() - ts.min()), 1e-3)
    n_random = 512
    base = (center + spread * rng.normal(size=(n_random, n_features))).astype(np.float32)
    base[rng.random(base.shape) < 0.1] = np.nan
    blocks = [base]
    if feats.size:
        t32 = thrs.astype(np.float32)
        cands = np.concatenate(
            [
                t32,
                np.nextafter(t32, np.float32(-np.inf)),
                np.nextafter(t32, np.float32(np.inf)),
            ]
        )
        cand_f = np.concatenate([feats, feats, feats])
        budget = max(max_rows - n_random - 64, 0)
        if cand_f.size > budget:
            keep = rng.choice(cand_f.size, size=budget, replace=False)
            cand_f, cands = cand_f[keep], cands[keep]
        rows = base[rng.integers(0, n_random, size=cand_f.size)].copy()
        rows[np.arange(cand_f.size), cand_f] = cands
        blocks.append(rows)
    specials = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1e-38],
        dtype=np.float32,
    )
    blocks.append(np.repeat(specials[:, None], n_features, axis=1))
    mixed = base[:54].copy()
    mask = rng.random(mixed.shape) < 0.3
    mixed[mask] = rng.choice(specials, size=int(mask.sum()))
    blocks.append(mixed)
    return np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)


def scaled_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(want) & (got == want)
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    err[both_nan | same_inf] = 0.0
    return np.where(np.isnan(err), np.inf, err)


def _labels(scores: np.ndarray, threshold: float | None) -> np.ndarray | None:
    if scores.ndim == 2 and scores.shape[1] > 1:
        return np.argmax(scores, axis=1)
    if threshold is None:
        return None
    return (scores.reshape(-1) >= threshold).astype(np.int8)


def run_predictor(predictor: RowPredictor, X: np.ndarray, margin: bool) -> np.ndarray:
    out = np.empty(X.shape[0] * predictor.n_outputs, dtype=predictor.out_dtype)
    predictor.predict_into(X, out, 0, X.shape[0], margin)
    return out.reshape(X.shape[0], -1) if predictor.n_outputs > 1 else out


def compare(
    predictor: RowPredictor,
    X: np.ndarray,
    want_output: np.ndarray,
    want_margin: np.ndarray,
    *,
    reference: str,
    threshold: float | None,
    kind: str,
    timings_ms: dict[str, float] | None = None,
) -> VerificationReport:
    """Score X with ``predictor`` and compare with the reference's output and margin."""
    t0 = time.perf_counter()
    got_output = run_predictor(predictor, X, margin=False)
    got_margin = run_predictor(predictor, X, margin=True)
    timings = dict(timings_ms or {})
    timings["backend_predict"] = (time.perf_counter() - t0) * 1e3
    err_out = scaled_error(got_output, want_output)
    err_margin = scaled_error(got_margin, want_margin)
    got_labels = _labels(np.asarray(got_output), threshold)
    want_labels = _labels(np.asarray(want_output), threshold)
    flips = 0 if got_labels is None else int(np.count_nonzero(got_labels != want_labels))
    worst = float(max(err_out.max(initial=0.0), err_margin.max(initial=0.0)))
    with np.errstate(invalid="ignore"):
        abs_out = np.nan_to_num(np.abs(np.asarray(got_output, np.float64) - want_output), nan=0.0)
        abs_margin = np.nan_to_num(
            np.abs(np.asarray(got_margin, np.float64) - want_margin), nan=0.0
        )
    return VerificationReport(
        backend=predictor.name,
        reference=reference,
        rows_checked=int(X.shape[0]),
        max_abs_error=float(abs_out.max(initial=0.0)),
        max_abs_error_margin=float(abs_margin.max(initial=0.0)),
        max_scaled_error=worst,
        tolerance=TOLERANCE,
        decision_flips=flips,
        threshold=threshold,
        passed=worst <= TOLERANCE,
        timings_ms=timings,
        kind=kind,
    )


def require_passed(report: VerificationReport) -> VerificationReport:
    if not report.passed:
        raise VerificationFailed(
            f"backend {report.backend!r} refused: its scores differ from {report.reference} by "
            f"up to {report.max_scaled_error:.3g} (tolerance {report.tolerance:g}) on "
            f"{report.rows_checked} probe rows"
        )
    return report
