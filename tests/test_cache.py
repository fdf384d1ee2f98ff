"""The compile cache: warm loads, content addressing, corruption recovery, concurrency, autotune.

Every test uses its own empty cache dir (``cache_dir``), never the session's.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from rtb_testutil import (
    COMPILED,
    ModelSpec,
    assert_scores_close,
    describe_exit,
    run_isolated,
)

import rtbserve
from rtbserve.errors import ArtifactError
from rtbserve.registry.artifacts import ArtifactStore

MODEL = "xgb_binary_logistic_json"


def _entry(path: Path, cache_dir: Path) -> Path:
    return ArtifactStore(path, cache_dir=cache_dir).entry.path


def _check(m: rtbserve.Model, spec: ModelSpec, what: str = "") -> None:
    X = spec.probe(seed=31)
    assert_scores_close(m.predict(X), spec.reference_scores(X, margin=False), X, what)
    assert_scores_close(
        m.predict(X, output="margin"), spec.reference_scores(X, margin=True), X, what
    )


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("*/*") if p.is_dir())


def _autotune_file(entry: Path, policy: str = "fast") -> Path:
    """The saved autotune choice (one file per policy)."""
    return entry / f"autotune-{policy}.json"


def _leftovers(entry: Path) -> list[str]:
    """Temporary files or build dirs a writer left behind."""
    return sorted(
        p.name for p in entry.iterdir() if p.name.startswith(("rtb-cc-", ".")) and p.name != ".lock"
    )


# --------------------------------------------------------------------------- warm loads


@pytest.mark.parametrize("backend", COMPILED)
def test_second_load_hits_the_cache(zoo, cache_dir, backend):
    spec = zoo[MODEL]
    first = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    r1 = first.reports[backend]
    assert r1["from_cache"] is False and r1["quick_check"] is None
    assert r1["report"]["kind"] == "full" and r1["report"]["passed"]
    entry = _entry(spec.path, cache_dir)
    manifest = json.loads((entry / f"{backend}.json").read_text())
    assert manifest["model_sha256"] and manifest["files"]
    for name in manifest["files"]:
        assert (entry / name).is_file()
    assert (entry / "model.json").is_file() and (entry / "probe.npz").is_file()
    assert (
        (entry / "forest.npz").is_file()
        if backend == "numba"
        else any(entry.glob("rtb_tl2cgen_*.so"))
    )

    second = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    r2 = second.reports[backend]
    assert r2["from_cache"] is True
    quick = r2["quick_check"]
    assert quick is not None and quick["passed"] and quick["kind"] == "quick"
    assert quick["rows_checked"] > 0 and quick["decision_flips"] == 0
    assert second.verification.kind == "full"  # the compile-time report, kept in the manifest
    assert second.verification.rows_checked == first.verification.rows_checked
    assert _entries(cache_dir) == [entry]
    _check(second, spec, f"{backend} from cache")
    X = spec.probe(seed=32)
    np.testing.assert_array_equal(first.predict(X), second.predict(X))


def test_warm_load_in_a_new_process_skips_the_reference_library(zoo, cache_dir):
    """A cached model loads without importing XGBoost or Treelite (fast warm starts)."""
    spec = zoo[MODEL]
    for backend in COMPILED:
        rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    code = """
import sys, json
import numpy as np
import rtbserve
out = {}
for backend in ("numba", "tl2cgen"):
    m = rtbserve.load_model(sys.argv[1], backend=backend, cache_dir=sys.argv[2])
    scores = m.predict(np.zeros((2, m.n_features), np.float32)).tolist()
    out[backend] = [m.reports[backend]["from_cache"], scores]
