"""Regenerate ``rtbserve/_proto/`` from ``proto/``, or check that it is up to date.

    python -m rtbserve.transports.grpc.codegen           # rewrite rtbserve/_proto/
    python -m rtbserve.transports.grpc.codegen --check   # exit 1 with a diff summary on drift

grpc_tools.protoc compiles every ``.proto`` in ``PROTOS`` into a temporary tree; the modules are
then flattened into one package and post-processed so they import as ``rtbserve._proto.xxx``:

- protoc's absolute imports (``from rtbserve.v1 import predictor_pb2``) become relative ones, and
  each module registers its classes under its flattened name (pickling, reprs).
- The Open Inference Protocol file declares package ``inference``, which tritonclient, MLServer
  and Triton's own Python code also compile into the process-wide default descriptor pool; two
  files defining ``inference.ModelInferRequest`` there fail at import ("duplicate symbol"). Our
  copy goes into ``rtbserve._proto.PRIVATE_POOL`` instead, so rtbserve and tritonclient can
  share a process (the test-suite does).

The output depends on the grpcio-tools version (its protoc stamps the protobuf and grpcio
versions the code needs), so ``--check`` must run with the version the files were made with.
Not for the serving path: this is a development tool and needs grpcio-tools and ``proto/``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "rtbserve" / "_proto"
OUT_PACKAGE = "rtbserve._proto"
# files under PROTO_DIR, compiled in this order
PROTOS = ("rtbserve/v1/predictor.proto", "kserve/grpc_service.proto")
# generated modules whose descriptors go to PRIVATE_POOL (see the module docstring)
PRIVATE_POOL_MODULES = frozenset({"grpc_service_pb2"})
GENERATED_SUFFIXES = (".py", ".pyi")

_INIT = '''"""Generated gRPC and protobuf modules: do not edit.

