"""Batch scoring benchmark: ``rtbserve batch`` Parquet -> Parquet, end to end, against a plain
pyarrow + XGBoost script, both in this process.

Usage::

    python -m bench.batch [--rows N] [--quick] [--repeats R] [--json PATH]

The input is a Parquet file of N demo-like rows (default 2,000,000; ``--quick`` 500,000): rows
resampled from ``models/rtb-filter/sample.csv`` with noise (``bench.models.bench_rows``), then
~10% of the cells set to null, written with pyarrow's defaults (snappy, dictionary pages) in row
groups of 262,144 rows. It is generated once into ``bench/.cache/``.

Each repeat runs, in an order that alternates between repeats:

- ``rtbserve batch``: ``rtbserve.batch.score_files`` (the engine of the CLI command; the model is
  loaded once, outside the timing) with the CLI's defaults: append the score to every input column.
- ``rtbserve batch --scores-only``: the same, writing the score column alone.
- the baseline: ``pq.read_table`` + ``Booster.inplace_predict(table)`` (XGBoost on every usable
  core) + ``append_column`` + ``pq.write_table`` with pyarrow's defaults. It holds the whole file in
  memory; ``rtbserve batch`` streams.

Every figure is rows/s end to end (file in -> file on disk, fsync included for rtbserve, which
renames atomically), as median [min-max] over the repeats, with the cores this process used and
the cores other processes used meanwhile (from ``/proc/stat``): the 2-core machine is shared, so
read a figure together with its "others" column and with rows per CPU-second of this process. A
CPU-time breakdown measured in the same run (each stage alone: Parquet read + float32 rows, the
compiled model, Parquet write) gives the rate two idle cores could reach with perfect overlap,
which is what bounds the end-to-end figure.
Results go to ``bench/results/batch.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import models as bm
from bench.core import PERSISTENT_CACHE, CpuMeter, _loadavg, fmt_rate, host_facts, print_host

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "batch.json"
DEMO = bm.REPO / "models" / "rtb-filter"
INPUT_VERSION = 1  # bump when the generator changes: the cached input is regenerated
ROW_GROUP_ROWS = 262_144
NULL_FRACTION = 0.10
SEED = 2024
TARGET_ROWS_PER_S = 1_000_000
BREAKDOWN_ROWS = 500_000  # the stage breakdown reads this many rows of the input


# --------------------------------------------------------------------------- input


def input_path(rows: int) -> Path:
    return bm.CACHE_DIR / f"batch-input-v{INPUT_VERSION}-{rows}-{SEED}.parquet"


def make_input(rows: int) -> Path:
    """The benchmark's Parquet input (generated once, written atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = input_path(rows)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f["name"] for f in json.loads((DEMO / "features.json").read_text())["features"]]
    rng = np.random.default_rng(SEED)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    writer = None
    try:
        for k, start in enumerate(range(0, rows, ROW_GROUP_ROWS)):
            n = min(ROW_GROUP_ROWS, rows - start)
            X = bm.bench_rows("demo", n, seed=SEED + k)  # noqa: N806
            nulls = rng.random(X.shape) < NULL_FRACTION
            table = pa.table(
                [
                    pa.array(X[:, j], mask=nulls[:, j] | np.isnan(X[:, j]))
                    for j in range(len(names))
                ],
                names=names,
            )
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)  # pyarrow's defaults
            writer.write_table(table)
        assert writer is not None
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- measurement


class PeakRss:
    """Peak private resident memory (RssAnon: not the page cache behind mapped input files) of
    this process during a span, sampled every 5 ms; ``growth_mb`` is above the start."""

    def __enter__(self) -> PeakRss:
        self.start_mb = self._rss_mb()
        self.peak_mb = self.start_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1e3  # kB
        return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


def timed(run: Any) -> dict[str, Any]:
    gc.collect()
    with PeakRss() as rss, CpuMeter() as cpu:
        t0 = time.perf_counter()
        extra = run()
        wall = time.perf_counter() - t0
    out = {
        "seconds": wall,
        "own_cores": round(cpu.own, 2),
        "other_cores": None if cpu.others is None else round(cpu.others, 2),
        "cpu_s": cpu.own * wall,
        "peak_rss_growth_mb": round(rss.growth_mb, 1),
    }
    if isinstance(extra, dict):
        out.update(extra)
    return out


def run_rtbserve(model: Any, src: Path, out: Path, *, scores_only: bool) -> dict[str, Any]:
    from rtbserve.batch import BatchOptions, score_files

    result = score_files(model, src, out, BatchOptions(scores_only=scores_only))
    return {"rows": result.rows, "stage_busy_s": result.stage_busy_s}


