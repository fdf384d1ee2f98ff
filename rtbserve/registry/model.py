"""The public model API: ``load_model(path) -> Model`` and ``Model.predict``.

``load_model`` resolves the backend(s) (autotuned per batch-size bucket for ``auto``), each
verified against the reference library before it may serve. ``Model.predict`` is the hot path:
one type check, one bucket lookup, one kernel call; rows are split across threads only for large
batches.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from rtbserve.errors import (
    ArtifactError,
    CompileError,
    InvalidInput,
    RtbError,
    UnsupportedModel,
    VerificationFailed,
)
from rtbserve.predictors import BACKEND_NAMES
from rtbserve.registry import autotune
from rtbserve.registry.artifacts import ArtifactStore, BuiltBackend, ModelMeta
from rtbserve.registry.verify import VerificationReport

log = logging.getLogger("rtbserve.registry")

OUTPUTS = ("probability", "margin", "label")
AUTOTUNE_POLICIES = ("fast", "full")
PARALLEL_MIN_ROWS = 4096  # below this, thread hand-off costs more than it saves
_F32 = np.dtype(np.float32)
_SINGLE_ROWS = autotune.BUCKET_UPPER[0]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Pool:
    """One process-wide thread pool for splitting large batches; rebuilt after fork."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=max(cpu_count(), 2), thread_name_prefix="rtb-predict"
                    )
        return self._pool


_POOL = _Pool()


