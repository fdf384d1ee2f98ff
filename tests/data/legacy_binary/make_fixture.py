"""Generate XGBoost legacy-binary model fixtures.

Must be run with xgboost 1.7.x (xgboost >= 2 cannot write the legacy binary
format). Deterministic: numpy is seeded and xgboost uses a fixed seed and
nthread=1.

    python3 -m venv /tmp/xgb17
    /tmp/xgb17/bin/pip install "xgboost==1.7.6" "numpy<2" scipy
    /tmp/xgb17/bin/python tests/data/legacy_binary/make_fixture.py
"""
import os

import numpy as np
import xgboost as xgb

assert xgb.__version__.startswith("1."), xgb.__version__

HERE = os.path.dirname(os.path.abspath(__file__))


def probe_rows(rng, n_features, n_rows=50):
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    X[rng.random(X.shape) < 0.15] = np.nan
    # Fixed special values so every probe set hits them.
    X[0, :] = 0.0
    X[1, :] = np.nan
    X[2, :] = np.inf
    X[3, :] = -np.inf
    X[4, 0] = np.nan
    X[5, 1] = np.inf
    X[6, 2] = -np.inf
    X[7, 3] = 0.0
    X[8, ::2] = np.inf
    X[9, 1::2] = -np.inf
    return X


def save(bst, name, X):
    path = os.path.join(HERE, name + ".bin")
    bst.save_model(path)
    with open(path, "rb") as f:
        head = f.read(16)
    assert not head.startswith(b"{"), "expected legacy binary, got JSON"
    # xgboost 1.7's DMatrix constructor rejects +/-inf ("Input data contains
    # `inf` or `nan`"), so reference predictions come from inplace_predict on
    # the dense array (missing=NaN), which accepts inf. For rows without inf
    # they are checked to equal predict(DMatrix, output_margin=False/True).
    prob = bst.inplace_predict(X, predict_type="value", missing=np.nan)
    margin = bst.inplace_predict(X, predict_type="margin", missing=np.nan)
    finite_rows = ~np.isinf(X).any(axis=1)
    d = xgb.DMatrix(X[finite_rows], missing=np.nan)
    np.testing.assert_array_equal(prob[finite_rows], bst.predict(d, output_margin=False))
    np.testing.assert_array_equal(margin[finite_rows], bst.predict(d, output_margin=True))
    np.savez(os.path.join(HERE, name + ".npz"), X=X, prob=prob, margin=margin)
    print(name, os.path.getsize(path), "bytes; head", head.hex(),
          "prob", prob.shape, "margin", margin.shape)


def main():
    rng = np.random.default_rng(20240607)

    # (a) binary:logistic, 8 features, 500 rows, ~10% NaN, 12 trees, depth 4
    X = rng.normal(size=(500, 8)).astype(np.float32)
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2] * X[:, 3] + 0.3 * rng.normal(size=500)
    y = (logit > 0).astype(np.float32)
    X[rng.random(X.shape) < 0.10] = np.nan
    params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3,
              "seed": 0, "nthread": 1, "tree_method": "exact"}
    bst = xgb.train(params, xgb.DMatrix(X, label=y, missing=np.nan), num_boost_round=12)
    save(bst, "binary_logistic", probe_rows(rng, 8))

    # (b) multi:softprob, 3 classes, 5 features, 6 rounds, depth 3
    X = rng.normal(size=(300, 5)).astype(np.float32)
    score = np.stack([X[:, 0], X[:, 1] - X[:, 2], 0.5 * X[:, 3] + X[:, 4]], axis=1)
    y = np.argmax(score + 0.3 * rng.normal(size=score.shape), axis=1).astype(np.float32)
    X[rng.random(X.shape) < 0.10] = np.nan
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 3,
              "eta": 0.3, "seed": 0, "nthread": 1, "tree_method": "exact"}
    bst = xgb.train(params, xgb.DMatrix(X, label=y, missing=np.nan), num_boost_round=6)
    save(bst, "multi_softprob", probe_rows(rng, 5))


if __name__ == "__main__":
    main()