def run_baseline(booster: Any, src: Path, out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    scores = booster.inplace_predict(table)
    pq.write_table(table.append_column("score", [scores]), out)
    return {"rows": table.num_rows}


def stage_breakdown(model: Any, src: Path, out_dir: Path) -> dict[str, Any]:
    """CPU seconds per million rows of each stage run alone on ``BREAKDOWN_ROWS`` rows, and the
    end-to-end rate they allow on the usable cores with perfect overlap."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rtbserve.batch import DEFAULT_BATCH_ROWS, RowsBuilder

    builder = RowsBuilder(model.n_features, DEFAULT_BATCH_ROWS)
    chunks: list[tuple[Any, np.ndarray]] = []

    def read(*, rows: bool, keep: bool) -> None:
        have = 0
        for batch in pq.ParquetFile(src, memory_map=True).iter_batches(
            batch_size=DEFAULT_BATCH_ROWS
        ):
            if rows:  # the columns are float32 already: what rtbserve.batch hands the builder
                X = np.empty((batch.num_rows, model.n_features), np.float32)  # noqa: N806
                builder.fill(batch.columns, X)
                if keep:
                    chunks.append((batch, X))
            have += batch.num_rows
            if have >= BREAKDOWN_ROWS:
                break

    scored: list[np.ndarray] = []

    def score() -> None:
        scored.extend(model.predict(X) for _, X in chunks)

    def write() -> None:
        schema = chunks[0][0].schema.append(pa.field("score", pa.float32()))
        with pq.ParquetWriter(
            out_dir / "breakdown.parquet", schema, use_dictionary=False, write_statistics=["score"]
        ) as w:
            for (batch, _), s in zip(chunks, scored, strict=True):
                table = pa.Table.from_batches([batch]).append_column("score", pa.array(s))
                w.write_table(table, row_group_size=table.num_rows)

    read(rows=True, keep=False)  # warm-up: numba's cached transpose kernel
    stages = {
        "parquet read": timed(lambda: read(rows=False, keep=False)),
        "read + float32 rows": timed(lambda: read(rows=True, keep=False)),
    }
    read(rows=True, keep=True)
    stages["predict (compiled model)"] = timed(score)
    stages["parquet write (append)"] = timed(write)
    rows = sum(len(X) for _, X in chunks)
    per_m = {k: v["cpu_s"] * 1e6 / rows for k, v in stages.items()}
    total = (
        per_m["read + float32 rows"]
        + per_m["predict (compiled model)"]
        + per_m["parquet write (append)"]
    )
    cores = host_facts()["usable_cores"]
    return {
        "rows": rows,
        "cpu_s_per_million_rows": per_m,
        "cores": cores,
        "bound_rows_per_s_append": cores / total * 1e6,
        "bound_rows_per_s_scores_only": cores
        / (per_m["read + float32 rows"] + per_m["predict (compiled model)"])
        * 1e6,
        "kernel_only_rows_per_s": cores / per_m["predict (compiled model)"] * 1e6,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="input rows (default 2M; quick 500k)")
    ap.add_argument("--quick", action="store_true", help="500,000 rows unless --rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    rows = args.rows or (500_000 if args.quick else 2_000_000)

    import xgboost as xgb

    import rtbserve

    host = host_facts()
    load_start = _loadavg()
    print(f"rtbserve batch benchmark: {rows:,} rows, {args.repeats} repeats")
    print_host(host, load_start, None)
    t = time.perf_counter()
    src = make_input(rows)
    print(f"input {src} ({src.stat().st_size / 1e6:.0f} MB; {time.perf_counter() - t:.1f} s)")
    model = rtbserve.load_model(DEMO, cache_dir=PERSISTENT_CACHE)
    booster = xgb.Booster(model_file=str(DEMO / "model.json"))
    booster.set_param({"nthread": host["usable_cores"]})
    print(f"model {model!r}")
    sys.stdout.flush()

    runs: dict[str, list[dict[str, Any]]] = {"rtbserve": [], "rtbserve_scores_only": [], "xgb": []}
    with tempfile.TemporaryDirectory(prefix="rtb-bench-batch-", dir=bm.CACHE_DIR) as tmp:
        out_dir = Path(tmp)
        # warm-up: numba's cached kernels, pyarrow's first-use costs, the page cache
        run_rtbserve(model, src, out_dir / "warm.parquet", scores_only=False)
        plan = {
            "rtbserve": lambda: run_rtbserve(
                model, src, out_dir / "rtb.parquet", scores_only=False
            ),
            "rtbserve_scores_only": lambda: run_rtbserve(
                model, src, out_dir / "rtb-scores.parquet", scores_only=True
            ),
            "xgb": lambda: run_baseline(booster, src, out_dir / "xgb.parquet"),
        }
        for r in range(args.repeats):
            order = list(plan) if r % 2 == 0 else list(reversed(plan))
            for name in order:
                res = timed(plan[name])
                res["rows_per_s"] = res["rows"] / res["seconds"]
                runs[name].append(res)
                print(
                    f"  repeat {r + 1} {name:<22} {fmt_rate(res['rows_per_s']):>7} rows/s "
                    f"({res['seconds']:.2f} s; cores: own {res['own_cores']}, "
                    f"others {res['other_cores']})",
                    flush=True,
                )
        import pyarrow.parquet as pq

        ours = pq.read_table(out_dir / "rtb.parquet", columns=["score"]).column(0).to_numpy()
        ref = pq.read_table(out_dir / "xgb.parquet", columns=["score"]).column(0).to_numpy()
        max_diff = float(np.max(np.abs(ours.astype(np.float64) - ref)))
        breakdown = stage_breakdown(model, src, out_dir)

    figures = {name: spread([r["rows_per_s"] for r in rs]) for name, rs in runs.items()}
    ratios = [
        a["rows_per_s"] / b["rows_per_s"]
        for a, b in zip(runs["rtbserve"], runs["xgb"], strict=True)
    ]
    figures["ratio"] = spread(ratios)
    median = figures["rtbserve"]["median"]
    passed = median >= TARGET_ROWS_PER_S

    print()
    print(
        f"{'':<34}{'rows/s median':>14}{'[min - max]':>22}{'cores own/others':>20}"
        f"{'rows per CPU-s':>16}"
    )
    labels = {
        "rtbserve": "rtbserve batch (append)",
        "rtbserve_scores_only": "rtbserve batch --scores-only",
        "xgb": "pyarrow + xgboost + pyarrow",
    }
    for name, label in labels.items():
        f = figures[name]
        own = statistics.median(r["own_cores"] for r in runs[name])
        others = [r["other_cores"] for r in runs[name] if r["other_cores"] is not None]
        other = f"{statistics.median(others):.2f}" if others else "-"
        # rows per second of this process's CPU: the figure other processes move least
        per_cpu = statistics.median(r["rows"] / r["cpu_s"] for r in runs[name] if r["cpu_s"])
        figures[name]["rows_per_cpu_s"] = per_cpu
        print(
            f"{label:<34}{fmt_rate(f['median']):>14}"
            f"{'[' + fmt_rate(f['min']) + ' - ' + fmt_rate(f['max']) + ']':>22}"
            f"{f'{own:.2f} / {other}':>20}{fmt_rate(per_cpu):>16}"
        )
    f = figures["ratio"]
    span = f"[{f['min']:.1f}x - {f['max']:.1f}x]"
    print(f"{'ratio rtbserve / baseline':<34}{f['median']:>13.1f}x{span:>22}")
    rss = [r["peak_rss_growth_mb"] for r in runs["rtbserve"]]
    rss_base = [r["peak_rss_growth_mb"] for r in runs["xgb"]]
    print(
        f"peak memory growth: rtbserve {max(rss):.0f} MB (streaming), baseline "
        f"{max(rss_base):.0f} MB (whole file); max |score - xgboost| {max_diff:.2g}"
    )
    busy = runs["rtbserve"][-1]["stage_busy_s"]
    print(
        "rtbserve stage busy seconds (last repeat): "
        + ", ".join(f"{k} {v:.2f}" for k, v in busy.items())
    )
    per_m = breakdown["cpu_s_per_million_rows"]
    print(f"\nCPU seconds per million rows, each stage alone ({breakdown['rows']:,} rows):")
    for k, v in per_m.items():
        print(f"  {k:<28}{v:>6.2f}")
    print(
        f"  => on {breakdown['cores']} idle cores with perfect overlap at most "
        f"{fmt_rate(breakdown['bound_rows_per_s_append'])} rows/s (append), "
        f"{fmt_rate(breakdown['bound_rows_per_s_scores_only'])} (scores only); the model "
        f"alone {fmt_rate(breakdown['kernel_only_rows_per_s'])}"
    )
    print(
        f"\ntarget: >= {fmt_rate(TARGET_ROWS_PER_S)} rows/s end to end (append, median): "
        f"{'PASS' if passed else 'FAIL'} ({fmt_rate(median)})"
    )
    load_end = _loadavg()
    print_host(host, load_start, load_end)

    doc = {
        "rows": rows,
        "repeats": args.repeats,
        "input": {"path": str(src), "bytes": src.stat().st_size, "null_fraction": NULL_FRACTION},
        "model": repr(model),
        "host": host,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
        "figures": figures,
        "max_abs_diff_vs_xgboost": max_diff,
        "breakdown": breakdown,
        "target": {"rows_per_s": TARGET_ROWS_PER_S, "median": median, "passed": passed},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
