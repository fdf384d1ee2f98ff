"""Command line: ``rtbserve compile | predict | serve`` and the SageMaker ``serve`` entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtbserve.errors import RtbError
from rtbserve.predictors import BACKEND_NAMES

if TYPE_CHECKING:
    import numpy as np

# numpy and orjson are imported where used: ``serve`` forks its init process (PID 1 in a
# container) before anything starts threads, and numpy's BLAS does at import.

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "rtb-filter"


def demo_model_path() -> Path:
    env = os.environ.get("RTBSERVE_DEMO_MODEL")
    return Path(env) if env else DEMO_MODEL


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument(
        "--autotune",
        default="fast",
        choices=("fast", "full"),
        help="full also compiles and times tl2cgen (seconds of gcc)",
    )
    p.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rtbserve)")
    p.add_argument("--threshold", type=float, default=None)


def _load(args: argparse.Namespace, path: Path) -> Any:
    from rtbserve import load_model

    return load_model(
        path,
        backend=args.backend,
        threshold=args.threshold,
        autotune_policy=args.autotune,
        cache_dir=args.cache_dir,
    )


def cmd_compile(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = _load(args, Path(args.model))
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    report = {
        "model": str(model.path),
        "sha256": model.meta.sha256,
        "format": model.meta.format,
        "objective": model.objective,
        "n_features": model.n_features,
        "n_outputs": model.n_outputs,
        "backend": model.backend,
        "bucket_backends": model.bucket_backends,
        "autotune_seconds_per_call": model.autotune_timings,
        "backends": model.reports,
        "load_ms": round(elapsed_ms, 1),
    }
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"model      {report['model']} ({report['format']}, {model.objective})")
    print(f"sha256     {model.meta.sha256}")
    print(f"shape      {model.n_features} features -> {model.n_outputs} output(s)")
    print(f"serving    {model.backend}  (per batch size: {_buckets(model.bucket_backends)})")
    for name, info in model.reports.items():
        r = info["report"]
        status = "passed" if r["passed"] else "FAILED"
        cached = "from cache" if info["from_cache"] else "built now"
        print(f"\n[{name}] {cached}; verification {status} ({r['kind']})")
        if r["kind"] != "reference":
            print(f"  reference          {r['reference']}")
            print(f"  rows checked       {r['rows_checked']}")
            print(f"  max abs error      {r['max_abs_error']:.3g} (output)")
            print(f"  max abs error      {r['max_abs_error_margin']:.3g} (margin)")
            print(f"  decision flips     {r['decision_flips']} at threshold {r['threshold']}")
            timings = ", ".join(f"{k} {v:.0f} ms" for k, v in r["timings_ms"].items())
            print(f"  timings            {timings}")
        q = info["quick_check"]
        if q:
            err = q["max_scaled_error"]
            print(f"  load-time check    {q['rows_checked']} rows, max error {err:.3g}")
    if model.autotune_timings:
        print("\nautotune (median us per call, one thread)")
        names = sorted({n for per in model.autotune_timings.values() for n in per})
        print("  rows    " + "".join(f"{n:>12}" for n in names))
        for rows, per in model.autotune_timings.items():
            cells = "".join(f"{per[n] * 1e6:>12.2f}" if n in per else f"{'-':>12}" for n in names)
            print(f"  {rows:<7} {cells}")
    print(f"\nloaded in {elapsed_ms:.0f} ms")
    return 0


def _buckets(b: dict[str, str]) -> str:
    return ", ".join(f"{k} rows: {v}" for k, v in b.items())


def _read_rows(path: str, n_features: int) -> np.ndarray:
    import numpy as np

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            rows.append([float(f) if f.strip() else np.nan for f in fields])
        except ValueError as exc:
            raise SystemExit(f"line {i}: not a number: {exc}") from None
    return np.array(rows, dtype=np.float32).reshape(-1, n_features)


def cmd_predict(args: argparse.Namespace) -> int:
    model = _load(args, Path(args.model) if args.model else demo_model_path())
    import numpy as np

    X = _read_rows(args.csv, model.n_features)
    scores = model.predict(X, output=args.output)
    for row in np.atleast_1d(scores):
        print(",".join(map(str, np.atleast_1d(row))))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rtbserve.supervisor import run_as_init_if_pid1

    return run_as_init_if_pid1(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    from rtbserve.config import ServerSettings, discover_models
    from rtbserve.supervisor import run

    try:
        models = discover_models(
            args.model or demo_model_path(),
            backend=None if args.backend == "auto" else args.backend,
        )
        settings = ServerSettings(
            models=tuple(models),
            host=args.host,
            http_port=args.http_port,
            grpc_port=None if args.no_grpc else args.grpc_port,
            metrics_port=args.metrics_port,
            workers=args.workers or len(os.sched_getaffinity(0)),
            cache_dir=args.cache_dir,
            drain_timeout_s=args.drain_timeout_s,
            max_body_bytes=args.max_body_bytes,
            idle_timeout_s=args.idle_timeout_s,
            request_timeout_s=args.request_timeout_s,
        )
        return run(settings)
    except RtbError as exc:  # in the forked child too (PID 1), where main() cannot catch it
        print(f"rtbserve: error: {exc}", file=sys.stderr)
        return 2


def cmd_demo(args: argparse.Namespace) -> int:
    """Score the demo sample in process and report the one-row latency."""
    import numpy as np

    path = Path(args.model) if args.model else demo_model_path()
    t0 = time.perf_counter()
    model = _load(args, path)
    load_ms = (time.perf_counter() - t0) * 1e3
    print(f"loaded {model.path} in {load_ms:.0f} ms: {model!r}")
    print(model.verification.summary())
    sample = model.path.parent / "sample.csv"
    if sample.is_file():
        X = _read_rows(str(sample), model.n_features)
    else:
        X = np.random.default_rng(0).normal(size=(100, model.n_features)).astype(np.float32)
    scores = model.predict(X)
    bids = model.predict(X, output="label")
    print(
        f"scored {len(X)} sample requests: {int(bids.sum())} bid, {len(X) - int(bids.sum())} drop"
    )
    print("first scores:", np.round(np.atleast_1d(scores)[:5], 4).tolist())
    lat = []
    for i in range(10_000):
        x = X[i % len(X) : i % len(X) + 1]
        t = time.perf_counter_ns()
        model.predict(x)
        lat.append(time.perf_counter_ns() - t)
    print(
        f"one-row latency over 10,000 calls: median {np.median(lat) / 1e3:.2f} us, "
        f"p99 {np.percentile(lat, 99) / 1e3:.2f} us"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtbserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile, verify and autotune a model; print the report")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_load_args(p)
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("predict", help="score CSV rows (no header) from a file or stdin")
    p.add_argument("model", nargs="?")
    p.add_argument("--csv", default="-")
    p.add_argument("--output", default="probability", choices=("probability", "margin", "label"))
    _add_load_args(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP and gRPC (default: the bundled demo model)",
        description="MODEL_OR_REPO: a model file, a directory with one model, or a repository "
        "directory with one sub-directory per model (each may hold an rtbserve.toml).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL_OR_REPO")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=9000, help="0 picks a free port")
    p.add_argument("--no-grpc", action="store_true", help="do not serve gRPC")
    p.add_argument("--metrics-port", type=int, default=None, help="a /metrics-only listener")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: CPUs)")
    p.add_argument("--drain-timeout-s", type=float, default=20.0)
    p.add_argument("--max-body-bytes", type=int, default=6 * 1024 * 1024)
    p.add_argument("--idle-timeout-s", type=float, default=60.0)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rtbserve)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="score the demo model's sample in process; print latency")
    p.add_argument("model", nargs="?")
    _add_load_args(p)
    p.set_defaults(func=cmd_demo)
    from rtbserve.batch import add_batch_parser
    from rtbserve.deploy import add_sagemaker_parser

    add_batch_parser(sub)
    add_sagemaker_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ.setdefault("RTBSERVE_LOG_LEVEL", "INFO")  # the workers', for ``serve``
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except RtbError as exc:
        print(f"rtbserve: error: {exc}", file=sys.stderr)
        return 2


def sagemaker_serve(argv: list[str] | None = None) -> int:
    """SageMaker's ``serve``: ``docker run IMAGE serve`` runs this (the image's ENTRYPOINT), as
    configured by SageMaker's environment (``rtbserve.sagemaker``). ``serve compile`` compiles
    and verifies the model into the cache and exits (the image build bakes a model in with it).
    With ``SAGEMAKER_MULTI_MODEL=true`` it starts with no model (SageMaker loads them through
    ``POST /models``). Exit 2 on a bad environment, a missing or bad model, or ``train`` (this
    image only serves)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:  # ENTRYPOINT ["serve"] + SageMaker's "serve" argument
        args = args[1:]
    if args[:1] in (["-h"], ["--help"]):
        from rtbserve.sagemaker import help_text

        print(help_text())
        return 0
    if args[:1] == ["train"]:
        print(
            "serve: error: this image serves models and does not train; use it for SageMaker "
            "endpoints or Batch Transform, not for a training job",
            file=sys.stderr,
        )
        return 2
    if args == ["compile"]:  # the image build: compile and verify the baked-in model
        return _sagemaker_serve(compile_only=True)
    if args:
        print(
            f"serve: error: unexpected arguments {args!r}; usage: serve [serve | compile]",
            file=sys.stderr,
        )
        return 2
    from rtbserve.supervisor import run_as_init_if_pid1

    return run_as_init_if_pid1(_sagemaker_serve)