Regenerate with ``python -m rtbserve.transports.grpc.codegen`` (the sources are in ``proto/``);
``--check`` reports drift. ``predictor_pb2`` lives in protobuf's default descriptor pool; the
Open Inference Protocol's ``grpc_service_pb2`` (package ``inference``, which other libraries
also compile) lives in ``PRIVATE_POOL``.
"""

from google.protobuf import descriptor_pool as _descriptor_pool

PRIVATE_POOL = _descriptor_pool.DescriptorPool()
'''
_STAMP = "# Post-processed by rtbserve.transports.grpc.codegen; regenerate, do not edit.\n"
_DEFAULT_POOL_ADD = "_descriptor_pool.Default().AddSerializedFile("


def generate_files(proto_dir: Path = PROTO_DIR) -> dict[str, str]:
    """Compile ``PROTOS`` and return the package's files: name -> text (flattened, rewritten).

    Runs protoc in a subprocess (``sys.executable -m grpc_tools.protoc``) so that importing
    grpc_tools never touches the calling process. Raises ``RuntimeError`` with protoc's output
    when it fails.
    """
    missing = [p for p in PROTOS if not (proto_dir / p).is_file()]
    if missing:
        raise RuntimeError(f"missing .proto files under {proto_dir}: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="rtbserve-codegen-") as tmp:
        out = Path(tmp)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=proto_dir)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}):\n{done.stderr}{done.stdout}")
        produced = sorted(p for p in out.rglob("*") if p.suffix in GENERATED_SUFFIXES)
        by_name: dict[str, Path] = {}
        for path in produced:
            if path.name in by_name:
                raise RuntimeError(
                    f"two .proto files generate {path.name}: {by_name[path.name]} and {path}; "
                    "rename one (rtbserve/_proto/ is flat)"
                )
            by_name[path.name] = path
        modules = {Path(name).stem for name in by_name}
        files = {"__init__.py": _INIT}
        for name, path in by_name.items():
            source_module = ".".join(path.relative_to(out).with_suffix("").parts)
            files[name] = _rewrite(path.read_text(), name, source_module, modules)
    return files


def _rewrite(text: str, name: str, source_module: str, modules: set[str]) -> str:
    """Make one generated file (``name``: ``x_pb2.py``, ``x_pb2.pyi``, ...) importable as
    ``rtbserve._proto.x_pb2``."""
    module = Path(name).stem

    def relative(match: re.Match[str]) -> str:
        return f"from . import {match[2]} as" if match[2] in modules else match[0]

    text = re.sub(r"^from ([\w.]+) import (\w+) as", relative, text, flags=re.MULTILINE)
    text = re.sub(
        r"^import (\w+) as",
        lambda m: f"from . import {m[1]} as" if m[1] in modules else m[0],
        text,
        flags=re.MULTILINE,
    )
    text = text.replace(f"'{source_module}'", f"'{OUT_PACKAGE}.{module}'")
    if module in PRIVATE_POOL_MODULES and name.endswith(".py"):
        if text.count(_DEFAULT_POOL_ADD) != 1:
            raise RuntimeError(f"{module}: protoc's output changed shape; cannot move it to a pool")
        text = text.replace(
            _DEFAULT_POOL_ADD,
            "_private_pool.AddSerializedFile(",
        ).replace(
            "# @@protoc_insertion_point(imports)\n",
            "# @@protoc_insertion_point(imports)\nfrom . import PRIVATE_POOL as _private_pool\n",
            1,
        )
        if "_private_pool.AddSerializedFile(" not in text or "import PRIVATE_POOL" not in text:
            raise RuntimeError(f"{module}: protoc's output changed shape; cannot move it to a pool")
    lines = text.splitlines(keepends=True)
    # after protoc's own "DO NOT EDIT" header line(s)
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join([*lines[:at], _STAMP, *lines[at:]])


def committed_files(out_dir: Path = OUT_DIR) -> dict[str, str]:
    """The generated files currently in ``out_dir`` (``*.py``, ``*.pyi``): name -> text."""
    if not out_dir.is_dir():
        return {}
    return {
        p.name: p.read_text()
        for p in sorted(out_dir.iterdir())
        if p.is_file() and p.suffix in GENERATED_SUFFIXES
    }


def drift(expected: dict[str, str], actual: dict[str, str], *, context_lines: int = 12) -> str:
    """A readable summary of how ``actual`` differs from ``expected``; empty when equal."""
    parts: list[str] = []
    for name in sorted(expected.keys() - actual.keys()):
        parts.append(f"missing: {name}")
    for name in sorted(actual.keys() - expected.keys()):
        parts.append(f"not generated (stale): {name}")
    for name in sorted(expected.keys() & actual.keys()):
        if expected[name] == actual[name]:
            continue
        diff = list(
            difflib.unified_diff(
                actual[name].splitlines(),
                expected[name].splitlines(),
                f"committed/{name}",
                f"generated/{name}",
                lineterm="",
                n=1,
            )
        )
        added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
        removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
        shown = diff[:context_lines]
        more = f"\n  ... {len(diff) - len(shown)} more diff lines" if len(diff) > len(shown) else ""
        body = "\n".join(f"  {d[:160]}" for d in shown)
        parts.append(f"changed: {name} (+{added} -{removed} lines)\n{body}{more}")
    return "\n".join(parts)


def write_files(files: dict[str, str], out_dir: Path = OUT_DIR) -> list[str]:
    """Write ``files`` into ``out_dir`` and delete generated files no longer produced.

    Returns the names written or deleted (unchanged files are left alone).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    touched = []
    current = committed_files(out_dir)
    for name, text in files.items():
        if current.get(name) != text:
            (out_dir / name).write_text(text)
            touched.append(name)
    for name in current.keys() - files.keys():
        (out_dir / name).unlink()
        touched.append(name)
    return sorted(touched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rtbserve.transports.grpc.codegen", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if rtbserve/_proto/ differs",
    )
    args = parser.parse_args(argv)
    try:
        files = generate_files()
    except RuntimeError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 2
    rel = OUT_DIR.relative_to(ROOT)
    if args.check:
        summary = drift(files, committed_files())
        if summary:
            print(
                f"{rel}/ is out of date with proto/ (regenerate with "
                f"`python -m rtbserve.transports.grpc.codegen`):\n{summary}",
                file=sys.stderr,
            )
            return 1
        print(f"{rel}/ is up to date ({len(files)} files)")
        return 0
    touched = write_files(files)
    print(f"{rel}/: {', '.join(touched) if touched else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
