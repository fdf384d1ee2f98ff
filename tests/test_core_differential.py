"""Every backend x every model format/objective scores like the reference library.

Reference: XGBoost ``Booster.inplace_predict`` (value / margin), LightGBM ``Booster.predict``
(raw_score), Treelite GTIL for legacy-binary models and Treelite checkpoints, always fed the same
float32 rows. Tolerance: |a - b| <= 1e-5 * max(1, |b|).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rtb_testutil import (
    ALL_MODELS,
    BACKENDS,
    CATEGORICAL_MODELS,
    COMPILED,
    CORE_MODELS,
    LEGACY_DIR,
    LGB_ZERO_AS_MISSING,
    SPECIALS,
    TOL,
    ModelSpec,
    assert_scores_close,
    backend_arg,
    cases,
)

import rtbserve
from rtbserve.errors import (
    CompileError,
    InvalidInput,
    RtbError,
    UnsupportedModel,
    VerificationFailed,
)

ALL_CASES = cases(ALL_MODELS)
CORE_CASES = cases(CORE_MODELS)
REFERENCE_NAMES = ("xgboost", "lightgbm", "gtil")


def _check_scores(m: rtbserve.Model, spec: ModelSpec, X: np.ndarray, what: str) -> None:
    for output, margin in (("probability", False), ("margin", True)):
        got = m.predict(X, output=output)
        assert got.dtype == spec.out_dtype, f"{what} {output}: dtype {got.dtype}"
        want = spec.reference_scores(X, margin=margin)
        assert_scores_close(got, want, X, f"{spec.name} on {m.backend}, {what}, {output}")


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize(("model_name", "backend"), ALL_CASES)
def test_random_rows_match_reference(zoo, load, model_name, backend):
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.random_rows(600, np.random.default_rng(1))
    _check_scores(m, spec, X, "random rows (10% NaN)")


@pytest.mark.parametrize(("model_name", "backend"), ALL_CASES)
def test_special_values_match_reference(zoo, load, model_name, backend):
    """NaN, +-inf, +-0, subnormals, float32 extremes, huge values: whole rows and mixed in."""
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.special_rows(np.random.default_rng(2))
    assert np.signbit(X[X == 0]).any() and (~np.signbit(X[X == 0])).any()  # both zeros present
    _check_scores(m, spec, X, "special values")


@pytest.mark.parametrize(("model_name", "backend"), ALL_CASES)
def test_threshold_rows_match_reference(zoo, load, model_name, backend):
    """Features exactly on split thresholds and on their float32 neighbours (np.nextafter)."""
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.threshold_rows(np.random.default_rng(3))
    _check_scores(m, spec, X, "threshold rows")


@pytest.mark.parametrize(("model_name", "backend"), ALL_CASES)
def test_labels(zoo, load, model_name, backend):
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.probe(seed=4)
    if not spec.is_classifier:
        with pytest.raises(InvalidInput, match="label"):
            m.predict(X, output="label")
        return
    labels = m.predict(X, output="label")
    assert labels.dtype == np.int32
    assert labels.shape == (len(X),)
    prob = m.predict(X, output="probability")
    if spec.kind == "multiclass":
        np.testing.assert_array_equal(labels, np.argmax(prob, axis=1))
        want = spec.reference_scores(X, margin=False)
        top2 = np.sort(want, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 10 * TOL  # no near-tie
        np.testing.assert_array_equal(labels[clear], np.argmax(want, axis=1)[clear])
        if spec.objective == "multi:softmax":  # XGBoost's own "value" output is the label
            xgb_labels = spec.booster.inplace_predict(X, predict_type="value")
            np.testing.assert_array_equal(labels[clear], xgb_labels[clear].astype(np.int32))
    elif spec.objective == "binary:logitraw":
        # its output is a margin: the probability threshold 0.5 is the margin 0
        assert m.threshold == 0.5
        np.testing.assert_array_equal(labels, (prob >= 0.0).astype(np.int32))
        want = spec.reference_scores(X, margin=True)
        clear = np.abs(want) > 10 * TOL
        np.testing.assert_array_equal(labels[clear], (want[clear] >= 0.0).astype(np.int32))
    else:
        assert m.threshold == 0.5
        np.testing.assert_array_equal(labels, (prob >= m.threshold).astype(np.int32))
        want = spec.reference_scores(X, margin=False)
        clear = np.abs(want - m.threshold) > 10 * TOL
        np.testing.assert_array_equal(labels[clear], (want[clear] >= 0.5).astype(np.int32))
    assert set(np.unique(labels)) <= set(range(spec.n_classes if spec.n_classes > 1 else 2))


@pytest.mark.parametrize(
    ("model_name", "backend"),
    cases(["xgb_binary_logistic_json", "lgb_binary", "tl_checkpoint_binary"]),
)
def test_label_threshold_argument(zoo, load, model_name, backend):
    spec = zoo[model_name]
    m = load(model_name, backend, threshold=0.3)
    assert m.threshold == 0.3
    X = spec.random_rows(400, np.random.default_rng(5))
    labels = m.predict(X, output="label")
    prob = spec.reference_scores(X, margin=False)
    clear = np.abs(prob - 0.3) > 10 * TOL
    np.testing.assert_array_equal(labels[clear], (prob[clear] >= 0.3).astype(np.int32))
    assert ((prob >= 0.3) & (prob < 0.5)).any(), "threshold 0.3 should change some labels"


@pytest.mark.parametrize(("model_name", "backend"), CORE_CASES)
def test_every_batch_size(zoo, load, model_name, backend):
    """Single rows, the autotune buckets' edges and block edges all score like one big batch."""
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.probe(seed=6)[:1100]
    want = spec.reference_scores(X, margin=False)
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 17, 31, 32, 33, 63, 64, 65, 511, 512, 513, 1100):
        assert_scores_close(m.predict(X[:n]), want[:n], X[:n], f"{spec.name} first {n} rows")
    # row by row, from the end (rows on thresholds / special values)
    for i in range(len(X) - 40, len(X)):
        assert_scores_close(m.predict(X[i]), want[i : i + 1], X[i : i + 1], f"row {i} alone")


