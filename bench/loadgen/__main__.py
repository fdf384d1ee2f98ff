"""``python -m bench.loadgen``: one run or one SLO search against a local server; prints a table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import stats
from bench.loadgen.runner import LoadError, LoadSpec, find_max_rate, run_load
from bench.loadgen.targets import (
    KINDS,
    Target,
    csv_row_to_floats,
    demo_csv_row,
)


def build_parser() -> argparse.ArgumentParser:
    from bench import loadgen

    ap = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description=loadgen.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--host", default="127.0.0.1", help="a loopback address")
    ap.add_argument("--port", type=int, required=True)
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=1000.0, help="open loop: requests/s in total")
    load.add_argument("--max", action="store_true", help="closed loop: back-to-back on each slot")
    load.add_argument(
        "--slo-p99-ms", type=float, help="search the highest open-loop rate with p99 <= this"
    )
    ap.add_argument("--arrivals", choices=("fixed", "poisson"), default="poisson")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    ap.add_argument(
        "--connections",
        type=int,
        default=16,
        help="total over all processes: HTTP connections, concurrent unary calls, or streams",
    )
    ap.add_argument("--procs", type=int, default=1, help="load processes")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-pid", type=int, help="report this process tree's CPU per request")
    ap.add_argument("--json", type=Path, help="also write the result here")
    http = ap.add_argument_group("http")
    http.add_argument("--path", default="/invocations")
    http.add_argument("--body-file", type=Path, help="request body (default: one demo CSV row)")
    http.add_argument("--content-type", default="text/csv")
    http.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    grpc = ap.add_argument_group("grpc")
    grpc.add_argument("--model", default="", help="PredictRequest.model (default: server's)")
    grpc.add_argument("--channels", type=int, default=2, help="channels per process")
    grpc.add_argument("--stream-depth", type=int, default=8, help="in flight per stream")
    search = ap.add_argument_group("SLO search (--slo-p99-ms)")
    search.add_argument("--steps", type=int, default=6)
    search.add_argument("--hi", type=float, help="highest rate tried (default: 1.2x max probe)")
    return ap


def target_from_args(args: argparse.Namespace) -> Target:
    row = demo_csv_row()
    if args.kind == "http":
        body = args.body_file.read_bytes() if args.body_file else (row + "\n").encode()
        headers = [("accept", "text/csv")]
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                raise SystemExit(f"--header: expected 'name: value', got {h!r}")
            headers.append((name.strip(), value.strip()))
        return Target(
            "http", args.port, args.host, path=args.path, body=body,
            content_type=args.content_type, headers=tuple(headers),
        )  # fmt: skip
    rows = tuple(csv_row_to_floats(row))
    return Target(
        args.kind, args.port, args.host, rows=rows, n_features=len(rows), model=args.model
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = target_from_args(args)
        spec = LoadSpec(
            mode="max" if args.max else "rate", rate=args.rate, arrivals=args.arrivals,
            duration_s=args.duration, warmup_s=args.warmup, connections=args.connections,
            procs=args.procs, timeout_s=args.timeout, channels=args.channels,
            stream_depth=args.stream_depth, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        print(f"bench.loadgen: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.slo_p99_ms is not None:
            doc = find_max_rate(
                target, spec, args.slo_p99_ms, hi=args.hi, steps=args.steps,
                step_s=args.duration, server_pid=args.server_pid,
            )  # fmt: skip
            print_search(doc)
        else:
            doc = run_load(target, spec, server_pid=args.server_pid)
            print(stats.format_result(doc))
    except LoadError as exc:
        print(f"bench.loadgen: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


def print_search(doc: dict) -> None:
    if doc["probe"] is not None:
        print(f"closed-loop probe: {stats.fmt_rate(doc['probe']['achieved_rate'])} req/s")
    print(f"{'rate/s':>9}  {'achieved':>9}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>6}  verdict")
    for step in doc["steps"]:
        r = step["result"]
        lat = r["latency_ms"]
        print(
            f"{step['rate']:9.0f}  {r['achieved_rate']:9.0f}  {stats.fmt_ms(lat['p50']):>8}  "
            f"{stats.fmt_ms(lat['p99']):>8}  {r['errors_total']:6d}  "
            f"{'within' if step['passed'] else 'over'}"
        )
    print(f"highest rate with p99 <= {doc['slo_p99_ms']:g} ms: {doc['rate']:.0f} req/s")


if __name__ == "__main__":
    sys.exit(main())
