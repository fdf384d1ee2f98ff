"""Bad inputs to ``predict`` and bad model files to ``load_model``: right error, clear message.

Inputs: wrong shapes and dtypes raise ``InvalidInput`` naming what was expected; every numeric
dtype and memory layout scores like the same values as float32 C-order rows.
Model files: truncated, corrupted, not a model, empty, missing, ambiguous directories raise
``ArtifactError`` (or a subclass) naming the file and what was expected. Loads of files that make
native parsers crash run in a subprocess, so a crash fails one test instead of the session.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rtb_testutil import (
    BACKENDS,
    ModelSpec,
    assert_scores_close,
    backend_arg,
    describe_exit,
    run_isolated,
)

import rtbserve
from rtbserve.errors import ArtifactError, InvalidInput, RtbError, UnsupportedModel

MODEL = "xgb_binary_logistic_json"
MULTI = "xgb_multi_softprob_json"


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, zoo, load):
    """(spec, model) of a binary classifier on every backend."""
    return zoo[MODEL], load(MODEL, request.param)


# --------------------------------------------------------------------------- predict: shapes


def test_wrong_feature_count(served):
    spec, m = served
    F = spec.n_features
    for n_cols in (F - 1, F + 1, 1, 2 * F):
        with pytest.raises(InvalidInput, match=rf"^expected {F} features, got {n_cols}$"):
            m.predict(np.zeros((3, n_cols), np.float32))
    with pytest.raises(InvalidInput, match=rf"expected {F} features, got {F + 2}"):
        m.predict(np.zeros((5000, F + 2), np.float32))  # a large batch checks too
    with pytest.raises(InvalidInput, match=rf"expected {F} features, got 0"):
        m.predict(np.zeros((3, 0), np.float32))


def test_three_dimensional_input(served):
    spec, m = served
    with pytest.raises(InvalidInput, match=r"2-D.*got 3-D shape \(2, 3, 6\)"):
        m.predict(np.zeros((2, 3, spec.n_features), np.float32))
    with pytest.raises(InvalidInput, match="2-D"):
        m.predict(np.float32(1.0))
    with pytest.raises(InvalidInput, match="2-D"):
        m.predict(3.0)


def test_one_dimensional_input_is_one_row(served):
    spec, m = served
    row = spec.random_rows(1, np.random.default_rng(0))[0]
    got = m.predict(row)
    assert got.shape == (1,)
    np.testing.assert_array_equal(got, m.predict(row[None, :]))
    assert m.predict(row, output="label").shape == (1,)
    assert m.predict(list(row)).shape == (1,)
    for n in (spec.n_features - 1, spec.n_features + 1, 0):
        with pytest.raises(
            InvalidInput, match=rf"1-D input is one row.*{spec.n_features} features.*got {n}"
        ):
            m.predict(np.zeros(n, np.float32))


def test_one_dimensional_multiclass_row(zoo, load):
    spec = zoo[MULTI]
    m = load(MULTI, "numba")
    row = spec.random_rows(1, np.random.default_rng(0))[0]
    assert m.predict(row).shape == (1, 3)
    assert m.predict(row, output="label").shape == (1,)


def test_empty_batch(served):
    spec, m = served
    with pytest.raises(InvalidInput, match=rf"empty batch.*{spec.n_features} features"):
        m.predict(np.zeros((0, spec.n_features), np.float32))
    with pytest.raises(InvalidInput, match="empty batch"):
        m.predict(np.zeros((0, spec.n_features), np.float64))
    with pytest.raises(InvalidInput, match="empty batch"):
        m.predict(np.zeros((0, spec.n_features), np.float32), output="label")
    with pytest.raises(InvalidInput):
        m.predict([])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(np.array([["a"] * 6]), id="str"),
        pytest.param(np.array([["1.5"] * 6]), id="numeric-str"),
        pytest.param(np.array([[b"1"] * 6]), id="bytes"),
        pytest.param(np.array([[1.0] * 6], dtype=object), id="object-floats"),
        pytest.param(np.array([[1.0, None, 2, 3, 4, 5]], dtype=object), id="object-None"),
        pytest.param(np.ones((2, 6), complex), id="complex"),
        pytest.param(np.zeros((2, 6), "datetime64[s]"), id="datetime"),
        pytest.param([["a", "b", "c", "d", "e", "f"]], id="list-of-str"),
        pytest.param([[1.0] * 6, [1.0] * 5], id="ragged-list"),
        pytest.param(None, id="None"),
        pytest.param({"f0": 1.0}, id="dict"),
    ],
)
def test_non_numeric_input(served, bad):
    _, m = served
    with pytest.raises(InvalidInput) as info:
        m.predict(bad)
    msg = str(info.value)
    assert "expected" in msg and ("numeric" in msg or "2-D" in msg or "array" in msg), msg


def test_unknown_output(served):
    spec, m = served
    X = np.zeros((2, spec.n_features), np.float32)
    for bad in ("prob", "proba", "Probability", "", None, "raw"):
        with pytest.raises(InvalidInput, match="probability, margin, label"):
            m.predict(X, output=bad)
    with pytest.raises(InvalidInput, match="unknown output"):
        m.predict(np.zeros((5000, spec.n_features), np.float32), output="logit")


@pytest.mark.parametrize("n_rows", [1, 3, 10_000])
def test_bad_nthread(served, n_rows):
    """nthread < 1 is rejected whatever the batch size (not only when rows get split)."""
    spec, m = served
    X = np.zeros((n_rows, spec.n_features), np.float32)
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match="nthread"):
            m.predict(X, nthread=bad)


# --------------------------------------------------------------------------- predict: conversions


def _rows(spec: ModelSpec) -> np.ndarray:
    return spec.probe(seed=21)[::3][:600]


def test_float64_int_bool_inputs_are_converted(served):
    spec, m = served
    X = _rows(spec)
    want = m.predict(X)
    np.testing.assert_array_equal(m.predict(X.astype(np.float64)), want)
    np.testing.assert_array_equal(m.predict(X.tolist()), want)
    np.testing.assert_array_equal(m.predict(tuple(map(tuple, X.tolist()))), want)
    Xi = np.round(np.clip(np.nan_to_num(X, nan=0), -1e6, 1e6)).astype(np.int64)
    for dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint32):
        xi = np.clip(Xi, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        np.testing.assert_array_equal(m.predict(xi), m.predict(xi.astype(np.float32)), str(dtype))
    xb = X > 0
    np.testing.assert_array_equal(m.predict(xb), m.predict(xb.astype(np.float32)))
    assert_scores_close(m.predict(xb), spec.reference_scores(xb.astype(np.float32), margin=False))
    with np.errstate(over="ignore"):  # float32 extremes become +-inf in float16
        x16 = X.astype(np.float16)
    np.testing.assert_array_equal(m.predict(x16), m.predict(x16.astype(np.float32)))


def test_float64_rounds_like_xgboost(zoo, load, backend):
    """float64 values near split thresholds round to float32 exactly as XGBoost rounds them."""
    spec = zoo[MODEL]
    m = load(MODEL, backend)
    rng = np.random.default_rng(22)
    feats, thrs = spec.split_points
    t32 = thrs.astype(np.float32).astype(np.float64)
    ulp = np.spacing(thrs.astype(np.float32)).astype(np.float64)
    X = spec.random_rows(len(thrs) * 4, rng).astype(np.float64)
    offsets = np.concatenate([-0.5 * ulp, -0.49 * ulp, 0.49 * ulp, 0.5 * ulp])
    X[np.arange(len(X)), np.tile(feats, 4)] = np.tile(t32, 4) + offsets
    got = m.predict(X)
    want = spec.booster.inplace_predict(X, predict_type="value")  # XGBoost on the float64 rows
    assert_scores_close(got, want, X, "float64 rows")


def test_memory_layouts_give_the_same_scores(served):
    spec, m = served
    X = _rows(spec)
    want = m.predict(X)
    np.testing.assert_array_equal(m.predict(np.asfortranarray(X)), want)
    wide = np.zeros((len(X), spec.n_features * 2), np.float32)
    wide[:, ::2] = X
    assert not wide[:, ::2].flags.c_contiguous
    np.testing.assert_array_equal(m.predict(wide[:, ::2]), want)
    tall = np.repeat(X, 2, axis=0)
    np.testing.assert_array_equal(m.predict(tall[::2]), want)
    np.testing.assert_array_equal(m.predict(X[::-1]), want[::-1])
    np.testing.assert_array_equal(m.predict(X.astype(">f4")), want)  # big-endian
    ro = X.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(m.predict(ro), want)
    unaligned = np.frombuffer(b"\0" + X.tobytes(), dtype=np.float32, offset=1).reshape(X.shape)
    np.testing.assert_array_equal(m.predict(unaligned), want)
    before = X.copy()
    m.predict(X)
    np.testing.assert_array_equal(X, before)  # the input is never modified


# --------------------------------------------------------------------------- model files


def _expect_artifact_error(path, match=None, cache_dir=None, backend="numba", exc=ArtifactError):
    with pytest.raises(exc) as info:
        rtbserve.load_model(path, backend=backend, cache_dir=cache_dir)
    msg = str(info.value)
    if match is not None:
        assert any(m in msg for m in ([match] if isinstance(match, str) else match)), msg
    assert "[bt]" not in msg and "Stack trace" not in msg, f"backtrace in the message: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "model_name",
    [MODEL, "xgb_binary_logistic_ubj", "tl_checkpoint_binary", "legacy_binary_logistic"],
)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_model_file(zoo, tmp_path, cache_dir, model_name, keep):
    spec = zoo[model_name]
    raw = spec.file.read_bytes()
    bad = tmp_path / spec.file.name
    bad.write_bytes(raw[: int(len(raw) * keep)])
    msg = _expect_artifact_error(bad, cache_dir=cache_dir)
    assert str(bad) in msg, msg


def test_corrupted_json_bytes(zoo, tmp_path, cache_dir):
    raw = bytearray(zoo[MODEL].file.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(range(200, 216))
    bad = tmp_path / "model.json"
    bad.write_bytes(bytes(raw))
    msg = _expect_artifact_error(bad, match="xgboost", cache_dir=cache_dir)
    assert str(bad) in msg


def test_json_that_is_not_a_model(tmp_path, cache_dir):
    for i, text in enumerate(['{"hello": 1}', "{}", '{"learner": {}}']):
        bad = tmp_path / f"m{i}.json"
        bad.write_text(text)
        msg = _expect_artifact_error(bad, cache_dir=cache_dir)
        assert str(bad) in msg and "xgboost" in msg.lower(), msg


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10", id="png"
        ),
        pytest.param(b"hello, this is not a model\n", id="text"),
        pytest.param(b"f0,f1,f2\n1,2,3\n4,5,6\n", id="csv"),
        pytest.param(b"[1, 2, 3]", id="json-list"),
        pytest.param(bytes(64), id="zeros"),
        pytest.param(b"\x1f\x8b\x08\x00" + bytes(40), id="gzip"),  # e.g. SageMaker's model.tar.gz
        pytest.param(b"PK\x03\x04" + bytes(40), id="zip"),
    ],
)
def test_file_that_is_not_a_model(tmp_path, cache_dir, content):
    bad = tmp_path / "model.bin"
    bad.write_bytes(content)
    msg = _expect_artifact_error(bad, match="is not a model file", cache_dir=cache_dir)
    assert str(bad) in msg
    for expected in ("XGBoost", "LightGBM", "Treelite"):
        assert expected in msg, msg


@pytest.mark.parametrize("size", range(1, 16))
def test_short_file_that_is_not_a_model(tmp_path, cache_dir, size):
    """Files of a few bytes (any length) are "not a model", not a crash of the format sniffer."""
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"abcdefghijklmnop"[:size])
    _expect_artifact_error(bad, match="is not a model file", cache_dir=cache_dir)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"0123456789abcdef"[:size])
    _expect_artifact_error(d, match="no model file", cache_dir=cache_dir)


@pytest.mark.parametrize("content", [b"", b"   \n\t\n"], ids=["empty", "whitespace"])
def test_empty_model_file(tmp_path, cache_dir, content):
    bad = tmp_path / "xgboost-model"
    bad.write_bytes(content)
    msg = _expect_artifact_error(bad, match="empty", cache_dir=cache_dir)
    assert str(bad) in msg


def test_missing_path(tmp_path, cache_dir):
    for missing in (tmp_path / "nope.json", tmp_path / "no" / "such" / "dir"):
        msg = _expect_artifact_error(missing, match="does not exist", cache_dir=cache_dir)
        assert str(missing) in msg


def test_directory_with_no_model(tmp_path, cache_dir):
    d = tmp_path / "empty"
    d.mkdir()
    msg = _expect_artifact_error(d, match="no model file", cache_dir=cache_dir)
    assert "xgboost-model" in msg and "model.json" in msg  # names what it looked for
    (d / "features.json").write_text('{"threshold": 0.3}')
    (d / "sample.csv").write_text("1,2,3\n")
    (d / "notes.txt").write_text("just some notes about this model\n")
    msg = _expect_artifact_error(d, match="no model file", cache_dir=cache_dir)
    assert "notes.txt" in msg  # says what it found


def test_directory_with_two_models(zoo, tmp_path, cache_dir):
    d = tmp_path / "two"
    d.mkdir()
    shutil.copy(zoo[MODEL].file, d / "a.json")
    shutil.copy(zoo["lgb_binary"].file, d / "b.txt")
    msg = _expect_artifact_error(d, match="several model files", cache_dir=cache_dir)
    assert "a.json" in msg and "b.txt" in msg


def test_directory_with_one_model_of_any_name(zoo, tmp_path, cache_dir):
    spec = zoo[MODEL]
    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(spec.file, d / "weird-name.model")
    (d / "features.json").write_text(json.dumps({"threshold": 0.3}))
    (d / "README.md").write_text("# a model\n")
    (d / "notes.txt").write_text("not a model\n")
    m = rtbserve.load_model(d, backend="numba", cache_dir=cache_dir)
    assert m.threshold == 0.3  # from features.json beside the model
    X = spec.random_rows(50, np.random.default_rng(0))
    assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X)
    assert (
        rtbserve.load_model(d, backend="numba", threshold=0.7, cache_dir=cache_dir).threshold == 0.7
    )


def test_sagemaker_directory(zoo, load, cache_dir):
    spec = zoo["xgb_binary_logistic_noext"]
    assert spec.path.is_dir() and spec.file.name == "xgboost-model"
    for path in (spec.path, spec.file):
        m = rtbserve.load_model(path, backend="numba", cache_dir=cache_dir)
        X = spec.random_rows(50, np.random.default_rng(0))
        assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X)


def test_format_is_sniffed_not_taken_from_the_name(zoo, tmp_path, cache_dir):
    for name, fake in (
        ("xgb_binary_logistic_json", "model.txt"),
        ("xgb_binary_logistic_ubj", "model.json"),
        ("lgb_binary", "model.json"),
        ("tl_checkpoint_binary", "model.ubj"),
        ("legacy_binary_logistic", "model.txt"),
    ):
        spec = zoo[name]
        d = tmp_path / name
        d.mkdir()
        shutil.copy(spec.file, d / fake)
        m = rtbserve.load_model(d / fake, backend=spec.reference, cache_dir=cache_dir)
        X = spec.random_rows(50, np.random.default_rng(0))
        assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X, name)


def test_unknown_backend_and_policy(zoo, cache_dir):
    path = zoo[MODEL].path
    for bad in ("foo", "NUMBA", "", "treelite"):
        with pytest.raises(ArtifactError, match="unknown backend") as info:
            rtbserve.load_model(path, backend=bad, cache_dir=cache_dir)
        for name in ("auto", "numba", "tl2cgen", "xgboost", "lightgbm", "gtil"):
            assert name in str(info.value)
    with pytest.raises(ArtifactError, match="unknown autotune policy.*fast, full"):
        rtbserve.load_model(path, autotune_policy="slow", cache_dir=cache_dir)


def test_reference_backend_of_another_library(zoo, cache_dir):
    for name, wrong in (
        (MODEL, "lightgbm"),
        (MODEL, "gtil"),
        ("lgb_binary", "xgboost"),
        ("tl_checkpoint_binary", "xgboost"),
        ("legacy_binary_logistic", "xgboost"),
    ):
        spec = zoo[name]
        with pytest.raises(UnsupportedModel, match=f"'{wrong}' cannot serve.*'{spec.reference}'"):
            rtbserve.load_model(spec.path, backend=wrong, cache_dir=cache_dir)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_threshold(zoo, cache_dir, threshold):
    with pytest.raises(InvalidInput, match=r"threshold must lie in \[0, 1\]"):
        rtbserve.load_model(zoo[MODEL].path, threshold=threshold, cache_dir=cache_dir)


def test_every_error_is_an_rtb_error_with_a_code():
    for exc in (
        InvalidInput,
        ArtifactError,
        UnsupportedModel,
        rtbserve.CompileError,
        rtbserve.VerificationFailed,
    ):
        assert issubclass(exc, RtbError) and isinstance(exc.code, str) and exc.code
    assert issubclass(UnsupportedModel, ArtifactError)
    assert issubclass(rtbserve.CompileError, ArtifactError)
    assert issubclass(rtbserve.VerificationFailed, ArtifactError)


# --------------------------------------------------------------------------- native-crash cases
# Each load runs in a child interpreter: a segfault or hang in a native parser must become an
# ArtifactError, never a dead serving process.

_LOAD_ONE = """
import sys, faulthandler
faulthandler.dump_traceback_later(float(sys.argv[4]), exit=True)  # a hang becomes a failure
import rtbserve
try:
    m = rtbserve.load_model(sys.argv[1], backend=sys.argv[2], cache_dir=sys.argv[3])
    print("LOADED", m.backend)
