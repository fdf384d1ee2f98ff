"""Shared helpers for the rtbserve test-suite: the model zoo, reference scores, probe rows.

Everything here is independent of rtbserve: the expected scores come from the library that
trained the model (XGBoost, LightGBM) or from Treelite's GTIL (legacy binary, checkpoints), fed
the same float32 rows, and the threshold rows are read from the model with Treelite.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

TOL = 1e-5
BACKENDS = ("numba", "tl2cgen", "auto", "reference")
COMPILED = ("numba", "tl2cgen")
LEGACY_DIR = Path(__file__).parent / "data" / "legacy_binary"

F32_MAX = np.finfo(np.float32).max
F32_TINY = np.finfo(np.float32).tiny  # smallest normal
SUBNORMAL_MIN = np.float32(1e-45)  # smallest subnormal
SPECIALS = np.array(
    [
        np.nan,
        np.inf,
        -np.inf,
        0.0,
        -0.0,
        SUBNORMAL_MIN,
        -SUBNORMAL_MIN,
        1e-40,
        -1e-40,
        F32_TINY,
        -F32_TINY,
        F32_MAX,
        -F32_MAX,
        1e30,
        -1e30,
        1e6,
        -1e6,
    ],
    dtype=np.float32,
)


# --------------------------------------------------------------------------- model specs


@dataclass
class ModelSpec:
    """A model file in the zoo and what a test needs to know about it."""

    name: str
    path: Path  # the file (or directory) handed to load_model
    family: str  # xgboost | lightgbm | treelite
    reference: str  # the reference backend name: xgboost | lightgbm | gtil
    kind: str  # binary | multiclass | regression
    n_features: int
    n_classes: int = 1  # output columns
    objective: str = ""
    categorical: dict[int, int] = field(default_factory=dict)  # column -> number of categories
    model_file: Path | None = None  # the file itself when path is a directory

    @property
    def file(self) -> Path:
        return self.model_file or self.path

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.family == "lightgbm" else np.float32)

    @property
    def is_classifier(self) -> bool:
        return self.kind in ("binary", "multiclass")

    @cached_property
    def booster(self) -> Any:
        """The reference library's model object."""
        if self.reference == "xgboost":
            import xgboost as xgb

            b = xgb.Booster()
            b.load_model(bytearray(self.file.read_bytes()))
            b.set_param({"nthread": 1})
            return b
        if self.reference == "lightgbm":
            import lightgbm as lgb

            return lgb.Booster(model_str=self.file.read_text())
        return self.treelite

    @cached_property
    def treelite(self) -> Any:
        import treelite

        if self.family == "treelite":
            return treelite.Model.deserialize(str(self.file))
        if self.family == "lightgbm":
            return treelite.frontend.from_lightgbm(self.booster)
        if self.reference == "gtil":  # legacy binary
            return treelite.frontend.load_xgboost_model_legacy_binary(str(self.file))
        return treelite.frontend.from_xgboost(self.booster)

    def reference_scores(self, X: np.ndarray, *, margin: bool) -> np.ndarray:
        """The reference's scores for float32 rows X: (n,) or (n, K), float64."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if self.reference == "xgboost":
            if self.objective == "multi:softmax" and not margin:
                # multi:softmax "predicts" labels; its probabilities are softmax(margin)
                return softmax(self.reference_scores(X, margin=True))
            out = self.booster.inplace_predict(
                X, predict_type="margin" if margin else "value", validate_features=False
            )
        elif self.reference == "lightgbm":
            out = self.booster.predict(X, raw_score=margin, num_threads=1)
        else:
            import treelite

            out = treelite.gtil.predict(self.booster, X, nthread=1, pred_margin=margin)
        out = np.asarray(out, dtype=np.float64)
        return out.reshape(len(X), -1) if self.kind == "multiclass" else out.reshape(-1)

    def reference_labels(self, X: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        p = self.reference_scores(X, margin=False)
        if self.kind == "multiclass":
            return np.argmax(p, axis=1)
        return (p >= threshold).astype(np.int32)

    # -- rows ---------------------------------------------------------------------------------

    def random_rows(self, n: int, rng: np.random.Generator, nan_frac: float = 0.1) -> np.ndarray:
        """Rows around the model's split thresholds, ``nan_frac`` missing."""
        feats, thrs = self.split_points
        center = np.zeros(self.n_features)
        spread = np.ones(self.n_features)
        for f in range(self.n_features):
            ts = thrs[(feats == f) & np.isfinite(thrs)]
            if ts.size:
                center[f] = np.median(ts)
                spread[f] = max(float(ts.max() - ts.min()), 1e-3)
        X = (center + spread * rng.normal(size=(n, self.n_features))).astype(np.float32)
        for col, n_cat in self.categorical.items():
            X[:, col] = rng.integers(0, n_cat, size=n)
        X[rng.random(X.shape) < nan_frac] = np.nan
        return X

    def special_rows(self, rng: np.random.Generator, n_mixed: int = 200) -> np.ndarray:
        """Whole rows of each special value, then random rows with ~30% special values."""
        whole = np.repeat(SPECIALS[:, None], self.n_features, axis=1)
        mixed = self.random_rows(n_mixed, rng, nan_frac=0.0)
        mask = rng.random(mixed.shape) < 0.3
        mixed[mask] = rng.choice(SPECIALS, size=int(mask.sum()))
        return np.ascontiguousarray(np.concatenate([whole, mixed]), dtype=np.float32)

    @cached_property
    def split_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(feature, threshold as float64) of every numerical split, read with Treelite."""
        tl = self.treelite
        feats, thrs = [np.zeros(0, np.int64)], [np.zeros(0)]
        for t in range(tl.num_tree):
            acc = tl.get_tree_accessor(t)
            internal = (acc.get_field("cleft") >= 0) & (acc.get_field("node_type") == 1)
            feats.append(acc.get_field("split_index")[internal].astype(np.int64))
            thrs.append(acc.get_field("threshold")[internal].astype(np.float64))
        return np.concatenate(feats), np.concatenate(thrs)

    def threshold_rows(self, rng: np.random.Generator, max_rows: int = 6000) -> np.ndarray:
        """Rows with one feature exactly on a split threshold or on a float32 neighbour.

        For float64 thresholds (LightGBM) both float32 roundings of the threshold are used, then
        their neighbours. Also rows with *every* feature on some threshold (all splits tight).
        """
        feats, thrs = self.split_points
        if feats.size == 0:  # no split at all: any rows
            return self.random_rows(64, rng)
        pairs = np.unique(np.stack([feats.astype(np.float64), thrs], axis=1), axis=0)
        f = pairs[:, 0].astype(np.int64)
        t64 = pairs[:, 1]
        t32 = t64.astype(np.float32)
        lo32 = np.where(t32.astype(np.float64) > t64, np.nextafter(t32, np.float32(-np.inf)), t32)
        hi32 = np.where(t32.astype(np.float64) < t64, np.nextafter(t32, np.float32(np.inf)), t32)
        down = np.float32(-np.inf)
        up = np.float32(np.inf)
        cands = [t32, lo32, hi32, np.nextafter(lo32, down), np.nextafter(hi32, up)]
        cands += [
            np.nextafter(np.nextafter(lo32, down), down),
            np.nextafter(np.nextafter(hi32, up), up),
        ]
        values = np.concatenate(cands)
        cols = np.tile(f, len(cands))
        values, idx = np.unique(
            np.stack([cols, values.astype(np.float64)], 1), axis=0, return_index=True
        )
        cols, values = values[:, 0].astype(np.int64), values[:, 1].astype(np.float32)
        if cols.size > max_rows:
            keep = rng.choice(cols.size, size=max_rows, replace=False)
            cols, values = cols[keep], values[keep]
        base = self.random_rows(cols.size, rng)
        base[np.arange(cols.size), cols] = values
        # every feature at once on one of its thresholds (or neighbours)
        tight = self.random_rows(256, rng, nan_frac=0.0)
        for col in np.unique(cols):
            vs = values[cols == col]
            tight[:, col] = rng.choice(vs, size=len(tight))
        return np.ascontiguousarray(np.concatenate([base, tight]), dtype=np.float32)

    def probe(self, seed: int = 0) -> np.ndarray:
        """Random + special + threshold rows: the differential probe for this model."""
        rng = np.random.default_rng(seed)
        return np.ascontiguousarray(
            np.concatenate(
                [self.random_rows(500, rng), self.special_rows(rng), self.threshold_rows(rng)]
            ),
            dtype=np.float32,
        )


def softmax(m: np.ndarray) -> np.ndarray:
    e = np.exp(m - m.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- comparisons


def scaled_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    err[(np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))] = 0.0
    return np.where(np.isnan(err), np.inf, err)


def assert_scores_close(got: Any, want: Any, X: np.ndarray | None = None, what: str = "") -> None:
    """|got - want| <= TOL * max(1, |want|) everywhere; shows the worst rows otherwise."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    err = scaled_error(got, want)
    if err.size and err.max() > TOL:
        rows = err.reshape(len(err), -1).max(axis=1)
        bad = np.argsort(-rows)[:5]
        lines = [f"{what}: {int((rows > TOL).sum())} of {len(rows)} rows differ; worst:"]
        for i in bad:
            if rows[i] <= TOL:
                break
            line = f"  row {i}: got {got[i]!r} want {want[i]!r} (scaled error {rows[i]:.3g})"
            if X is not None:
                line += f"\n    X[{i}] = {X[i].tolist()!r}"
            lines.append(line)
        raise AssertionError("\n".join(lines))


