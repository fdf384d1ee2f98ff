"""The command line, run as a user would: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import xgboost as xgb

DEMO = Path(__file__).resolve().parent.parent / "models" / "rtb-filter"


def run_cli(*args, cache, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "rtbserve.cli", *args, "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def test_compile_prints_verification_report(tmp_path):
    proc = run_cli("compile", str(DEMO), cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "verification passed" in out
    assert "rows checked" in out
    assert "decision flips     0" in out
    assert "autotune" in out


def test_compile_json_report_and_cache_hit(tmp_path):
    first = json.loads(run_cli("compile", str(DEMO), "--json", cache=tmp_path).stdout)
    second = json.loads(run_cli("compile", str(DEMO), "--json", cache=tmp_path).stdout)
    assert first["n_features"] == 67
    numba = first["backends"]["numba"]
    assert numba["report"]["passed"] and numba["report"]["rows_checked"] > 1000
    assert not numba["from_cache"]
    assert second["backends"]["numba"]["from_cache"]
    assert second["backends"]["numba"]["quick_check"]["passed"]


def test_predict_matches_xgboost(tmp_path):
    csv = (DEMO / "sample.csv").read_text()
    proc = run_cli("predict", str(DEMO), "--csv", "-", cache=tmp_path, stdin=csv)
    assert proc.returncode == 0, proc.stderr
    got = np.array([float(v) for v in proc.stdout.split()])
    X = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float32)
    want = xgb.Booster(model_file=str(DEMO / "model.json")).inplace_predict(X)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = run_cli("compile", str(tmp_path / "nope"), cache=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs(tmp_path):
    proc = run_cli("demo", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "scored 100 sample requests" in proc.stdout