except rtbserve.RtbError as exc:
    print("RTB", type(exc).__name__, str(exc).replace("\\n", " "))
"""


def _load_isolated(path, backend, cache_dir, watchdog=60):
    proc = run_isolated(_LOAD_ONE, path, backend, cache_dir, watchdog, timeout=watchdog + 60)
    assert proc.returncode == 0, f"loading {path} ({backend}): {describe_exit(proc)}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("cut", ["0.5", "tree3"])
def test_truncated_lightgbm_model_does_not_crash(zoo, tmp_path, cache_dir, cut):
    """LightGBM's parser segfaults/aborts on a model string cut before "end of trees"."""
    text = zoo["lgb_binary"].file.read_text()
    assert "end of trees" in text
    cut_at = int(len(text) * float(cut)) if cut != "tree3" else text.index("Tree=3")
    bad = tmp_path / "model.txt"
    bad.write_text(text[:cut_at])
    out = _load_isolated(bad, "auto", cache_dir)
    assert out.startswith("RTB ArtifactError") and str(bad) in out, out


@pytest.mark.parametrize("split_index", ["n_features", "huge"])
@pytest.mark.parametrize("backend", ["numba", "tl2cgen", "auto", "xgboost"])
def test_split_on_a_feature_beyond_num_feature(zoo, tmp_path, cache_dir, split_index, backend):
    """A (corrupt) XGBoost JSON whose split uses feature >= num_feature must be refused."""
    spec = zoo[MODEL]
    model = json.loads(spec.file.read_text())
    tree = model["learner"]["gradient_booster"]["model"]["trees"][0]
    assert int(model["learner"]["learner_model_param"]["num_feature"]) == spec.n_features
    tree["split_indices"][0] = spec.n_features if split_index == "n_features" else 10**6
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps(model))
    out = _load_isolated(bad, backend, cache_dir)
    assert out.startswith("RTB ArtifactError") and "feature" in out, out