@pytest.mark.parametrize(("model_name", "backend"), ALL_CASES)
def test_model_facts_and_verification(zoo, load, model_name, backend):
    spec = zoo[model_name]
    m = load(model_name, backend)
    assert m.n_features == spec.n_features
    assert m.n_outputs == spec.n_classes
    assert set(m.bucket_backends) == {"1", "8", "64", "1024"}
    names = set(m.bucket_backends.values())
    if backend == "reference":
        assert names == {spec.reference}
    elif backend in COMPILED:
        assert names == {backend}
        assert m.backend == backend
    else:
        assert names <= {*COMPILED, spec.reference}, names
        assert m.backend == "+".join(dict.fromkeys(m.bucket_backends.values()))
    v = m.verification
    assert v.passed
    assert v.backend == m.bucket_backends["1"]
    if v.backend in COMPILED:
        assert v.reference == spec.reference
        assert v.rows_checked > 0
        assert v.decision_flips == 0
        assert v.max_scaled_error <= TOL
    for name, r in m.reports.items():
        assert r["report"]["passed"], (name, r)


@pytest.mark.parametrize("backend", COMPILED)
def test_verification_report_of_a_fresh_build(zoo, cache_dir, backend):
    spec = zoo["xgb_binary_logistic_json"]
    m = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    v = m.verification
    assert (v.backend, v.reference, v.kind) == (backend, "xgboost", "full")
    assert v.passed and v.rows_checked > 100 and v.decision_flips == 0
    assert v.max_scaled_error <= TOL and v.max_abs_error <= TOL and v.max_abs_error_margin <= TOL
    assert m.reports[backend]["from_cache"] is False


def test_feature_names(zoo, load):
    assert load("xgb_binary_logistic_json", "numba").feature_names == [f"f{i}" for i in range(6)]
    assert load("xgb_binary_logistic_ubj", "numba").feature_names == [f"f{i}" for i in range(6)]
    assert load("xgb_reg_squarederror_json", "numba").feature_names is None
    assert load("lgb_binary", "numba").feature_names == [f"Column_{i}" for i in range(6)]