libs = ("xgboost", "treelite", "lightgbm", "tl2cgen")
out["modules"] = sorted(k for k in libs if k in sys.modules)
print(json.dumps(out))
"""
    proc = run_isolated(code, spec.path, cache_dir)
    assert proc.returncode == 0, describe_exit(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["numba"][0] is True and out["tl2cgen"][0] is True
    want = spec.reference_scores(np.zeros((2, spec.n_features), np.float32), margin=False)
    assert_scores_close(np.array(out["numba"][1]), want)
    assert_scores_close(np.array(out["tl2cgen"][1]), want)
    assert out["modules"] == [], f"warm load imported {out['modules']}"


def test_same_bytes_at_another_path_share_the_entry(zoo, tmp_path, cache_dir):
    spec = zoo[MODEL]
    rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    other = tmp_path / "elsewhere" / "renamed-model"
    other.parent.mkdir()
    shutil.copy(spec.file, other)
    m = rtbserve.load_model(other, backend="numba", cache_dir=cache_dir)
    assert m.reports["numba"]["from_cache"] is True
    assert _entry(other, cache_dir) == _entry(spec.path, cache_dir)
    assert len(_entries(cache_dir)) == 1


def test_default_cache_dir_comes_from_the_environment(zoo, tmp_path, monkeypatch):
    spec = zoo[MODEL]
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("RTBSERVE_CACHE_DIR", str(env_cache))
    m = rtbserve.load_model(spec.path, backend="numba")
    assert len(_entries(env_cache)) == 1
    assert rtbserve.load_model(spec.path, backend="numba").reports["numba"]["from_cache"] is True
    _check(m, spec)


# --------------------------------------------------------------------------- changed models


def _bump_one_leaf(src: Path, dst: Path, delta: float = 1.0) -> None:
    """Copy an XGBoost JSON model, adding ``delta`` to the first leaf of tree 0."""
    model = json.loads(src.read_text())
    tree = model["learner"]["gradient_booster"]["model"]["trees"][0]
    leaf = tree["left_children"].index(-1)
    tree["split_conditions"][leaf] += delta
    tree["base_weights"][leaf] += delta
    dst.write_text(json.dumps(model))


@pytest.mark.parametrize("backend", COMPILED)
def test_changed_leaf_gets_its_own_entry_and_scores(zoo, tmp_path, cache_dir, backend):
    spec = zoo[MODEL]
    path = tmp_path / "model.json"
    shutil.copy(spec.file, path)
    original = rtbserve.load_model(path, backend=backend, cache_dir=cache_dir)
    entry = _entry(path, cache_dir)
    X = spec.probe(seed=33)
    before = original.predict(X, output="margin")

    _bump_one_leaf(spec.file, path)  # same path, new content (a redeploy)
    changed_spec = ModelSpec(
        "changed", path, "xgboost", "xgboost", "binary", spec.n_features, objective=spec.objective
    )
    changed = rtbserve.load_model(path, backend=backend, cache_dir=cache_dir)
    assert changed.reports[backend]["from_cache"] is False
    assert _entry(path, cache_dir) != entry
    assert len(_entries(cache_dir)) == 2
    after = changed.predict(X, output="margin")
    assert_scores_close(after, changed_spec.reference_scores(X, margin=True), X, "changed model")
    moved = np.abs(after - before)
    assert np.isclose(moved.max(), 1.0, atol=1e-5) and (moved < 1e-6).any()
    # the original is still served from its own entry
    shutil.copy(spec.file, path)
    again = rtbserve.load_model(path, backend=backend, cache_dir=cache_dir)
    assert again.reports[backend]["from_cache"] is True
    np.testing.assert_array_equal(again.predict(X, output="margin"), before)


def test_retrained_model_gets_its_own_entry(zoo, tmp_path, cache_dir):
    import xgboost as xgb

    spec = zoo[MODEL]
    rng = np.random.default_rng(34)
    X = spec.random_rows(300, rng)
    y = (np.nan_to_num(X[:, 0]) > 0).astype(np.float32)
    paths = []
    for seed in (0, 1):
        bst = xgb.train(
            {
                "objective": "binary:logistic",
                "nthread": 1,
                "seed": seed,
                "subsample": 0.7,
                "max_depth": 3,
            },
            xgb.DMatrix(X, label=y),
            5,
        )
        p = tmp_path / f"retrained-{seed}.json"
        bst.save_model(str(p))
        paths.append(p)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    models = [rtbserve.load_model(p, backend="numba", cache_dir=cache_dir) for p in paths]
    assert _entry(paths[0], cache_dir) != _entry(paths[1], cache_dir)
    for p, m in zip(paths, models, strict=True):
        s = ModelSpec(
            p.stem, p, "xgboost", "xgboost", "binary", spec.n_features, objective="binary:logistic"
        )
        _check(m, s, p.name)


# --------------------------------------------------------------------------- corruption


def _corrupt_and_reload(spec, cache_dir, backend, damage):
    """Build, damage the entry, reload: the damage must be detected and the artifact rebuilt."""
    rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    entry = _entry(spec.path, cache_dir)
    damage(entry)
    m = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    assert m.reports[backend]["from_cache"] is False, "damaged artifact was served"
    _check(m, spec, f"{backend} after rebuild")
    manifest = json.loads((entry / f"{backend}.json").read_text())
    from rtbserve.registry.cache import file_sha256

    for name, digest in manifest["files"].items():
        assert file_sha256(entry / name) == digest, f"{name} not rebuilt"
    again = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    assert again.reports[backend]["from_cache"] is True
    return entry


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "empty", "delete"],
)
def test_corrupted_forest_npz_is_rebuilt(zoo, cache_dir, damage):
    def do(entry: Path) -> None:
        f = entry / "forest.npz"
        if damage == "truncate":
            _truncate(f)
        elif damage == "garbage":
            f.write_bytes(os.urandom(f.stat().st_size))
        elif damage == "empty":
            f.write_bytes(b"")
        else:
            f.unlink()

    _corrupt_and_reload(zoo[MODEL], cache_dir, "numba", do)


def test_valid_but_wrong_forest_is_caught_by_the_quick_check(zoo, cache_dir):
    """An artifact whose digest matches its manifest but whose scores are wrong is rebuilt."""
    from rtbserve.registry.cache import file_sha256

    def do(entry: Path) -> None:
        with np.load(entry / "forest.npz") as z:
            arrays = {k: z[k].copy() for k in z.files}
        arrays["leaves"] = arrays["leaves"] + np.asarray(0.5, arrays["leaves"].dtype)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (entry / "forest.npz").write_bytes(buf.getvalue())
        manifest = json.loads((entry / "numba.json").read_text())
        manifest["files"]["forest.npz"] = file_sha256(entry / "forest.npz")
        (entry / "numba.json").write_text(json.dumps(manifest))

    _corrupt_and_reload(zoo[MODEL], cache_dir, "numba", do)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupted_tl2cgen_library_is_rebuilt(zoo, cache_dir, damage):
    """The first build runs in another process, so this one never maps the damaged file."""
    spec = zoo[MODEL]
    code = (
        "import sys, rtbserve\n"
        "rtbserve.load_model(sys.argv[1], backend='tl2cgen', cache_dir=sys.argv[2])"
    )
    proc = run_isolated(code, spec.path, cache_dir)
    assert proc.returncode == 0, describe_exit(proc)
    entry = _entry(spec.path, cache_dir)
    (lib,) = entry.glob("rtb_tl2cgen_*.so")
    if damage == "truncate":
        _truncate(lib, 0.3)
    elif damage == "garbage":
        lib.write_bytes(b"\x7fELF" + os.urandom(lib.stat().st_size - 4))
    else:
        lib.unlink()
    m = rtbserve.load_model(spec.path, backend="tl2cgen", cache_dir=cache_dir)
    assert m.reports["tl2cgen"]["from_cache"] is False
    _check(m, spec, "tl2cgen after rebuild")
    assert len(list(entry.glob("rtb_tl2cgen_*.so"))) == 1
    assert _leftovers(entry) == []


# np.load leaks the file handle when a .npz is not a zip (numpy); that is not what this checks
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("victim", ["probe.npz", "numba.json", "model.json"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_metadata_is_rebuilt(zoo, cache_dir, victim, damage):
    spec = zoo[MODEL]
    rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    entry = _entry(spec.path, cache_dir)
    if damage == "truncate":
        _truncate(entry / victim)
    else:
        (entry / victim).unlink()
    try:
        m = rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    except Exception as exc:
        failure = f"damaged {victim}: load_model raised {type(exc).__name__}: {exc}"
    else:
        failure = None
    gc.collect()  # release what the failed load left open, inside this test
    if failure:
        pytest.fail(failure)
    if victim != "model.json":  # model facts are recomputed; the artifact itself is fine
        assert m.reports["numba"]["from_cache"] is False
    _check(m, spec, f"after damaging {victim}")
    assert (entry / victim).is_file()
    assert rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir).reports["numba"][
        "from_cache"
    ]


def test_manifest_of_another_model_is_not_trusted(zoo, tmp_path, cache_dir):
    """An entry whose manifest names another model's digest is rebuilt, not served."""
    spec = zoo[MODEL]
    rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    entry = _entry(spec.path, cache_dir)
    manifest = json.loads((entry / "numba.json").read_text())
    manifest["model_sha256"] = "0" * 64
    (entry / "numba.json").write_text(json.dumps(manifest))
    m = rtbserve.load_model(spec.path, backend="numba", cache_dir=cache_dir)
    assert m.reports["numba"]["from_cache"] is False
    _check(m, spec)