_FUZZ = """
import sys, faulthandler
import numpy as np
import rtbserve
watchdog, cache_dir, paths = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
for path in paths:
    print("START", path, flush=True)
    faulthandler.dump_traceback_later(watchdog, exit=True)
    try:
        m = rtbserve.load_model(path, backend="numba", cache_dir=cache_dir)
        m.predict(np.zeros((3, m.n_features), np.float32))
        print("LOADED", path, flush=True)
    except rtbserve.RtbError as exc:
        print("RTB", type(exc).__name__, path, flush=True)
    faulthandler.cancel_dump_traceback_later()
"""


def _corrupt(raw: bytes, seed: int, keep_header: int) -> bytes:
    rng = np.random.default_rng(seed)
    b = bytearray(raw)
    for _ in range(int(rng.integers(1, 8))):
        i = int(rng.integers(keep_header, len(b)))
        n = int(rng.integers(1, 9))
        b[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if rng.random() < 0.3:
        b = b[: int(rng.integers(16, len(b)))]
    return bytes(b)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_name", "keep_header"),
    [
        (MODEL, 1),
        ("xgb_binary_logistic_ubj", 1),
        ("tl_checkpoint_binary", 12),
        ("legacy_binary_logistic", 12),
    ],
)
def test_corrupted_bytes_never_crash_or_hang(zoo, tmp_path, cache_dir, model_name, keep_header):
    """Seeded random byte corruption: each load ends in a model or an RtbError, in seconds."""
    spec = zoo[model_name]
    raw = spec.file.read_bytes()
    paths = []
    for seed in range(12):
        p = tmp_path / f"corrupt-{seed}{spec.file.suffix}"
        p.write_bytes(_corrupt(raw, seed, keep_header))
        paths.append(p)
    proc = run_isolated(_FUZZ, 15, cache_dir, *paths, timeout=400)
    lines = proc.stdout.strip().splitlines()
    started = [ln.split()[1] for ln in lines if ln.startswith("START")]
    assert proc.returncode == 0, f"while loading {started[-1]}: {describe_exit(proc)}"
    done = [ln for ln in lines if not ln.startswith("START")]
    assert len(done) == len(paths), lines
    assert all(ln.startswith(("LOADED", "RTB")) for ln in done), done


def test_reference_backend_loads_every_format(zoo, cache_dir):
    for name in (
        MODEL,
        "xgb_binary_logistic_ubj",
        "lgb_binary",
        "tl_checkpoint_binary",
        "legacy_binary_logistic",
    ):
        spec = zoo[name]
        m = rtbserve.load_model(
            spec.path, backend=backend_arg(spec, "reference"), cache_dir=cache_dir
        )
        assert m.backend == spec.reference
        assert m.verification.kind == "reference"