def cases(names: list[str] | tuple[str, ...], backends: tuple[str, ...] = BACKENDS) -> list[Any]:
    """(model_name, backend) pytest params, leaving out numba x categorical (tested apart)."""
    import pytest

    out = []
    for name in names:
        for b in backends:
            if b == "numba" and name in CATEGORICAL_MODELS:
                continue
            out.append(pytest.param(name, b, id=f"{name}-{b}"))
    return out


def backend_arg(spec: ModelSpec, backend: str) -> str:
    """The backend= argument for load_model ("reference" -> the model's reference library)."""
    return spec.reference if backend == "reference" else backend


# --------------------------------------------------------------------------- the zoo

XGB_OBJECTIVES = {
    "binary_logistic": ("binary:logistic", "binary"),
    "binary_logitraw": ("binary:logitraw", "binary"),
    "reg_squarederror": ("reg:squarederror", "regression"),
    "reg_logistic": ("reg:logistic", "regression"),
    "multi_softprob": ("multi:softprob", "multiclass"),
    "multi_softmax": ("multi:softmax", "multiclass"),
}
XGB_FORMATS = ("json", "ubj", "noext")
XGB_MODELS = [f"xgb_{o}_{f}" for o in XGB_OBJECTIVES for f in XGB_FORMATS]
SPECIAL_XGB_MODELS = [
    "xgb_single_leaf",
    "xgb_single_leaf_mixed",
    "xgb_deep",
    "xgb_array_base_score",
    "xgb_categorical",
]
LGB_MODELS = ["lgb_binary", "lgb_regression", "lgb_multiclass", "lgb_categorical"]
# served by the reference only (see test_lightgbm_zero_as_missing_falls_back)
LGB_ZERO_AS_MISSING = "lgb_zero_as_missing"
TREELITE_MODELS = ["tl_checkpoint_binary", "tl_checkpoint_multiclass"]
LEGACY_MODELS = ["legacy_binary_logistic", "legacy_multi_softprob"]
CATEGORICAL_MODELS = ("xgb_categorical", "lgb_categorical")
ALL_MODELS = XGB_MODELS + SPECIAL_XGB_MODELS + LGB_MODELS + TREELITE_MODELS + LEGACY_MODELS
# one file per objective/family, for the slower checks
CORE_MODELS = [f"xgb_{o}_json" for o in XGB_OBJECTIVES] + [
    "xgb_multi_softprob_ubj",
    "xgb_binary_logistic_noext",
    "xgb_deep",
    "xgb_single_leaf",
    "lgb_binary",
    "lgb_regression",
    "lgb_multiclass",
    "tl_checkpoint_binary",
    "legacy_multi_softprob",
]


