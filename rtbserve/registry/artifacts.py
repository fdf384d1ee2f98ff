"""Model file -> verified predictor per backend, through the compile cache.

Cold path (no cache entry): parse the model, build the backend's artifact, score the full probe
set against the reference library, refuse the backend if it disagrees, then publish the artifact,
its manifest (file digests and the full report) and a small probe with the reference's answers.
Warm path: check the artifact's digest, load it, and re-score the small probe (no reference library
is loaded, so a thousand cached models load fast). A failed warm check rebuilds under the lock.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtbserve.errors import ArtifactError, CompileError, RtbError, UnsupportedModel
from rtbserve.predictors import COMPILED_BACKENDS, REFERENCE_BACKENDS
from rtbserve.predictors.source import ModelSource, OutputSpec, find_model_file
from rtbserve.registry import verify
from rtbserve.registry.cache import ArtifactDir, cache_key, default_cache_dir, toolchain_identity

log = logging.getLogger("rtbserve.registry")

META_FILE = "model.json"
PROBE_FILE = "probe.npz"


@dataclass
class ModelMeta:
    """What the registry knows about a model without parsing it again."""

    sha256: str
    format: str
    reference: str
    n_features: int
    output: OutputSpec
    feature_names: list[str] | None
    has_categorical: bool

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["output"] = dict(self.output.__dict__)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        d = dict(d)
        d["output"] = OutputSpec(**d["output"])
        return cls(**d)

    @classmethod
    def from_source(cls, s: ModelSource) -> ModelMeta:
        s.validate()
        return cls(
            sha256=s.sha256,
            format=s.format,
            reference=s.reference_name,
            n_features=s.n_features,
            output=s.output,
            feature_names=s.feature_names,
            has_categorical=s.has_categorical,
        )


@dataclass
class BuiltBackend:
    predictor: Any
    report: verify.VerificationReport  # full report from compile time
    quick_report: verify.VerificationReport | None  # the load-time re-check, when from cache
    from_cache: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


class ArtifactStore:
    """Builds and loads one model's backends. Not thread-safe; one per load call."""

    def __init__(self, path: str | Path, *, cache_dir: str | Path | None = None) -> None:
        self.model_file = find_model_file(path)
        self.raw = self.model_file.read_bytes()
        import hashlib

        self.sha256 = hashlib.sha256(self.raw).hexdigest()
        self.toolchain = toolchain_identity()
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.entry = ArtifactDir(root, cache_key(self.sha256, self.toolchain))
        self._source: ModelSource | None = None
        self._meta: ModelMeta | None = None
        self._reference_scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- model facts ------------------------------------------------------------------------

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            src = ModelSource.from_path(self.model_file)
            if src.sha256 != self.sha256:
                raise ArtifactError(f"model file {str(self.model_file)!r} changed while loading")
            self._source = src
        return self._source

    @property
    def meta(self) -> ModelMeta:
        if self._meta is None:
            cached = self.entry.read_json(META_FILE)
            if cached is not None and cached.get("sha256") == self.sha256:
                self._meta = ModelMeta.from_dict(cached)
            else:
                self._meta = ModelMeta.from_source(self.source)
                self.entry.write_json(META_FILE, self._meta.to_dict())
        return self._meta

    # -- backends ---------------------------------------------------------------------------

    def backend(self, name: str, *, threshold: float | None) -> BuiltBackend:
        """A verified predictor for backend ``name`` (built, or loaded from the cache)."""
        if name in REFERENCE_BACKENDS:
            return self._reference_backend(name)
        if name not in COMPILED_BACKENDS:
            raise ArtifactError(f"unknown backend {name!r}")
        t0 = time.perf_counter()
        built = self._load_cached(name, threshold)
        if built is not None:
            built.timings_ms["load"] = (time.perf_counter() - t0) * 1e3
            return built
        with self.entry.locked():
            built = self._load_cached(name, threshold)  # a concurrent process may have built it
            if built is None:
                built = self._build(name, threshold)
        built.timings_ms["load"] = (time.perf_counter() - t0) * 1e3
        return built

    def _reference_backend(self, name: str) -> BuiltBackend:
        from rtbserve.predictors.reference_impl import ReferencePredictor

        if name != self.meta.reference:
            raise UnsupportedModel(
                f"backend {name!r} cannot serve a {self.meta.format} model; its reference "
                f"library is {self.meta.reference!r}"
            )
        predictor = ReferencePredictor(self.source)
        report = verify.VerificationReport(
            backend=name,
            reference=name,
            rows_checked=0,
            max_abs_error=0.0,
            max_abs_error_margin=0.0,
            max_scaled_error=0.0,
            tolerance=verify.TOLERANCE,
            decision_flips=0,
            threshold=None,
            passed=True,
            kind="reference",
        )
        return BuiltBackend(predictor, report, None, from_cache=False)

    def _load_cached(self, name: str, threshold: float | None) -> BuiltBackend | None:
        manifest = self.entry.read_json(f"{name}.json")
        if manifest is None or manifest.get("model_sha256") != self.sha256:
            return None
        files: dict[str, str] = manifest.get("files", {})
        if not files or not all(self.entry.intact(f, h) for f, h in files.items()):
            log.warning("cached %s artifact for %s is corrupt; rebuilding", name, self.sha256[:12])
            return None
        try:
            predictor = _LOADERS[name](self, manifest)
            predictor.warm_up()
        except RtbError as exc:
            log.warning("cached %s artifact does not load (%s); rebuilding", name, exc)
            return None
        probe = self._small_probe()
        if probe is None:
            return None
        X, want_out, want_margin = probe
        quick = verify.compare(
            predictor,
            X,
            want_out,
            want_margin,
            reference=self.meta.reference,
            threshold=threshold,
            kind="quick",
        )
        if not quick.passed:
            log.warning(
                "cached %s artifact fails its probe (%s); rebuilding", name, quick.summary()
            )
            return None
        report = verify.VerificationReport(**manifest["report"])
        return BuiltBackend(predictor, report, quick, from_cache=True)

    def _build(self, name: str, threshold: float | None) -> BuiltBackend:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        predictor, files = _BUILDERS[name](self)
        predictor.warm_up()
        timings["compile"] = (time.perf_counter() - t0) * 1e3
        X, want_out, want_margin = self._reference_probe(timings)
        report = verify.compare(
            predictor,
            X,
            want_out,
            want_margin,
            reference=self.meta.reference,
            threshold=threshold,
            kind="full",
            timings_ms=timings,
        )
        verify.require_passed(report)
        manifest = {
            "model_sha256": self.sha256,
            "backend": name,
            "files": files,
            "report": report.to_dict(),
            "toolchain": self.toolchain,
        }
        self.entry.write_json(f"{name}.json", manifest)
        log.info("compiled %s: %s", name, report.summary())
        return BuiltBackend(predictor, report, None, from_cache=False, timings_ms=timings)

    # -- probes -----------------------------------------------------------------------------

    def _reference_probe(self, timings: dict[str, float]) -> tuple[np.ndarray, ...]:
        if self._reference_scores is None:
            t0 = time.perf_counter()
            X = verify.build_probe(self.source)
            timings["probe"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            out = self.source.reference_predict(X, margin=False)
            margin = self.source.reference_predict(X, margin=True)
            timings["reference_predict"] = (time.perf_counter() - t0) * 1e3
            self._reference_scores = (X, out, margin)
            self._save_small_probe(X, out, margin)
        return self._reference_scores

    def _save_small_probe(self, X: np.ndarray, out: np.ndarray, margin: np.ndarray) -> None:
        n = X.shape[0]
        rng = np.random.default_rng(1)
        # the special-value rows sit at the end; keep them and a random sample of the rest
        tail = np.arange(max(n - 64, 0), n)
        head = rng.choice(max(n - 64, 1), size=min(verify.SMALL_PROBE_ROWS, max(n - 64, 0)))
        idx = np.unique(np.concatenate([head, tail]))
        buf = io.BytesIO()
        np.savez(buf, X=X[idx], out=out[idx], margin=margin[idx])
        self.entry.write_bytes(PROBE_FILE, buf.getvalue())

    def _small_probe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        try:
            with open(self.entry.path / PROBE_FILE, "rb") as fh, np.load(fh) as z:
                return np.ascontiguousarray(z["X"]), z["out"], z["margin"]
        except Exception as exc:  # truncated or corrupted: zipfile, pickle and OS errors
            log.warning("cached probe unreadable (%s); rebuilding", exc)
            return None


# -- per-backend build and load ---------------------------------------------------------------


def _build_numba(store: ArtifactStore) -> tuple[Any, dict[str, str]]:
    from rtbserve.predictors import numba_impl

    forest = numba_impl.flatten(store.source)
    buf = io.BytesIO()
    np.savez(buf, **forest.to_npz())
    store.entry.write_bytes("forest.npz", buf.getvalue())
    from rtbserve.registry.cache import file_sha256

    return numba_impl.NumbaPredictor(forest), {
        "forest.npz": file_sha256(store.entry.path / "forest.npz")
    }


def _load_numba(store: ArtifactStore, manifest: dict[str, Any]) -> Any:
    from rtbserve.predictors import numba_impl

    try:
        with open(store.entry.path / "forest.npz", "rb") as fh, np.load(fh) as z:
            forest = numba_impl.FlatForest.from_npz(z)
    except Exception as exc:  # digest-checked already; anything here means unusable
        raise ArtifactError(f"cached forest unreadable: {exc}") from exc
    return numba_impl.NumbaPredictor(forest)


def _build_tl2cgen(store: ArtifactStore) -> tuple[Any, dict[str, str]]:
    from rtbserve.predictors import tl2cgen_impl

    module_name = tl2cgen_impl.module_name_for(store.entry.key)
    sample = _data_sample(store.model_file)
    lib = tl2cgen_impl.compile_library(store.source, store.entry.path, module_name, sample=sample)
    from rtbserve.registry.cache import file_sha256

    predictor = tl2cgen_impl.Tl2cgenPredictor(
        tl2cgen_impl.load_library(lib, module_name), store.source
    )
    return predictor, {lib.name: file_sha256(lib)}


def _load_tl2cgen(store: ArtifactStore, manifest: dict[str, Any]) -> Any:
    from rtbserve.predictors import tl2cgen_impl

    (lib_name,) = manifest["files"]
    module_name = tl2cgen_impl.module_name_for(store.entry.key)
    module = tl2cgen_impl.load_library(store.entry.path / lib_name, module_name)
    try:
        return tl2cgen_impl.Tl2cgenPredictor(module, _MetaView(store.meta))
    except CompileError:
        raise
    except Exception as exc:
        raise ArtifactError(f"cached library unusable: {exc}") from exc


class _MetaView:
    """The few ModelSource attributes a predictor needs, from cached metadata."""

    def __init__(self, meta: ModelMeta) -> None:
        self.n_features = meta.n_features
        self.output = meta.output


def _data_sample(model_file: Path, max_rows: int = 10_000) -> np.ndarray | None:
    """Rows for branch annotation: ``sample.csv`` or ``sample.npy`` beside the model, if any."""
    for name in ("sample.npy", "sample.csv"):
        path = model_file.parent / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".npy"):
                data = np.load(path)
            else:
                data = np.genfromtxt(path, delimiter=",", dtype=np.float32, max_rows=max_rows)
            return np.atleast_2d(np.asarray(data, dtype=np.float32))[:max_rows]
        except (OSError, ValueError) as exc:
            log.info("ignoring unreadable data sample %s: %s", path, exc)
    return None


_BUILDERS = {"numba": _build_numba, "tl2cgen": _build_tl2cgen}
_LOADERS = {"numba": _load_numba, "tl2cgen": _load_tl2cgen}
