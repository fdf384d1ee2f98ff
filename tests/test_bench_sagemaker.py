"""bench.sagemaker and its peer stack, without servers or the peer's venv: the peer app's CSV
parsing (run here with rtbserve's numpy), nginx/gunicorn settings, payloads, and the figures,
targets and table built from canned numbers. ``python -m bench.sagemaker`` is the real run."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import sagemaker as sm  # noqa: E402
from bench.sagemaker_stack import app, serve  # noqa: E402

# --------------------------------------------------------------------------- the peer app


@pytest.mark.parametrize(
    ("text", "delimiter"),
    [
        ("1,2,3", ","),
        ("1;2;3", ";"),
        ("1\t2\t3", "\t"),
        ("1|2|3", "|"),
        ("1.5", ","),  # the sniffer answers "5": an alphanumeric guess means ","
        ("1,,3\n4;5;6", ","),  # only the first line is sniffed
    ],
)
def test_sniff_delimiter(text: str, delimiter: str) -> None:
    assert app.sniff_delimiter(text) == delimiter


def test_sniff_reads_only_the_first_512_characters() -> None:
    line = "1" * 600 + ";2"  # the separator lies past the sniffed prefix
    assert app.sniff_delimiter(line) == ","  # prefix "111..." -> an alphanumeric guess -> ","


def test_parse_csv_rows_missing_values_and_whitespace() -> None:
    x = app.parse_csv(b"\n 1,2,3\n4,,6\n\n")
    assert x.dtype == np.float64
    assert x.shape == (2, 3)
    assert x[0].tolist() == [1.0, 2.0, 3.0]
    assert x[1, 0] == 4.0 and math.isnan(x[1, 1]) and x[1, 2] == 6.0


def test_parse_csv_other_delimiter() -> None:
    assert app.parse_csv(b"1;2\n3;4").tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_parse_csv_demo_row_matches_the_bench_reader() -> None:
    line = sm.sample_lines()[0]
    got = app.parse_csv(line.encode()).ravel()
    want = np.array(sm.csv_row_to_floats(line))
    np.testing.assert_array_equal(got, want)  # NaNs in the same places
    assert got.size == 67


@pytest.mark.parametrize("body", [b"1,2\n3,x", b"1,2,3\n4,5", b"1,2\n\n3,4"])
def test_parse_csv_rejects_bad_bodies(body: bytes) -> None:
    with pytest.raises(ValueError):
        app.parse_csv(body)


def test_parse_csv_logs_one_info_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sagemaker_stack"):
        app.parse_csv(b"1,2\n3,4")
        app.parse_csv(b"5;6")
    msgs = [r.getMessage() for r in caplog.records if r.name == "sagemaker_stack"]
    assert msgs == [
        "Determined delimiter of CSV input is ','",
        "Determined delimiter of CSV input is ';'",
    ]


def test_format_scores_one_per_line() -> None:
    assert app.format_scores(np.array([0.25, 0.5], dtype=np.float32)) == "0.25\n0.5\n"


def test_nginx_conf_and_gunicorn_argv() -> None:
    conf = serve.nginx_conf(
        host="127.0.0.1", port=8123, socket="/tmp/x/g.sock", run_dir="/tmp/x",
        log="/tmp/x/log", workers=2, user=None,
    )  # fmt: skip
    assert "listen 127.0.0.1:8123 deferred;" in conf
    assert "server unix:/tmp/x/g.sock;" in conf
    assert "worker_processes 2;" in conf
    assert "client_max_body_size 6m;" in conf
    assert "access_log /tmp/x/log combined;" in conf
    assert "user " not in conf
    as_root = serve.nginx_conf(
        host="127.0.0.1", port=1, socket="s", run_dir="r", log="l", workers=1, user="root"
    )
    assert as_root.startswith("user root;\n")
    argv = serve.gunicorn_argv("/venv/bin/python", "unix:/tmp/x/g.sock", 2)
    joined = " ".join(argv)
    assert "--worker-class gevent" in joined and "--workers 2" in joined
    assert argv[-1] == "app:create_app()"


def test_requirements_are_pinned() -> None:
    reqs = [
        ln.split("#")[0].strip()
        for ln in sm.REQUIREMENTS.read_text().splitlines()
        if ln.split("#")[0].strip()
    ]
    names = {r.split("==")[0].split("[")[0] for r in reqs}
    assert names == {"flask", "gunicorn", "gevent", "xgboost-cpu", "numpy"}
    assert all("==" in r for r in reqs)


# --------------------------------------------------------------------------- payloads


def test_fill_body_fits_the_limit() -> None:
    lines = ["1,2,3", "4,5"]
    body, rows = sm.fill_body(lines, limit=19)
    assert body == b"1,2,3\n4,5\n1,2,3\n" and rows == 3  # the next line (4 bytes) would not fit
    assert sm.fill_body(lines, limit=20) == (body + b"4,5\n", 4)
    body, rows = sm.fill_body(sm.sample_lines())
    assert len(body) <= sm.MAX_PAYLOAD
    assert body.count(b"\n") == rows and rows > 30_000
    sample = sm.sample_lines()
    assert len(body) + len(sample[rows % len(sample)]) + 1 > sm.MAX_PAYLOAD


def test_csv_body_cycles() -> None:
    assert sm.csv_body(["a", "b"], 3) == b"a\nb\na\n"


def test_requests_for() -> None:
    assert sm.requests_for(2.0, 0.5, 1) == 2  # at least 2 per connection
    assert sm.requests_for(2.0, 10.0, 4) == 20
    assert sm.requests_for(2.0, 9.0, 4) == 20  # a whole number per connection
    assert sm.requests_for(100.0, 1e6, 3) == 5001  # capped near 5,000


def test_scores_and_float_csv() -> None:
    assert sm.parse_scores(b"0.5\n0.25\n") == [0.5, 0.25]
    assert sm.max_abs_diff([0.5, 0.25], [0.5, 0.2500001]) == pytest.approx(1e-7)
    with pytest.raises(ValueError):
        sm.max_abs_diff([1.0], [1.0, 2.0])
    row = np.array([0.1, np.nan, 3.0, 1e-8], dtype=np.float32)
    line = sm.float_csv(row)
    assert line.split(",")[1] == ""
    back = np.array(sm.csv_row_to_floats(line), dtype=np.float32)
    np.testing.assert_array_equal(back, row)


# --------------------------------------------------------------------------- figures


CFG = sm.Config(
    quick=True, repeats=2, warmup_s=0.5, duration_s=2.0, open_rate=500.0, big_target_s=2.0,
    big_connections=(1, 2), nginx=True,
)  # fmt: skip


def _h2(rate: float, cpu_us: float, mean_ms: float) -> dict[str, Any]:
    return {
        "achieved_rate": rate,
        "server_cpu_us_per_request": cpu_us,
        "latency_ms": {"mean": mean_ms, "max": 4 * mean_ms},
        "errors_total": 0,
        "other_cores_busy": 0.1,
    }


def _repeat(rtb_rate: float, peer_rate: float) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for c in CFG.row_connections:
        r[f"row1_c{c}_rtbserve"] = _h2(rtb_rate, 30.0, 0.4)
        r[f"row1_c{c}_peer"] = _h2(peer_rate, 1200.0, 5.0)
    r["open_rtbserve"] = {"achieved_rate": 500.0, "latency_ms": {"p50": 0.2, "p99": 0.6}}
    r["open_peer"] = {"achieved_rate": 500.0, "latency_ms": {"p50": 2.0, "p99": 9.0}}
    r["rows64_c8_rtbserve"] = _h2(5000.0, 190.0, 1.6) | {"rows_per_s": 320_000.0}
    r["rows64_c8_peer"] = _h2(400.0, 3800.0, 20.0) | {"rows_per_s": 25_600.0}
    for c in CFG.big_connections:
        r[f"big_c{c}_rtbserve"] = {"rows_per_s": 300_000.0, "mb_per_s": 60.0}
        r[f"big_c{c}_peer"] = {"rows_per_s": 25_000.0 * c, "mb_per_s": 5.0 * c}
    r["runs"] = [v | {"label": k} for k, v in r.items()]
    return r


def test_figures_ratios_and_gates() -> None:
    reps = [_repeat(30_000.0, 1500.0), _repeat(20_000.0, 1600.0)]
    f = sm.figures(reps, CFG)
    ratio = f["row1_c8_rps_ratio"]
    assert ratio["n"] == 2
    assert ratio["min"] == pytest.approx(12.5) and ratio["max"] == pytest.approx(20.0)
    assert ratio["median"] == pytest.approx(16.25)
    assert f["row1_c8_cpu_us_ratio"]["median"] == pytest.approx(40.0)  # peer / rtbserve
    assert f["open_p99_ms_ratio"]["median"] == pytest.approx(15.0)
    assert f["big_c2_rows_s_ratio"]["median"] == pytest.approx(6.0)
    assert f["errors_total"] == 0 and f["failed_runs"] == []
    gl = {g["key"]: g["status"] for g in sm.gates(f, CFG)}
    assert gl == {
        "row1_c8_rps_ratio": "FAIL",
        "row1_c64_rps_ratio": "FAIL",
        "big_c1_rows_s_ratio": "PASS",
        "big_c2_rows_s_ratio": "PASS",
    }


def test_failed_runs_and_missing_figures() -> None:
    rep = _repeat(30_000.0, 1000.0)
    rep["big_c2_rtbserve"] = {"error": "H2loadError: boom", "label": "b  6 MiB rtbserve"}
    rep["runs"].append(rep["big_c2_rtbserve"])
    f = sm.figures([rep], CFG)
    assert f["big_c2_rows_s_rtb"]["n"] == 0 and f["big_c2_rows_s_ratio"]["median"] is None
    assert f["failed_runs"] == ["b  6 MiB rtbserve"]
    gl = {g["key"]: g["status"] for g in sm.gates(f, CFG)}
    assert gl["big_c2_rows_s_ratio"] == "n/a" and gl["row1_c8_rps_ratio"] == "PASS"


def test_table_and_anchors() -> None:
    f = sm.figures([_repeat(30_000.0, 1500.0), _repeat(20_000.0, 1600.0)], CFG)
    gl = sm.gates(f, CFG)
    rows = sm.table_rows(f, CFG, gl)
    first = rows[0]
    assert first[0].startswith("a  1 row, closed loop 8 conns")
    assert first[2:] == ("25.0k [20.0k-30.0k]", "1550 [1500-1600]", "16.2x [12.5x-20.0x]",
                         ">= 20x", "FAIL")  # fmt: skip
    lines = sm.format_table(("figure", "client", "rtbserve", "peer", "ratio", "target", ""), rows)
    assert lines[0].startswith("figure") and len(lines) == len(rows) + 1
    anchor = {
        "row1_h2load": {"achieved_rate": 1000.0, "server_cpu_us_per_request": 1200.0},
        "row1_python": {"achieved_rate": 990.0, "latency_ms": {"p50": 7.8, "p99": 13.8}},
        "rows64_h2load": {"achieved_rate": 468.0},
    }
    al = {a["figure"]: a for a in sm.anchors(f, CFG, anchor)}
    assert al["m200: 1 row p99 ms, 8 conns (python)"]["ratio"] == pytest.approx(2.0)
    assert al["m200: 64 rows req/s, 8 conns (h2load)"]["ratio"] == pytest.approx(0.5)
    assert sm.anchors(f, CFG, {})[0]["peer"] is None  # --no-anchor


def test_cell_formats() -> None:
    assert sm.cell(sm.spread([]), str) == "-"
    assert sm.cell(sm.spread([2.0]), lambda x: f"{x:g}") == "2"
    assert sm.cell(sm.spread([3.0, 1.0, 2.0]), lambda x: f"{x:g}") == "2 [1-3]"