# --------------------------------------------------------------------------- concurrency

_CONCURRENT = """
import sys, json, time
from pathlib import Path
import numpy as np
import rtbserve
path, backend, cache_dir, sync, me = sys.argv[1:6]
sync = Path(sync)
(sync / f"ready-{me}").touch()
deadline = time.time() + 60
while not (sync / "go").exists():  # start both loads at the same moment
    if time.time() > deadline:
        raise SystemExit("no go signal")
    time.sleep(0.002)
m = rtbserve.load_model(path, backend=backend, cache_dir=cache_dir)
X = np.load(sync / "X.npy")
np.save(sync / f"out-{me}.npy", m.predict(X))
print(json.dumps({name: r["from_cache"] for name, r in m.reports.items()}))
"""


@pytest.mark.parametrize("backend", ["tl2cgen", "numba", "auto"])
def test_concurrent_first_load_by_two_processes(zoo, tmp_path, cache_dir, backend):
    import subprocess
    import sys

    spec = zoo[MODEL]
    sync = tmp_path / "sync"
    sync.mkdir()
    X = spec.probe(seed=35)
    np.save(sync / "X.npy", X)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONCURRENT,
                str(spec.path),
                backend,
                str(cache_dir),
                str(sync),
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 120
        while not all((sync / f"ready-{i}").exists() for i in range(2)):
            assert time.time() < deadline, "children never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (sync / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err[-2000:]}"
    flags = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    want = spec.reference_scores(X, margin=False)
    for i in range(2):
        assert_scores_close(np.load(sync / f"out-{i}.npy"), want, X, f"process {i}")
    # one consistent entry: each compiled backend built once, published whole
    entries = _entries(cache_dir)
    assert len(entries) == 1, entries
    entry = entries[0]
    assert _leftovers(entry) == []
    built = [name for name in ("numba", "tl2cgen") if (entry / f"{name}.json").exists()]
    assert built
    for name in built:
        from_cache = [f[name] for f in flags if name in f]
        assert sorted(from_cache) == [False, True], f"{name} built {from_cache.count(False)} times"
    assert len(list(entry.glob("rtb_tl2cgen_*.so"))) == (1 if "tl2cgen" in built else 0)
    # and the entry serves a third load straight from the cache
    m = rtbserve.load_model(spec.path, backend=backend, cache_dir=cache_dir)
    assert all(r["from_cache"] for n, r in m.reports.items() if n in ("numba", "tl2cgen"))
    _check(m, spec, "third load")