def _data(rng: np.random.Generator, n: int, f: int, nan_frac: float = 0.1) -> np.ndarray:
    X = rng.normal(size=(n, f)).astype(np.float32)
    if nan_frac:
        X[rng.random(X.shape) < nan_frac] = np.nan
    return X


def _xgb_train(params: dict[str, Any], X, y, rounds, **dm_kw) -> Any:
    import xgboost as xgb

    base = {"nthread": 1, "seed": 0, "max_depth": 4, "eta": 0.3, "verbosity": 0}
    base.update(params)
    return xgb.train(base, xgb.DMatrix(X, label=y, missing=np.nan, **dm_kw), num_boost_round=rounds)


def _save_xgb(booster: Any, out: Path, name: str, fmt: str) -> tuple[Path, Path]:
    """Save as .json/.ubj, or as an extension-less SageMaker ``xgboost-model`` in its own dir.

    Returns (path to hand to load_model, model file). xgboost warns when saving without an
    extension, so the extension-less file is a copy of the .ubj one.
    """
    if fmt in ("json", "ubj"):
        path = out / f"{name}.{fmt}"
        booster.save_model(str(path))
        return path, path
    d = out / name
    d.mkdir()
    tmp = out / f"{name}.tmp.ubj"
    booster.save_model(str(tmp))
    shutil.move(tmp, d / "xgboost-model")
    return d, d / "xgboost-model"