def _sagemaker_serve(compile_only: bool = False) -> int:
    from rtbserve import sagemaker
    from rtbserve.config import discover_models

    try:
        env = sagemaker.parse_environment(os.environ)
        logging.basicConfig(
            level=env.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        os.environ["RTBSERVE_LOG_LEVEL"] = str(env.log_level)  # the workers' level
        if env.multi_model is not None:
            # models come through POST /models: BASE/model may be empty, nothing to compile
            if compile_only:
                print("multi-model endpoint (SAGEMAKER_MULTI_MODEL=true): models load on demand")
                return 0
            from rtbserve.supervisor import run

            return run(sagemaker.server_settings(env, []))
        path = sagemaker.model_dir(env)
        from rtbserve.deploy import seed_cache

        seed_cache(path)  # model.tar.gz's .rtbserve-cache/ -> the writable RTBSERVE_CACHE_DIR
        settings = sagemaker.server_settings(env, discover_models(path))
        logging.getLogger("rtbserve.cli").info(
            "serving %s: %s", path, ", ".join(m.name for m in settings.models)
        )
        if compile_only:
            from rtbserve.worker import load_models

            for model_settings, model in load_models(settings):
                print(
                    f"model {model_settings.name!r}: {model.backend}, {model.n_features} "
                    f"features, {model.verification.summary()}"
                )
            return 0
        from rtbserve.supervisor import run

        return run(settings)
    except RtbError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