# --------------------------------------------------------------------------- autotune


def test_autotune_json_is_written_and_reused(zoo, cache_dir):
    spec = zoo[MODEL]
    first = rtbserve.load_model(spec.path, cache_dir=cache_dir)
    entry = _entry(spec.path, cache_dir)
    saved = json.loads(_autotune_file(entry).read_text())
    assert saved["policy"] == "fast"
    assert saved["model_sha256"] == ArtifactStore(spec.path, cache_dir=cache_dir).sha256
    assert "numba" in saved["candidates"] and "xgboost" in saved["candidates"]
    assert len(saved["choice"]) == 4 and set(saved["choice"]) <= set(saved["candidates"])
    assert set(saved["timings_s"]) == {"1", "8", "64", "1024"}
    assert list(first.bucket_backends.values()) == saved["choice"]

    second = rtbserve.load_model(spec.path, cache_dir=cache_dir)
    assert second.autotune_timings == saved["timings_s"]  # not timed again
    assert second.bucket_backends == first.bucket_backends

    # the saved choice is what gets served: edit it and the next load follows it
    saved["choice"] = ["xgboost", "numba", "xgboost", "numba"]
    _autotune_file(entry).write_text(json.dumps(saved))
    third = rtbserve.load_model(spec.path, cache_dir=cache_dir)
    assert list(third.bucket_backends.values()) == saved["choice"]
    assert third.backend == "xgboost+numba"
    for n in (1, 2, 5, 40, 700):  # every bucket
        X = spec.random_rows(n, np.random.default_rng(n))
        assert_scores_close(
            third.predict(X), spec.reference_scores(X, margin=False), X, f"{n} rows"
        )