def build_zoo(out: Path) -> dict[str, ModelSpec]:
    """Train every zoo model into ``out`` (deterministic; about a second in all)."""
    import lightgbm as lgb

    zoo: dict[str, ModelSpec] = {}
    rng = np.random.default_rng(20240607)
    n, f = 400, 6
    X = _data(rng, n, f)
    x0 = np.nan_to_num(X)
    logit = 1.5 * x0[:, 0] - x0[:, 1] + 0.7 * x0[:, 2] * x0[:, 3] + 0.3 * rng.normal(size=n)
    y_bin = (logit > 0).astype(np.float32)
    y_reg = 3.0 * x0[:, 0] + np.sin(2 * x0[:, 1]) + x0[:, 4] ** 2 + 0.1 * rng.normal(size=n)
    y_prob = 1.0 / (1.0 + np.exp(-logit))
    y_multi3 = np.argmax(np.stack([x0[:, 0], x0[:, 1] - x0[:, 2], 0.5 * x0[:, 3]], 1), 1)
    y_multi4 = np.digitize(logit, [-1.0, 0.0, 1.0])
    train = {
        "binary_logistic": ({}, y_bin, 12),
        "binary_logitraw": ({}, y_bin, 10),
        "reg_squarederror": ({"tree_method": "exact"}, y_reg, 10),
        "reg_logistic": ({}, y_prob, 10),
        "multi_softprob": ({"num_class": 3, "max_depth": 3}, y_multi3, 6),
        "multi_softmax": ({"num_class": 4, "max_depth": 3, "tree_method": "approx"}, y_multi4, 5),
    }
    names = [f"f{i}" for i in range(f)]
    for key, (objective, kind) in XGB_OBJECTIVES.items():
        params, y, rounds = train[key]
        dm_kw = {"feature_names": names} if key == "binary_logistic" else {}
        bst = _xgb_train({"objective": objective, **params}, X, y, rounds, **dm_kw)
        n_classes = int(params.get("num_class", 1))
        for fmt in XGB_FORMATS:
            name = f"xgb_{key}_{fmt}"
            path, file = _save_xgb(bst, out, name, fmt)
            zoo[name] = ModelSpec(
                name, path, "xgboost", "xgboost", kind, f, n_classes, objective, model_file=file
            )
        if key == "binary_logistic":
            zoo["_tl_source_binary"] = zoo[f"xgb_{key}_json"]
        if key == "multi_softprob":
            zoo["_tl_source_multi"] = zoo[f"xgb_{key}_json"]

    # every tree a single leaf: no split survives gamma=1e9
    bst = _xgb_train(
        {"objective": "reg:squarederror", "gamma": 1e9, "base_score": 0.25}, X, y_reg, 4
    )
    path, _ = _save_xgb(bst, out, "xgb_single_leaf", "json")
    zoo["xgb_single_leaf"] = ModelSpec(
        "xgb_single_leaf", path, "xgboost", "xgboost", "regression", f, 1, "reg:squarederror"
    )
    # single-leaf trees first, then ordinary trees (training continued with a small gamma)
    bst = _xgb_train({"objective": "binary:logistic", "gamma": 1e9}, X, y_bin, 3)
    import xgboost as xgb

    bst = xgb.train(
        # gamma is part of the saved booster's config: reset it explicitly
        {"objective": "binary:logistic", "nthread": 1, "seed": 0, "max_depth": 3, "gamma": 0.0},
        xgb.DMatrix(X, label=y_bin, missing=np.nan),
        num_boost_round=4,
        xgb_model=bst,
    )
    path, _ = _save_xgb(bst, out, "xgb_single_leaf_mixed", "json")
    zoo["xgb_single_leaf_mixed"] = ModelSpec(
        "xgb_single_leaf_mixed", path, "xgboost", "xgboost", "binary", f, 1, "binary:logistic"
    )

    # deep trees (depth > 10: the numba backend's explicit-children layout)
    Xd = _data(rng, 1500, 8, nan_frac=0.05)
    yd = rng.normal(size=1500)
    bst = _xgb_train(
        {
            "objective": "reg:squarederror",
            "max_depth": 14,
            "min_child_weight": 0,
            "lambda": 0.01,
            "tree_method": "exact",
            "eta": 0.5,
        },
        Xd,
        yd,
        3,
    )
    path, _ = _save_xgb(bst, out, "xgb_deep", "json")
    zoo["xgb_deep"] = ModelSpec(
        "xgb_deep", path, "xgboost", "xgboost", "regression", 8, 1, "reg:squarederror"
    )

    # base score far from 0.5, stored by xgboost >= 3.1 in the array form "[9.97E1]"
    bst = _xgb_train({"objective": "reg:squarederror"}, X, 100.0 + y_reg, 6)
    path, _ = _save_xgb(bst, out, "xgb_array_base_score", "json")
    zoo["xgb_array_base_score"] = ModelSpec(
        "xgb_array_base_score", path, "xgboost", "xgboost", "regression", f, 1, "reg:squarederror"
    )

    # categorical splits (columns 0 and 1), no pandas
    Xc = _data(rng, 500, 5)
    Xc[:, 0] = rng.integers(0, 6, 500)
    Xc[:, 1] = rng.integers(0, 10, 500)
    Xc[rng.random(500) < 0.1, 0] = np.nan
    x1 = np.nan_to_num(Xc[:, 1], nan=0)
    yc = ((np.nan_to_num(Xc[:, 0], nan=1) % 2 == 0) ^ (x1 > 4)).astype(np.float32)
    yc = np.where(rng.random(500) < 0.1, 1 - yc, yc)
    bst = _xgb_train(
        {"objective": "binary:logistic", "tree_method": "hist", "max_cat_to_onehot": 1},
        Xc,
        yc,
        6,
        enable_categorical=True,
        feature_types=["c", "c", "q", "q", "q"],
    )
    path, _ = _save_xgb(bst, out, "xgb_categorical", "json")
    zoo["xgb_categorical"] = ModelSpec(
        "xgb_categorical",
        path,
        "xgboost",
        "xgboost",
        "binary",
        5,
        1,
        "binary:logistic",
        categorical={0: 6, 1: 10},
    )

    # LightGBM
    lgb_base = {
        "verbose": -1,
        "num_threads": 1,
        "seed": 0,
        "deterministic": True,
        "num_leaves": 15,
        "learning_rate": 0.2,
        "min_data_in_leaf": 5,
    }

    def lgb_model(name, params, X, y, rounds, kind, k=1, categorical=None):
        ds = lgb.Dataset(
            X,
            label=y,
            params={"verbose": -1},
            categorical_feature=list(categorical or []) or "auto",
        )
        bst = lgb.train({**lgb_base, **params}, ds, num_boost_round=rounds)
        path = out / f"{name}.txt"
        path.write_text(bst.model_to_string())
        zoo[name] = ModelSpec(
            name,
            path,
            "lightgbm",
            "lightgbm",
            kind,
            X.shape[1],
            k,
            params["objective"],
            categorical=dict(categorical or {}),
        )

    lgb_model("lgb_binary", {"objective": "binary"}, X, y_bin, 10, "binary")
    # trained without NaN: LightGBM's missing_type=None (NaN is scored as 0.0)
    lgb_model("lgb_regression", {"objective": "regression"}, x0, y_reg, 10, "regression")
    lgb_model(
        "lgb_multiclass",
        {"objective": "multiclass", "num_class": 3},
        X,
        y_multi3,
        6,
        "multiclass",
        k=3,
    )
    # zero_as_missing: 0.0 (|x| <= 1e-35) and NaN both take the default branch; Treelite has no
    # such notion, so compiled backends must refuse it and "auto" fall back to LightGBM
    xz = np.where(rng.random(X.shape) < 0.15, 0.0, X).astype(np.float32)
    lgb_model(
        "lgb_zero_as_missing",
        {"objective": "binary", "zero_as_missing": True},
        xz,
        y_bin,
        6,
        "binary",
    )
    lgb_model(
        "lgb_categorical",
        {"objective": "binary", "cat_smooth": 1.0, "min_data_per_group": 5},
        Xc,
        yc,
        8,
        "binary",
        categorical={0: 6, 1: 10},
    )

    # Treelite checkpoints (reference: GTIL)
    for name, src, kind in (
        ("tl_checkpoint_binary", zoo.pop("_tl_source_binary"), "binary"),
        ("tl_checkpoint_multiclass", zoo.pop("_tl_source_multi"), "multiclass"),
    ):
        path = out / f"{name}.tlc"
        src.treelite.serialize(str(path))
        zoo[name] = ModelSpec(
            name, path, "treelite", "gtil", kind, src.n_features, src.n_classes, src.objective
        )

    # XGBoost legacy binary (written by xgboost 1.7.6; see tests/data/legacy_binary)
    for name, kind, k, nf in (
        ("binary_logistic", "binary", 1, 8),
        ("multi_softprob", "multiclass", 3, 5),
    ):
        zoo[f"legacy_{name}"] = ModelSpec(
            f"legacy_{name}",
            LEGACY_DIR / f"{name}.bin",
            "xgboost",
            "gtil",
            kind,
            nf,
            k,
            f"{'binary:logistic' if k == 1 else 'multi:softprob'}",
        )
    return zoo


def xgb_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- subprocesses


def run_isolated(code: str, *args: Any, timeout: float = 120, cwd: Any = None) -> Any:
    """Run ``code`` in a fresh interpreter (argv[1:] = args); returns the CompletedProcess.

    For anything that may crash the interpreter (native parsers) or needs a second process.
    The child inherits the environment (so RTBSERVE_CACHE_DIR and PYTHONPATH).
    """
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def describe_exit(proc: Any) -> str:
    """A readable account of a child's death: signal name, last lines of stdout/stderr."""
    import signal

    rc = proc.returncode
    how = f"exit code {rc}"
    if rc < 0:
        how = f"killed by {signal.Signals(-rc).name}"
    err = "\n".join(
        line for line in proc.stderr.strip().splitlines() if "Treelite version" not in line
    )[-1500:]
    return f"{how}\n--- stdout ---\n{proc.stdout.strip()[-1500:]}\n--- stderr ---\n{err}"