# --------------------------------------------------------------------------- model shapes


def test_xgboost_writes_array_form_base_score(zoo, load):
    """xgboost >= 3.1 writes base_score as a string holding an array: "[9.97E1]"."""
    spec = zoo["xgb_array_base_score"]
    text = spec.file.read_text()
    found = re.findall(r'"base_score"\s*:\s*"([^"]*)"', text)
    assert found and re.fullmatch(r"\[-?\d\.\d+E-?\d+\]", found[0]), found
    assert float(found[0].strip("[]")) > 90  # far from the old default 0.5
    multi = re.findall(
        r'"base_score"\s*:\s*"([^"]*)"', zoo["xgb_multi_softprob_json"].file.read_text()
    )
    values = [float(v) for v in multi[0].strip("[]").split(",")]
    assert len(values) == 3 and len(set(values)) == 3, multi  # one base score per class
    X = spec.random_rows(300, np.random.default_rng(7))
    for backend in BACKENDS:
        m = load(spec.name, backend)
        got = m.predict(X)
        assert_scores_close(got, spec.reference_scores(X, margin=False), X, backend)
        assert float(np.mean(got)) > 90


def _max_depth(spec: ModelSpec) -> int:
    tl = spec.treelite
    deepest = 0
    for t in range(tl.num_tree):
        acc = tl.get_tree_accessor(t)
        left, right = acc.get_field("cleft"), acc.get_field("cright")
        depth = {0: 0}
        stack = [0]
        while stack:
            i = stack.pop()
            if left[i] >= 0:
                for c in (left[i], right[i]):
                    depth[int(c)] = depth[i] + 1
                    stack.append(int(c))
        deepest = max(deepest, max(depth.values()))
    return deepest


def test_deep_model_uses_the_explicit_layout(zoo):
    from rtbserve.predictors import numba_impl
    from rtbserve.predictors.source import ModelSource

    spec = zoo["xgb_deep"]
    assert _max_depth(spec) > numba_impl.PERFECT_MAX_DEPTH
    forest = numba_impl.flatten(ModelSource.from_path(spec.path))
    assert forest.depth == -1  # explicit-children layout
    shallow = numba_impl.flatten(ModelSource.from_path(zoo["xgb_binary_logistic_json"].path))
    assert shallow.depth == _max_depth(zoo["xgb_binary_logistic_json"])


def test_single_leaf_models_have_single_leaf_trees(zoo):
    tl = zoo["xgb_single_leaf"].treelite
    assert tl.num_tree == 4
    assert all(tl.get_tree_accessor(t).get_field("cleft").size == 1 for t in range(tl.num_tree))
    mixed = zoo["xgb_single_leaf_mixed"].treelite
    sizes = [mixed.get_tree_accessor(t).get_field("cleft").size for t in range(mixed.num_tree)]
    assert sizes[:3] == [1, 1, 1] and min(sizes[3:]) > 1, sizes


def test_single_leaf_model_is_constant(zoo, load):
    spec = zoo["xgb_single_leaf"]
    X = spec.special_rows(np.random.default_rng(8))
    for backend in BACKENDS:
        got = load(spec.name, backend).predict(X)
        assert np.all(got == got[0]), backend
        assert_scores_close(got, spec.reference_scores(X, margin=False), X, backend)


# --------------------------------------------------------------------------- categorical


@pytest.mark.parametrize("model_name", CATEGORICAL_MODELS)
def test_numba_refuses_categorical_and_names_tl2cgen(zoo, session_cache, model_name):
    spec = zoo[model_name]
    with pytest.raises(UnsupportedModel, match="tl2cgen"):
        rtbserve.load_model(spec.path, backend="numba", cache_dir=session_cache)