def test_autotune_policy_full_times_tl2cgen_too(zoo, cache_dir):
    spec = zoo[MODEL]
    rtbserve.load_model(spec.path, cache_dir=cache_dir)
    m = rtbserve.load_model(spec.path, autotune_policy="full", cache_dir=cache_dir)
    entry = _entry(spec.path, cache_dir)
    saved = json.loads(_autotune_file(entry, "full").read_text())
    assert saved["policy"] == "full"
    assert json.loads(_autotune_file(entry, "fast").read_text())["policy"] == "fast"  # kept
    assert {"numba", "tl2cgen", "xgboost"} <= set(saved["candidates"])
    assert set(m.autotune_timings["1"]) >= {"numba", "tl2cgen"}
    _check(m, spec, "full")


@pytest.mark.parametrize(
    "bad",
    [
        '{"choice": ',
        "[]",
        '{"policy": "fast", "choice": ["nope", "nope", "nope", "nope"]}',
        "SHA",
        '{"policy": "fast", "choice": ["lightgbm", "lightgbm", "lightgbm", "lightgbm"]}',
    ],
)
def test_broken_autotune_json_is_retuned(zoo, cache_dir, bad):
    spec = zoo[MODEL]
    rtbserve.load_model(spec.path, cache_dir=cache_dir)
    path = _autotune_file(_entry(spec.path, cache_dir))
    sha = json.loads(path.read_text())["model_sha256"]
    path.write_text(
        bad.replace("SHA", "{}").replace('"policy"', f'"model_sha256": "{sha}", "policy"')
    )
    m = rtbserve.load_model(spec.path, cache_dir=cache_dir)
    saved = json.loads(path.read_text())
    assert saved["choice"] == list(m.bucket_backends.values())
    assert set(saved["choice"]) <= {"numba", "xgboost"}
    _check(m, spec, "retuned")


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(ArtifactError, match="not writable"):
        rtbserve.load_model(
            Path(__file__).resolve().parent.parent / "models" / "rtb-filter",
            cache_dir=blocker / "cache",
        )
