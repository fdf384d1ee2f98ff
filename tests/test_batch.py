"""``rtbserve batch``: every input format scores exactly as ``Model.predict``, output is atomic.

The CLI function runs in process (``cmd_batch`` with a parser built by ``add_batch_parser``) on
the demo model served by ``numba`` for every batch size, so a chunk's scores and a whole-matrix
``predict`` come from the same kernel and must be bit-identical.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from rtbserve import load_model
from rtbserve.batch import ProgressReporter, add_batch_parser

DEMO = Path(__file__).resolve().parent.parent / "models" / "rtb-filter"
N_FEATURES = 67


@pytest.fixture(scope="module")
def model(session_cache: Path) -> Any:
    return load_model(DEMO, backend="numba", cache_dir=session_cache)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """1,000 demo-like float32 rows: sample rows with noise, ~10% NaN, a few +-inf."""
    sample = np.genfromtxt(DEMO / "sample.csv", delimiter=",", dtype=np.float64)
    rng = np.random.default_rng(7)
    X = sample[rng.integers(0, len(sample), 1000)] * rng.normal(1.0, 0.05, (1000, N_FEATURES))
    X[rng.random(X.shape) < 0.1] = np.nan
    X[3, 5], X[4, 6] = np.inf, -np.inf
    return X.astype(np.float32)


def run_batch(*argv: Any, cache: Path, stderr: io.StringIO | None = None) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="rtbserve")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["batch", *map(str, argv), "--cache-dir", str(cache), "--backend", "numba"]
    )
    err = stderr if stderr is not None else io.StringIO()
    code = args.func(args, stderr=err)
    return code, err.getvalue()


def feature_table(X: np.ndarray, *, nulls: bool = True) -> pa.Table:
    """Columns f0.. as float32, NaN cells as Arrow nulls (nulls=True) or NaN values."""
    cols = {
        f"f{j}": pa.array(X[:, j], mask=np.isnan(X[:, j]) if nulls else None)
        for j in range(X.shape[1])
    }
    return pa.table(cols)


def scores_of(path: Path, column: str = "score") -> np.ndarray:
    return pq.read_table(path).column(column).to_numpy()


def test_parquet_append_scores_equal_predict(tmp_path, model, rows, session_cache):
    src = tmp_path / "in.parquet"
    table = feature_table(rows).append_column("request_id", pa.array(np.arange(len(rows))))
    table = table.append_column("bid_floor", pa.array(["x"] * len(rows)))
    pq.write_table(table, src, row_group_size=300)
    out = tmp_path / "out.parquet"
    code, err = run_batch(
        DEMO, src, out, "--batch-rows", 128, "--drop-columns", "request_id", "--quiet",
        cache=session_cache,
    )  # fmt: skip
    assert code == 0, err
    assert err == ""
    got = pq.read_table(out)
    assert got.column_names == [*table.column_names, "score"]
    assert got.drop_columns(["score"]).equals(table)  # inputs pass through unchanged
    np.testing.assert_array_equal(got.column("score").to_numpy(), model.predict(rows))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parquet_scores_only_with_nan_values(tmp_path, model, rows, session_cache):
    src = tmp_path / "in.parquet"
    pq.write_table(feature_table(rows, nulls=False), src)
    out = tmp_path / "scores.parquet"
    code, err = run_batch(DEMO, src, out, "--scores-only", "--batch-rows", 333, cache=session_cache)
    assert code == 0, err
    got = pq.read_table(out)
    assert got.column_names == ["score"]
    np.testing.assert_array_equal(got.column("score").to_numpy(), model.predict(rows))


def test_label_and_margin_outputs(tmp_path, model, rows, session_cache):
    src = tmp_path / "in.parquet"
    pq.write_table(feature_table(rows), src)
    for output, column in (("label", "bid"), ("margin", "margin")):
        out = tmp_path / f"{output}.parquet"
        code, err = run_batch(
            DEMO, src, out, "--output", output, "--score-column", column, "--scores-only",
            cache=session_cache,
        )  # fmt: skip
        assert code == 0, err
        got = pq.read_table(out).column(column)
        want = model.predict(rows, output=output)
        assert got.type == pa.from_numpy_dtype(want.dtype)
        np.testing.assert_array_equal(got.to_numpy(), want)


def _csv_token(v: float, rng: np.random.Generator) -> str:
    if np.isnan(v):
        return str(rng.choice(["", " ", "nan", "NaN"]))
    if np.isinf(v):
        return "inf" if v > 0 else "-Infinity"
    style = rng.integers(0, 4)
    if style == 0:
        return repr(float(v))
    if style == 1:
        return f"{float(v):.9g}"
    if style == 2:
        return f" {float(v):.3e} "  # spaces around a field are ignored
    return f"{float(v):.17g}"  # more digits than float32 holds: rounds as float() then float32


def _online_value(token: str) -> np.float32:
    token = token.strip()
    return np.float32("nan") if not token else np.float32(float(token))


@pytest.mark.parametrize("header", [True, False])
def test_csv_values_parse_as_the_online_path(tmp_path, model, rows, session_cache, header):
    rng = np.random.default_rng(3)
    tokens = [[_csv_token(v, rng) for v in row] for row in rows.astype(np.float64)]
    tokens[0][0] = "16777217"  # an integer float32 cannot hold: rounds to 16777216
    lines = [",".join(t) for t in tokens]
    if header:
        lines.insert(0, ",".join(f"c{j}" for j in range(N_FEATURES)))
    src = tmp_path / "in.csv"
    src.write_text("\n".join(lines) + "\n")
    X = np.array([[_online_value(t) for t in row] for row in tokens], dtype=np.float32)
    out = tmp_path / "out.parquet"
    extra = [] if header else ["--no-header"]
    code, err = run_batch(DEMO, src, out, *extra, "--batch-rows", 256, cache=session_cache)
    assert code == 0, err
    got = pq.read_table(out)
    np.testing.assert_array_equal(got.column("score").to_numpy(), model.predict(X))
    first = got.column_names[0]
    assert first == ("c0" if header else "f0")
    # features pass through as their float64 values; float32 of them is the model's input
    np.testing.assert_array_equal(
        np.column_stack([got.column(j).to_numpy() for j in range(N_FEATURES)]).astype(np.float32),
        X,
    )


def test_csv_in_csv_out_scores_round_trip(tmp_path, model, rows, session_cache):
    src = tmp_path / "in.csv"
    np.savetxt(src, rows, delimiter=",", fmt="%.9g")
    text = src.read_text().replace("nan", "")  # empty fields are missing values
    src.write_text(text)
    X = np.genfromtxt(src, delimiter=",", dtype=np.float64).astype(np.float32)
    out = tmp_path / "out.csv"
    code, err = run_batch(DEMO, src, out, "--no-header", "--scores-only", cache=session_cache)
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert lines[0] == '"score"'
    got = np.array([np.float32(v) for v in lines[1:]])
    np.testing.assert_array_equal(got, model.predict(X))


def test_json_lines(tmp_path, model, rows, session_cache):
    src = tmp_path / "in.jsonl"
    names = [f"f{j}" for j in range(N_FEATURES)]
    with src.open("w") as f:
        for i, row in enumerate(rows.astype(np.float64)):
            doc: dict[str, Any] = {"id": f"r{i}"}
            for name, v in zip(names, row, strict=True):
                # JSON has no NaN: null; whole numbers as ints in some rows (column types mix)
                doc[name] = None if not np.isfinite(v) else (int(v) if v == int(v) else v)
            f.write(json.dumps(doc) + "\n")
    X = rows.copy()
    X[~np.isfinite(X)] = np.nan
    out = tmp_path / "out.parquet"
    code, err = run_batch(DEMO, src, out, "--columns", ",".join(names), cache=session_cache)
    assert code == 0, err
    got = pq.read_table(out)
    assert got.column("id").to_pylist()[:2] == ["r0", "r1"]
    np.testing.assert_array_equal(got.column("score").to_numpy(), model.predict(X))
    # a feature that is not a number: the error names the line
    lines = src.read_text().splitlines()
    lines[600] = lines[600].replace('"f3": ', '"f3": "3", "x": ', 1)
    src.write_text("\n".join(lines) + "\n")
    code, err = run_batch(DEMO, src, out, "--columns", ",".join(names), cache=session_cache)
    assert code == 2
    assert "in.jsonl: line 601: feature 'f3' is '\"3\"', not a number" in err, err


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_ipc(tmp_path, model, rows, session_cache, kind):
    table = feature_table(rows)
    src = tmp_path / ("in.arrow" if kind == "file" else "in.arrows")
    open_writer = pa.ipc.new_file if kind == "file" else pa.ipc.new_stream
    with open_writer(src, table.schema) as w:
        for batch in table.to_batches(max_chunksize=77):  # small batches: regrouped
            w.write_batch(batch)
    out = tmp_path / "out.parquet"
    code, err = run_batch(DEMO, src, out, "--batch-rows", 200, cache=session_cache)
    assert code == 0, err
    np.testing.assert_array_equal(scores_of(out), model.predict(rows))


def test_directory_of_files_scores_in_sorted_file_order(tmp_path, model, rows, session_cache):
    d = tmp_path / "parts"
    d.mkdir()
    table = feature_table(rows)
    bounds = [0, 1, 250, 600, 1000]  # a 1-row file; sizes that are not chunk multiples
    for k in range(len(bounds) - 1):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        pq.write_table(part, d / f"part-{k:02d}.parquet", row_group_size=100)
    (d / "_SUCCESS").write_text("")
    (d / ".part-00.parquet.crc").write_bytes(b"\0")
    (d / "notes.txt").write_text("not data")
    out = tmp_path / "out.parquet"
    code, err = run_batch(DEMO, d, out, "--batch-rows", 128, cache=session_cache)
    assert code == 0, err
    assert "from 4 files" in err
    np.testing.assert_array_equal(scores_of(out), model.predict(rows))
    assert pq.read_table(out).drop_columns(["score"]).equals(table)


def test_columns_choose_and_order_features(tmp_path, model, rows, session_cache):
    names = [f"f{j}" for j in range(N_FEATURES)]
    table = feature_table(rows)
    shuffled = table.select(list(reversed(names))).append_column("x", pa.array(rows[:, 0]))
    src = tmp_path / "in.parquet"
    pq.write_table(shuffled, src)
    out = tmp_path / "out.parquet"
    code, err = run_batch(DEMO, src, out, "--columns", ",".join(names), cache=session_cache)
    assert code == 0, err
    np.testing.assert_array_equal(scores_of(out), model.predict(rows))


def test_feature_count_mismatch_names_what_was_found(tmp_path, rows, session_cache):
    table = feature_table(rows).append_column("user_id", pa.array(np.arange(len(rows))))
    table = table.append_column("country", pa.array(["fr"] * len(rows)))
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out.parquet"
    code, err = run_batch(DEMO, src, out, cache=session_cache)
    assert code == 2
    assert "expects 67 features, found 68 numeric columns" in err
    assert "f0, f1" in err and "(68 in all)" in err
    assert "country (string)" in err
    assert "--columns" in err and "--drop-columns" in err
    assert not out.exists()
    code, err = run_batch(DEMO, src, out, "--columns", "f0,f1,nope", cache=session_cache)
    assert code == 2 and "no column nope" in err


def test_bad_csv_row_leaves_no_output_and_names_the_line(tmp_path, rows, session_cache):
    lines = [",".join(f"{v:.6g}" if np.isfinite(v) else "" for v in row) for row in rows] * 20
    fields = lines[15_000].split(",")
    fields[12] = "12x"
    lines[15_000] = ",".join(fields)
    src = tmp_path / "in.csv"
    src.write_text("\n".join(lines) + "\n")  # ~7 MB: the bad row is in a later CSV block
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous run")  # an older output stays as it was
    code, err = run_batch(
        DEMO, src, out, "--no-header", "--batch-rows", 1000, "--progress-interval-s", 0,
        cache=session_cache,
    )  # fmt: skip
    assert code == 2
    assert err.splitlines()[-1].endswith("in.csv: line 15001, column 13: '12x' is not a number")
    assert "rtbserve batch: 1,000 rows, " in err  # chunks before the bad one were written
    assert out.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.parquet"]


def test_ragged_csv_row_names_the_line(tmp_path, rows, session_cache):
    lines = ["a" + ",b" * (N_FEATURES - 1)]
    lines += [",".join("1" for _ in range(N_FEATURES))] * 50
    lines.insert(31, ",".join("1" for _ in range(N_FEATURES - 1)))
    src = tmp_path / "in.csv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.csv"
    code, err = run_batch(DEMO, src, out, "--quiet", cache=session_cache)
    assert code == 2
    assert "line 32 has 66 fields, expected 67" in err
    assert not out.exists()


def test_progress_lines_when_stderr_is_not_a_tty(tmp_path, rows, session_cache):
    src = tmp_path / "in.parquet"
    pq.write_table(feature_table(rows), src)
    out = tmp_path / "out.parquet"
    code, err = run_batch(
        DEMO, src, out, "--batch-rows", 250, "--progress-interval-s", 0, cache=session_cache
    )
    assert code == 0, err
    lines = err.splitlines()
    assert "\r" not in err
    assert len(lines) == 5  # one line per chunk, then the summary
    for n, line in zip((250, 500, 750, 1000), lines, strict=False):
        assert line.startswith(f"rtbserve batch: {n:,} / 1,000 rows ({n / 10:.1f}%), ")
        assert line.endswith(" s") and " rows/s, " in line
    assert lines[-1].startswith("rtbserve batch: scored 1,000 rows from 1 file in ")
    assert lines[-1].endswith(f"-> {out}")
    code, err = run_batch(DEMO, src, out, "--quiet", cache=session_cache)
    assert code == 0 and err == ""


def test_progress_redraws_in_place_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    reporter = ProgressReporter(stream, total_rows=None)
    reporter.t0 -= 1.0
    reporter._last -= 1.0
    reporter.update(500)
    text = stream.getvalue()
    assert text.startswith("\rrtbserve batch: 500 rows, ") and text.endswith("\x1b[K")
    assert "\n" not in text


def test_multiclass_scores_get_one_column_per_class(tmp_path, session_cache):
    xgb = pytest.importorskip("xgboost")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1},
        xgb.DMatrix(X, label=y),
        num_boost_round=5,
    )
    model_path = tmp_path / "multi.json"
    booster.save_model(model_path)
    src = tmp_path / "in.parquet"
    pq.write_table(feature_table(X), src)
    out = tmp_path / "out.csv"
    code, err = run_batch(model_path, src, out, "--scores-only", cache=session_cache)
    assert code == 0, err
    got = pacsv.read_csv(out)
    assert got.column_names == ["score_0", "score_1", "score_2"]
    want = load_model(model_path, backend="numba", cache_dir=session_cache).predict(X)
    # the shortest text that round-trips each float32, read as float64, rounds back to it
    got_scores = np.column_stack([c.to_numpy() for c in got.columns]).astype(np.float32)
    np.testing.assert_array_equal(got_scores, want)


def test_clear_errors_for_paths_and_flags(tmp_path, rows, session_cache):
    src = tmp_path / "in.parquet"
    pq.write_table(feature_table(rows), src)
    scored = tmp_path / "scored.parquet"
    pq.write_table(feature_table(rows).append_column("score", pa.array(rows[:, 0])), scored)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"caf\xe9,1\n1,2\n")
    out = tmp_path / "o.parquet"
    cases = [
        ((src, tmp_path / "out.txt"), "cannot tell the output format"),
        ((tmp_path / "missing.csv", out), "input " + str(tmp_path / "missing.csv")),
        ((src, tmp_path / "nodir" / "o.csv"), "output directory"),
        ((src, out, "--batch-rows", 0), "batch rows must lie in [1, "),
        ((src, out, "--drop-columns", "f0"), "expects 67 features, found 66 numeric columns left"),
        ((scored, out, "--drop-columns", "score"), "already has a column 'score'"),
        ((src, src), "is also an input"),
        ((latin1, out), "line 1 is not UTF-8"),
        ((DEMO / "sample.csv", out), "line 1 is numbers, not a header"),
        ((src, out, "--input-format", "json"), "line 1: not JSON"),
    ]
    for argv, message in cases:
        code, err = run_batch(DEMO, *argv, "--quiet", cache=session_cache)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert not out.exists()