@pytest.mark.parametrize(
    ("model_name", "backend"),
    cases(CATEGORICAL_MODELS, ("tl2cgen", "auto", "reference")),
)
def test_categorical_edge_values(zoo, load, model_name, backend):
    """Categories in and out of the training range, negative, fractional, huge, missing."""
    spec = zoo[model_name]
    m = load(model_name, backend)
    if backend == "auto":
        assert "numba" not in m.bucket_backends.values()
    rng = np.random.default_rng(9)
    X = spec.random_rows(400, rng)
    edge = np.array(
        [
            0,
            1,
            2,
            3.0,
            5,
            9,
            10,
            11,
            63,
            64,
            65,
            1000,
            2.0**24,
            2.0**31,
            1.5,
            2.999,
            0.5,
            -0.0,
            -1,
            -2,
            -0.5,
            -1e-40,
            1e-40,
            np.nan,
            np.inf,
            -np.inf,
            3.4e38,
        ],
        dtype=np.float32,
    )
    for col in spec.categorical:
        X[: len(edge) * 8, col] = np.tile(edge, 8)
        X[len(edge) * 8 :, col] = rng.choice(edge, size=len(X) - len(edge) * 8)
    _check_scores(m, spec, X, "category edge values")


def test_auto_serves_categorical_without_numba(zoo, cache_dir):
    spec = zoo["xgb_categorical"]
    m = rtbserve.load_model(spec.path, cache_dir=cache_dir)
    assert set(m.bucket_backends.values()) <= {"tl2cgen", "xgboost"}
    X = spec.probe()
    assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X, "auto")


# --------------------------------------------------------------------------- LightGBM specifics


def test_lightgbm_zero_as_missing_falls_back(zoo, cache_dir):
    """Treelite has no zero-as-missing: compiled backends must refuse, "auto" must still serve."""
    spec = zoo[LGB_ZERO_AS_MISSING]
    X = spec.probe()
    want = spec.reference_scores(X, margin=False)
    for backend in COMPILED:
        try:
            m = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
        except RtbError:
            continue  # refused: fine
        assert_scores_close(m.predict(X), want, X, f"{backend} served zero_as_missing")
    m = rtbserve.load_model(spec.path, backend="auto", cache_dir=cache_dir)
    assert_scores_close(m.predict(X), want, X, "auto")


def test_lightgbm_tiny_values_count_as_zero(zoo, load):
    """LightGBM scores any |x| <= 1e-35 (kZeroThreshold) as 0.0; models trained on data with
    zeros split at +-1e-35."""
    spec = zoo["lgb_regression"]
    feats, thrs = spec.split_points
    assert (np.abs(thrs) < 1e-30).any(), "expected a split at +-kZeroThreshold"
    X = np.zeros((12, spec.n_features), np.float32)
    for i, v in enumerate([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-35, -1e-35]):
        X[i, :] = v
    X[8:, :] = spec.random_rows(4, np.random.default_rng(10), nan_frac=0)
    X[8:, feats[np.abs(thrs) < 1e-30][0]] = np.float32(-1e-35)
    for backend in BACKENDS:
        m = load(spec.name, backend)
        _check_scores(m, spec, X, f"tiny values on {backend}")


# --------------------------------------------------------------------------- legacy binary


@pytest.mark.parametrize("name", ["binary_logistic", "multi_softprob"])
def test_legacy_binary_matches_xgboost_1_7(session_cache, backend, name):
    path = LEGACY_DIR / f"{name}.bin"
    assert path.read_bytes()[:1] != b"{"
    with np.load(LEGACY_DIR / f"{name}.npz") as z:
        X, prob, margin = z["X"], z["prob"], z["margin"]
    m = rtbserve.load_model(
        path, backend="gtil" if backend == "reference" else backend, cache_dir=session_cache
    )
    want_shape = prob.shape if prob.ndim == 1 else (len(X), prob.size // len(X))
    assert_scores_close(m.predict(X), prob.reshape(want_shape), X, f"{name} probability")
    assert_scores_close(m.predict(X, output="margin"), margin.reshape(want_shape), X, "margin")
    if backend in COMPILED:
        v = m.verification
        assert v.passed and v.rows_checked > 0 and v.decision_flips == 0
        assert v.reference == "gtil"


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("model_name", "backend"),
    cases(["xgb_binary_logistic_json", "xgb_multi_softprob_json", "lgb_binary", "xgb_deep"]),
)
def test_nthread_gives_identical_results(zoo, load, model_name, backend):
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = spec.random_rows(10_000, np.random.default_rng(11))
    X[::97] = SPECIALS[np.arange(len(X[::97])) % len(SPECIALS), None]
    one = m.predict(X, nthread=1)
    two = m.predict(X, nthread=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, m.predict(X))
    np.testing.assert_array_equal(
        m.predict(X, output="margin", nthread=1), m.predict(X, output="margin", nthread=2)
    )
    assert_scores_close(two, spec.reference_scores(X, margin=False), X, "nthread=2")
    if spec.is_classifier:
        np.testing.assert_array_equal(
            m.predict(X, output="label", nthread=1), m.predict(X, output="label", nthread=2)
        )