class Model:
    """A loaded, verified model. ``predict`` is thread-safe."""

    def __init__(
        self,
        meta: ModelMeta,
        path: Path,
        backends: dict[str, BuiltBackend],
        bucket_backends: list[str],
        threshold: float,
        autotune_timings: dict[str, dict[str, float]] | None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.n_features = meta.n_features
        self.n_outputs = meta.output.n_outputs
        self.feature_names = meta.feature_names
        self.objective = meta.output.objective
        self.threshold = threshold
        self.bucket_backends = dict(
            zip(map(str, autotune.BUCKET_ROWS), bucket_backends, strict=True)
        )
        self.autotune_timings = autotune_timings
        self._backends = backends
        self._by_bucket = [backends[name].predictor for name in bucket_backends]
        # per bucket: run(X, begin, end, out) for probabilities [0] and margins [1]
        self._runs = [(p.bind(False), p.bind(True)) for p in self._by_bucket]
        self._single = self._runs[0][0]
        self._out_dtype = [p.out_dtype for p in self._by_bucket]
        self._single_dtype = self._out_dtype[0]
        self._is_multiclass = meta.output.is_multiclass
        self._can_label = meta.output.is_classifier

    # -- facts ----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend serving; ``a+b`` when buckets differ (see ``bucket_backends``)."""
        names = list(dict.fromkeys(self.bucket_backends.values()))
        return "+".join(names)

    @property
    def verification(self) -> VerificationReport:
        """The compile-time verification report of the backend serving single rows."""
        return self._backends[self.bucket_backends["1"]].report

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """Every loaded backend's reports and timings, for ``rtbserve compile``."""
        out = {}
        for name, b in self._backends.items():
            out[name] = {
                "report": b.report.to_dict(),
                "quick_check": b.quick_report.to_dict() if b.quick_report else None,
                "from_cache": b.from_cache,
                "timings_ms": b.timings_ms,
            }
        return out

    def __repr__(self) -> str:
        return (
            f"Model({str(self.path)!r}, backend={self.backend!r}, n_features={self.n_features}, "
            f"n_outputs={self.n_outputs}, objective={self.objective!r})"
        )

    # -- scoring --------------------------------------------------------------------------

    def predict(
        self,
        X: Any,
        *,
        output: str = "probability",
        nthread: int | None = None,
    ) -> np.ndarray:
        """Score rows.

        X: (n, n_features) array-like of numbers (float32 C-order avoids a copy; others are
        converted as XGBoost does); a 1-D array of n_features values is one row.
        output: "probability" (the model's transformed output; the value for regressors),
        "margin" (raw sum of trees plus base score) or "label" (threshold for binary
        classifiers, argmax for multi-class).
        nthread: threads for large batches; None uses every core, 1 stays on the caller's.
        Returns float32 (float64 for LightGBM) of shape (n,), or (n, K) for K classes; labels
        are int32 of shape (n,).
        """
        if type(X) is np.ndarray and X.dtype is _F32 and X.ndim == 2 and X.flags.c_contiguous:
            n, n_cols = X.shape
            if (
                n < _SINGLE_ROWS
                and n
                and output == "probability"
                and n_cols == self.n_features
                and nthread is None
            ):
                # the one-row hot path: one check above, one allocation, one kernel call
                out = np.empty(n * self.n_outputs, dtype=self._single_dtype)  # allocates
                self._single(X, 0, n, out)  # releases GIL
                return out.reshape(n, self.n_outputs) if self._is_multiclass else out
        else:
            X = self._coerce(X)  # noqa: N806
            n, n_cols = X.shape
        if n_cols != self.n_features or n == 0:
            self._bad_shape(X)
        if nthread is not None:
            nthread = _positive_int(nthread)
        if output == "probability":
            margin = 0
        elif output == "margin":
            margin = 1
        elif output == "label":
            return self._labels(X, nthread)
        else:
            raise InvalidInput(f"unknown output {output!r}; expected one of {', '.join(OUTPUTS)}")
        b = autotune.bucket_index(n)
        out = np.empty(n * self.n_outputs, dtype=self._out_dtype[b])  # allocates
        self._run(self._runs[b][margin], X, out, n, nthread)
        return out.reshape(n, self.n_outputs) if self._is_multiclass else out

    def _run(self, run: Any, X: np.ndarray, out: np.ndarray, n: int, nthread: int | None) -> None:  # noqa: N803
        if n < PARALLEL_MIN_ROWS or nthread == 1:  # the serving case: no syscall, no threads
            run(X, 0, n, out)
            return
        threads = cpu_count() if nthread is None else nthread
        threads = min(threads, max(1, n // (PARALLEL_MIN_ROWS // 2)))
        if threads <= 1:
            run(X, 0, n, out)
            return
        bounds = np.linspace(0, n, threads + 1).astype(int)
        pool = _POOL.get()
        futures = [
            pool.submit(run, X, int(bounds[i]), int(bounds[i + 1]), out) for i in range(1, threads)
        ]
        run(X, 0, int(bounds[1]), out)
        for f in futures:
            f.result()

    def _labels(self, X: np.ndarray, nthread: int | None) -> np.ndarray:
        if not self._can_label:
            raise InvalidInput(
                f"output='label' needs a classifier; this model ({self.objective}) is a "
                "regressor: use output='probability'"
            )
        if self._is_multiclass:
            scores = self.predict(X, output="probability", nthread=nthread)
            return np.argmax(scores, axis=1).astype(np.int32)
        if self.objective == "binary:logitraw":
            # its output is a margin: the probability threshold t is the margin logit(t)
            t = min(max(self.threshold, 1e-12), 1 - 1e-12)
            margins = self.predict(X, output="margin", nthread=nthread)
            return (margins >= np.log(t / (1 - t))).astype(np.int32)
        scores = self.predict(X, output="probability", nthread=nthread)
        return (scores >= self.threshold).astype(np.int32)

    def _coerce(self, X: Any) -> np.ndarray:
        if isinstance(X, np.ndarray):
            arr = X
        else:
            try:
                arr = np.asarray(X)
            except (ValueError, TypeError) as exc:
                raise InvalidInput(
                    f"expected a 2-D array of numbers with {self.n_features} columns: {exc}"
                ) from exc
        if arr.dtype.kind not in "fiub":
            raise InvalidInput(
                f"expected numeric features (float, int or bool), got dtype {arr.dtype}"
            )
        if arr.ndim == 1:
            if arr.shape[0] != self.n_features:
                raise InvalidInput(
                    f"a 1-D input is one row and needs {self.n_features} features, "
                    f"got {arr.shape[0]}"
                )
            arr = arr.reshape(1, -1)
        elif arr.ndim != 2:
            raise InvalidInput(
                f"expected a 2-D array (rows, {self.n_features} features), got {arr.ndim}-D "
                f"shape {arr.shape}"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _bad_shape(self, X: np.ndarray) -> None:
        n, n_cols = X.shape
        if n_cols != self.n_features:
            raise InvalidInput(f"expected {self.n_features} features, got {n_cols}")
        raise InvalidInput(f"empty batch: expected at least one row of {self.n_features} features")


def _positive_int(value: Any) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        n = 0
    if n < 1 or isinstance(value, bool):
        raise InvalidInput(f"nthread must be a positive int or None, got {value!r}")
    return n


def _model_threshold(model_file: Path) -> float:
    """The decision threshold from a ``features.json`` beside the model, else 0.5."""
    side = model_file.parent / "features.json"
    if side.is_file():
        try:
            value = orjson.loads(side.read_bytes()).get("threshold")
            if isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:
                return float(value)
        except (OSError, orjson.JSONDecodeError, AttributeError):
            log.info("ignoring unreadable %s", side)
    return 0.5


def load_model(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    threshold: float | None = None,
    autotune_policy: str = "fast",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Load, compile (or fetch from the cache), verify and autotune a tree model.

    path: a model file of any name (format sniffed) or a directory holding one.
    backend: "auto" (autotuned per batch size), "numba", "tl2cgen", or the reference library
    ("xgboost", "lightgbm", "gtil" for Treelite checkpoints).
    threshold: label threshold for binary classifiers; default ``features.json``'s or 0.5.
    autotune_policy: "fast" times numba against the reference library and compiles tl2cgen only
    when numba cannot serve the model; "full" also compiles and times tl2cgen (gcc: seconds).
    cache_dir: compile cache; default $RTBSERVE_CACHE_DIR or ~/.cache/rtbserve.
    """
    if backend not in BACKEND_NAMES:
        raise ArtifactError(
            f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}"
        )
    if autotune_policy not in AUTOTUNE_POLICIES:
        raise ArtifactError(
            f"unknown autotune policy {autotune_policy!r}; expected one of "
            f"{', '.join(AUTOTUNE_POLICIES)}"
        )
    store = ArtifactStore(path, cache_dir=cache_dir)
    meta = store.meta
    thr = _model_threshold(store.model_file) if threshold is None else float(threshold)
    if not 0.0 <= thr <= 1.0:
        raise InvalidInput(f"threshold must lie in [0, 1], got {thr}")
    if backend != "auto":
        built = store.backend(backend, threshold=thr)
        return Model(meta, store.model_file, {backend: built}, [backend] * 4, thr, None)
    return _load_auto(store, meta, thr, autotune_policy)


def _load_auto(store: ArtifactStore, meta: ModelMeta, thr: float, policy: str) -> Model:
    saved = store.entry.read_json(f"autotune-{policy}.json")
    if saved and saved.get("policy") == policy and saved.get("model_sha256") == store.sha256:
        chosen: list[str] = saved["choice"]
        try:
            built = {name: store.backend(name, threshold=thr) for name in dict.fromkeys(chosen)}
            return Model(meta, store.model_file, built, chosen, thr, saved["timings_s"])
        except RtbError as exc:
            log.warning("saved autotune choice unusable (%s); tuning again", exc)
    candidates: dict[str, BuiltBackend] = {}
    refused: dict[str, str] = {}

    def attempt(name: str) -> None:
        try:
            candidates[name] = store.backend(name, threshold=thr)
        except (UnsupportedModel, VerificationFailed, CompileError) as exc:
            # the reference library still serves: a refused backend is a slower model, not
            # an outage
            refused[name] = str(exc)
            log.warning("backend %s refused for %s: %s", name, store.model_file, exc)

    for name in ["numba", "tl2cgen"] if policy == "full" else ["numba"]:
        attempt(name)
    if "numba" not in candidates and "tl2cgen" not in refused and "tl2cgen" not in candidates:
        attempt("tl2cgen")
    candidates[meta.reference] = store.backend(meta.reference, threshold=thr)
    from rtbserve.registry.verify import build_probe

    probe = (
        store._reference_scores[0]
        if store._reference_scores is not None
        else build_probe(store.source, max_rows=2048)
    )
    timings = autotune.time_backends({k: v.predictor for k, v in candidates.items()}, probe)
    chosen = autotune.choose(timings)
    store.entry.write_json(
        f"autotune-{policy}.json",
        {
            "model_sha256": store.sha256,
            "policy": policy,
            "candidates": sorted(candidates),
            "refused": refused,
            "choice": chosen,
            "timings_s": timings,
        },
    )
    used = {name: candidates[name] for name in dict.fromkeys(chosen)}
    return Model(meta, store.model_file, used, chosen, thr, timings)
