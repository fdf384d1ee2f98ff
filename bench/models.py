"""Deterministic benchmark models and row generators.

Three models, all XGBoost JSON, binary:logistic:

- ``demo``: the bundled ``models/rtb-filter`` (320 trees, depth 7, 67 features).
- ``m200``: synthetic, 200 trees, depth 6, 40 features, trained on data with 10% missing values.
- ``stress``: synthetic, 1000 trees, depth 8, 100 features, same data recipe.

The synthetic models are trained with ``hist`` on 2 threads from a seeded generator and cached
under ``bench/.cache/<name>-<key>/`` where the key hashes the spec and the XGBoost version, so a
changed spec or library retrains and an unchanged one loads in milliseconds. A ``sample.npy`` of
held-out rows is written beside each model (rtbserve's tl2cgen backend uses it for branch
annotation, as it uses ``sample.csv`` beside the demo model).

Usage: ``python -m bench.models [--force]`` trains (or finds) every synthetic model, prints where.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
DEMO_DIR = REPO / "models" / "rtb-filter"
MISSING_RATE = 0.10
MODEL_NAMES = ("demo", "m200", "stress")


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic model's bytes (with the XGBoost version)."""

    name: str
    n_trees: int
    max_depth: int
    n_features: int
    n_rows: int
    seed: int
    eta: float = 0.1
    missing_rate: float = MISSING_RATE
    max_bin: int = 256
    min_child_weight: float = 0.5
    recipe: int = 1  # bump when make_data changes

    def key(self) -> str:
        import xgboost

        blob = json.dumps({**asdict(self), "xgboost": xgboost.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SPECS = {
    "m200": SyntheticSpec("m200", n_trees=200, max_depth=6, n_features=40, n_rows=20_000, seed=200),
    "stress": SyntheticSpec(
        "stress",
        n_trees=1000,
        max_depth=8,
        n_features=100,
        n_rows=6_000,
        seed=1000,
        max_bin=64,
        eta=0.05,
        min_child_weight=0.0,  # late trees stay deep (a stress test wants large trees)
    ),
    # a small model loaded first in the "process that already loaded another model" measurement
    "tiny": SyntheticSpec("tiny", n_trees=20, max_depth=4, n_features=10, n_rows=2_000, seed=20),
}


# --------------------------------------------------------------------------- data


def make_data(
    n_rows: int, n_features: int, seed: int, missing_rate: float = MISSING_RATE
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (float32, ``missing_rate`` NaN) and 0/1 labels from a fixed nonlinear rule.

    Columns cycle through four kinds (gaussian, uniform, binary, small ordinal) so the trees see
    both dense thresholds and few-valued features. The label is a noisy logistic of additive,
    threshold and pairwise terms over the first columns, with missing values counted as a signal
    of their own, so trees keep splitting to full depth for many rounds.
    """
    rng = np.random.default_rng(seed)
    kinds = np.arange(n_features) % 4
    X = np.empty((n_rows, n_features), dtype=np.float64)  # noqa: N806
    for j, kind in enumerate(kinds):
        if kind == 0:
            X[:, j] = rng.normal(0.0, 1.0, n_rows)
        elif kind == 1:
            X[:, j] = rng.uniform(-2.0, 5.0, n_rows)
        elif kind == 2:
            X[:, j] = rng.integers(0, 2, n_rows)
        else:
            X[:, j] = rng.integers(0, 12, n_rows)
    miss = rng.random((n_rows, n_features)) < missing_rate
    # the label rule sees the true values, with missing ones replaced by a per-column constant
    Z = np.where(miss, 0.5, X)  # noqa: N806
    k = min(n_features, 24)
    w = rng.normal(0.0, 1.0, k)
    logit = (np.tanh(Z[:, :k]) * w).sum(axis=1) * 0.6
    for a in range(0, k - 1, 2):
        logit += 0.4 * np.sin(Z[:, a] * Z[:, a + 1])
        logit += 0.5 * (Z[:, a] > np.median(Z[:, a])) * (Z[:, a + 1] < 0.3)
    logit += 0.3 * miss[:, :k].sum(axis=1)
    logit -= logit.mean()
    logit += rng.normal(0.0, 1.0, n_rows)  # label noise keeps gradients nonzero
    y = (logit > 0).astype(np.float32)
    X[miss] = np.nan
    return X.astype(np.float32), y


def _train(spec: SyntheticSpec, out_dir: Path) -> dict[str, object]:
    import xgboost as xgb

    X, y = make_data(spec.n_rows, spec.n_features, spec.seed, spec.missing_rate)  # noqa: N806
    params = {
        "objective": "binary:logistic",
        "tree_method": "hist",
        "max_depth": spec.max_depth,
        "eta": spec.eta,
        "max_bin": spec.max_bin,
        "min_child_weight": spec.min_child_weight,
        "nthread": 2,
        "seed": spec.seed,
        "verbosity": 0,
    }
    t0 = time.perf_counter()
    dtrain = xgb.DMatrix(X, label=y, missing=np.nan)
    booster = xgb.train(params, dtrain, num_boost_round=spec.n_trees)
    train_s = time.perf_counter() - t0
    booster.save_model(str(out_dir / "model.json"))
    sample, _ = make_data(2_000, spec.n_features, spec.seed + 1, spec.missing_rate)
    np.save(out_dir / "sample.npy", sample)
    info = {"spec": asdict(spec), "train_s": round(train_s, 3), "xgboost": xgb.__version__}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return info


def synthetic_model(name: str, *, force: bool = False) -> Path:
    """Path to the synthetic model's ``model.json``, training it on first use."""
    spec = SPECS[name]
    final = CACHE_DIR / f"{spec.name}-{spec.key()}"
    if (final / "model.json").is_file() and (final / "info.json").is_file() and not force:
        return final / "model.json"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=CACHE_DIR))
    _train(spec, tmp)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final / "model.json"


def model_path(name: str) -> Path:
    """The model file for a benchmark model name (``demo``, ``m200``, ``stress``, ``tiny``)."""
    if name == "demo":
        return DEMO_DIR / "model.json"
    return synthetic_model(name)


def describe(path: Path) -> dict[str, int]:
    """Trees, deepest leaf, features and node count of an XGBoost JSON model."""
    doc = json.loads(Path(path).read_text())
    learner = doc["learner"]
    trees = learner["gradient_booster"]["model"]["trees"]
    max_depth = 0
    nodes = 0
    for t in trees:
        left, right = t["left_children"], t["right_children"]
        nodes += len(left)
        depth = [0] * len(left)
        for i in range(len(left)):  # parents precede children in XGBoost's numbering
            if left[i] != -1:
                depth[left[i]] = depth[right[i]] = depth[i] + 1
        max_depth = max(max_depth, max(depth))
    return {
        "trees": len(trees),
        "max_depth": max_depth,
        "features": int(learner["learner_model_param"]["num_feature"]),
        "nodes": nodes,
    }


# --------------------------------------------------------------------------- benchmark rows


def _demo_rows(n_rows: int, seed: int) -> np.ndarray:
    """Rows like ``sample.csv``: resampled sample rows, perturbed per feature type.

    Continuous columns (``float``/``cyclic`` in ``features.json``) get 5% multiplicative noise;
    every other cell is, with probability 0.2, replaced by the same column of another sample
    row (one-hot groups are swapped whole so they stay one-hot). NaNs stay where the sample has
    them, plus a few from the column swaps.
    """
    sample = np.genfromtxt(DEMO_DIR / "sample.csv", delimiter=",", dtype=np.float32)
    sample = np.atleast_2d(sample)
    feats = json.loads((DEMO_DIR / "features.json").read_text())
    if isinstance(feats, dict):
        feats = feats.get("features", feats)
    types = [f.get("type", "float") if isinstance(f, dict) else "float" for f in feats]
    names = [f.get("name", "") if isinstance(f, dict) else "" for f in feats]
    n_feat = sample.shape[1]
    types = (types + ["float"] * n_feat)[:n_feat]
    rng = np.random.default_rng(seed)
    X = sample[rng.integers(0, len(sample), n_rows)].astype(np.float64)  # noqa: N806
    cont = np.array([t in ("float", "cyclic") for t in types])
    noise = rng.normal(1.0, 0.05, (n_rows, int(cont.sum())))
    X[:, cont] *= noise
    # one-hot groups share a name prefix (exchange_*, device_type_*, os_*)
    groups: dict[str, list[int]] = {}
    for j, (t, nm) in enumerate(zip(types, names, strict=True)):
        if t == "one_hot":
            groups.setdefault(nm.rsplit("_", 1)[0], []).append(j)
    singles = [j for j, t in enumerate(types) if t not in ("float", "cyclic", "one_hot")]
    donors = sample[rng.integers(0, len(sample), n_rows)]
    for cols in [*groups.values(), *([j] for j in singles)]:
        swap = rng.random(n_rows) < 0.2
        X[np.ix_(swap, cols)] = donors[np.ix_(swap, cols)]
    return np.ascontiguousarray(X, dtype=np.float32)


def bench_rows(name: str, n_rows: int, seed: int = 12345) -> np.ndarray:
    """``n_rows`` float32 C-contiguous rows for model ``name``, different from its training rows."""
    if name == "demo":
        return _demo_rows(n_rows, seed)
    spec = SPECS[name]
    X, _ = make_data(n_rows, spec.n_features, seed, spec.missing_rate)  # noqa: N806
    return np.ascontiguousarray(X)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    args = ap.parse_args(argv)
    for name in SPECS:
        t0 = time.perf_counter()
        path = synthetic_model(name, force=args.force)
        info = json.loads((path.parent / "info.json").read_text())
        print(
            f"{name:7s} {path}  (train {info['train_s']:.1f} s when built; "
            f"this call {time.perf_counter() - t0:.2f} s)"
        )


if __name__ == "__main__":
    main()