# --------------------------------------------------------------------------- property-based

HYPOTHESIS_CASES = cases(
    ["xgb_binary_logistic_json", "xgb_multi_softprob_json", "lgb_binary", "xgb_deep"],
    ("numba", "auto"),
)


def _row_values(spec: ModelSpec) -> st.SearchStrategy[float]:
    """Any float32, or a split threshold / its float32 neighbours, or a special value."""
    _, thrs = spec.split_points
    t32 = np.unique(thrs.astype(np.float32))
    near = np.unique(
        np.concatenate(
            [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))]
        )
    )
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from([float(v) for v in near]),
        st.sampled_from([float(v) for v in SPECIALS]),
    )


@pytest.mark.parametrize(("model_name", "backend"), HYPOTHESIS_CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_any_float32_rows(zoo, load, model_name, backend, data):
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = data.draw(
        arrays(
            np.float32,
            st.tuples(st.integers(1, 40), st.just(spec.n_features)),
            elements=_row_values(spec),
        ),
        label="X",
    )
    for output, margin in (("probability", False), ("margin", True)):
        got = m.predict(X, output=output)
        assert_scores_close(got, spec.reference_scores(X, margin=margin), X, output)


@pytest.mark.parametrize(("model_name", "backend"), HYPOTHESIS_CASES[:2])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_input_layouts_agree(zoo, load, model_name, backend, data):
    """float64 / F-order / strided views of the same float32 values score identically."""
    spec = zoo[model_name]
    m = load(model_name, backend)
    X = data.draw(
        arrays(
            np.float32,
            st.tuples(st.integers(1, 20), st.just(spec.n_features)),
            elements=_row_values(spec),
        )
    )
    want = m.predict(X)
    np.testing.assert_array_equal(m.predict(np.asfortranarray(X)), want)
    np.testing.assert_array_equal(m.predict(X.astype(np.float64)), want)
    wide = np.repeat(X, 2, axis=1)  # every other column is a strided view of X
    np.testing.assert_array_equal(m.predict(wide[:, ::2]), want)


def test_reference_backends_names(zoo, load):
    for name, ref in (
        ("xgb_binary_logistic_json", "xgboost"),
        ("lgb_binary", "lightgbm"),
        ("tl_checkpoint_binary", "gtil"),
        ("legacy_binary_logistic", "gtil"),
    ):
        assert zoo[name].reference == ref
        assert load(name, "reference").backend == ref
    assert backend_arg(zoo["lgb_binary"], "reference") == "lightgbm"
    assert set(REFERENCE_NAMES) <= set(rtbserve.predictors.BACKEND_NAMES)


# --------------------------------------------------------------------------- refusals, fallbacks


@pytest.fixture
def wrong_numba(monkeypatch):
    """Make the numba backend build a forest whose leaves are all off by 0.5."""
    from rtbserve.predictors import numba_impl

    real = numba_impl.flatten

    def flatten(source):
        forest = real(source)
        forest.leaves = forest.leaves + np.asarray(0.5, forest.leaves.dtype)
        return forest

    monkeypatch.setattr(numba_impl, "flatten", flatten)


def test_verification_refuses_a_wrong_backend(zoo, cache_dir, wrong_numba):
    spec = zoo["xgb_binary_logistic_json"]
    with pytest.raises(VerificationFailed) as info:
        rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    msg = str(info.value)
    assert "numba" in msg and "xgboost" in msg and "tolerance" in msg, msg
    # nothing was published for the refused backend
    from rtbserve.registry.artifacts import ArtifactStore

    assert not (ArtifactStore(spec.path, cache_dir=cache_dir).entry.path / "numba.json").exists()


def test_auto_falls_back_when_numba_is_refused(zoo, cache_dir, wrong_numba):
    """A compiled backend that fails verification cannot serve; "auto" must use another."""
    spec = zoo["xgb_binary_logistic_json"]
    m = rtbserve.load_model(spec.path, backend="auto", cache_dir=cache_dir)
    assert "numba" not in m.bucket_backends.values()
    X = spec.probe()
    assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X, "auto")


@pytest.mark.parametrize("cc", ["/nonexistent/bin/gcc", "false"])
def test_compiler_failure_is_a_compile_error(zoo, cache_dir, monkeypatch, cc):
    from rtbserve.predictors import tl2cgen_impl

    monkeypatch.setattr(tl2cgen_impl, "CC", cc)
    spec = zoo["xgb_binary_logistic_json"]
    with pytest.raises(CompileError) as info:
        rtbserve.load_model(spec.path, backend="tl2cgen", cache_dir=cache_dir)
    assert cc in str(info.value)


@pytest.mark.parametrize("cc", ["/nonexistent/bin/gcc", "false"])
def test_auto_full_policy_survives_a_broken_compiler(zoo, cache_dir, monkeypatch, cc):
    """Without a working C compiler, "full" autotuning still serves with numba."""
    from rtbserve.predictors import tl2cgen_impl

    monkeypatch.setattr(tl2cgen_impl, "CC", cc)
    spec = zoo["xgb_binary_logistic_json"]
    m = rtbserve.load_model(spec.path, autotune_policy="full", cache_dir=cache_dir)
    assert "tl2cgen" not in m.bucket_backends.values()
    X = spec.probe()
    assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X, "auto full")


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholds_that_need_nine_significant_digits(zoo, tmp_path, cache_dir, backend):
    """float32 thresholds round-trip through decimal only with 9 significant digits."""
    import json

    spec = zoo["xgb_reg_squarederror_json"]
    t = np.float32(-0.115759045)
    assert np.float32(f"{t:.8g}") != t and np.float32(f"{t:.9g}") == t
    model = json.loads(spec.file.read_text())
    roots = []
    for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
        if tree["left_children"][0] != -1:
            tree["split_conditions"][0] = float(t)
            roots.append(tree["split_indices"][0])
    path = tmp_path / "nine-digits.json"
    path.write_text(json.dumps(model))
    nine = ModelSpec(
        "nine", path, "xgboost", "xgboost", "regression", spec.n_features, objective=spec.objective
    )
    X = nine.random_rows(60, np.random.default_rng(12), nan_frac=0.0)
    values = [t, np.nextafter(t, np.float32(1)), np.nextafter(t, np.float32(-1))]
    for i, v in enumerate(np.repeat(values, 20)):
        X[i, sorted(set(roots))] = v
    m = rtbserve.load_model(path, backend=backend_arg(nine, backend), cache_dir=cache_dir)
    _check_scores(m, nine, X, "rows on a 9-digit threshold")


@pytest.mark.parametrize(
    ("model_name", "backend"),
    cases(["xgb_multi_softprob_json", "lgb_binary", "xgb_deep"], ("numba", "tl2cgen", "auto")),
)
def test_predict_is_thread_safe(zoo, load, model_name, backend):
    """Concurrent predict calls (all batch sizes, both outputs) give the sequential answers."""
    from concurrent.futures import ThreadPoolExecutor

    spec = zoo[model_name]
    m = load(model_name, backend)
    rng = np.random.default_rng(13)
    jobs = []
    for i in range(48):
        n = (1, 3, 7, 40, 600, 5000)[i % 6]
        jobs.append((spec.random_rows(n, rng), ("probability", "margin")[i % 2], 1 + i % 2))
    want = [m.predict(X, output=o, nthread=1) for X, o, _ in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: m.predict(job[0], output=job[1], nthread=job[2]), jobs))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)
