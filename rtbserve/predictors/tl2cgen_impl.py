"""The tl2cgen backend: TL2cgen turns the model into C, gcc turns that into a Python extension.

TL2cgen generates one ``predict(row)`` function of nested if/else per model (with branch
annotation from a data sample when one is given, and quantized thresholds). ``tl2cgen_module.c``
adds a GIL-free batch loop and a METH_FASTCALL entry point, so one row costs a function call, not a
DMatrix. Translation units are compiled in parallel, one per core.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from rtbserve.errors import CompileError, UnsupportedModel
from rtbserve.predictors.source import ModelSource

CC = os.environ.get("CC", "gcc")
# -O1: half the gcc time of -O2, and faster code on TL2cgen's huge if/else functions (200-tree
# model, this machine: 3.1 s / 164k rows/s at -O1 vs 6.6 s / 133k rows/s at -O2).
CFLAGS = ("-O1", "-fPIC", "-std=gnu11", "-fno-semantic-interposition")
MODULE_SOURCE = Path(__file__).with_name("tl2cgen_module.c")
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


@cache
def compiler_identity() -> str:
    """The compiler's version line, part of every cache key."""
    try:
        out = subprocess.run([CC, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise CompileError(f"C compiler {CC!r} not found; the tl2cgen backend needs gcc") from exc
    return out.stdout.splitlines()[0].strip()


def tl2cgen_version() -> str:
    import tl2cgen

    return str(tl2cgen.__version__)


def module_name_for(key: str) -> str:
    return f"rtb_tl2cgen_{key[:20]}"


def compile_library(
    source: ModelSource,
    out_dir: Path,
    module_name: str,
    *,
    sample: np.ndarray | None = None,
    quantize: bool = False,
) -> Path:
    """Generate C for ``source`` and build ``out_dir/<module_name><EXT_SUFFIX>``.

    ``sample`` (float32 rows) drives branch annotation. ``quantize`` stays off: TL2cgen 1.0 prints
    its quantization table with 8 significant digits, and a float32 threshold needs 9, so rows on
    such a threshold took the wrong branch (caught by the verification gate). Raises
    ``CompileError`` with the compiler's diagnostics when gcc fails.
    """
    import tl2cgen

    leaf_type = int(source.header["leaf_output_type"][0])
    if leaf_type not in (2, 3):
        raise UnsupportedModel("tl2cgen backend serves float32/float64 leaf outputs only")
    c_type = "double" if leaf_type == 3 else "float"
    n_jobs = max(1, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="rtb-cc-", dir=out_dir) as tmp:
        work = Path(tmp)
        params: dict[str, Any] = {"quantize": int(quantize), "parallel_comp": n_jobs}
        if sample is not None and len(sample):
            annotation = work / "annotation.json"
            dmat = tl2cgen.DMatrix(np.ascontiguousarray(sample, dtype=np.float32), missing=np.nan)
            tl2cgen.annotate_branch(source.treelite, dmat, path=str(annotation), nthread=1)
            params["annotate_in"] = str(annotation)
        src_dir = work / "src"
        tl2cgen.generate_c_code(source.treelite, dirpath=str(src_dir), params=params)
        shutil.copy(MODULE_SOURCE, src_dir / MODULE_SOURCE.name)
        if source.family == "lightgbm":
            flags = ", ".join("1" if f else "0" for f in _categorical_features(source)) or "0"
            (src_dir / "rtb_categorical.c").write_text(
                f"const unsigned char rtb_is_categorical[] = {{{flags}}};\n"
            )
        sources = sorted(src_dir.glob("*.c"))
        includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{src_dir}"]
        defines = [f"-DRTB_MODULE={module_name}", f"-DRTB_LEAF_T={c_type}"]
        if source.family == "lightgbm":
            defines.append("-DRTB_LIGHTGBM_INPUT=1")

        def compile_one(c_file: Path) -> Path:
            obj = c_file.with_suffix(".o")
            _run([CC, *CFLAGS, *includes, *defines, "-c", str(c_file), "-o", str(obj)])
            return obj

        with ThreadPoolExecutor(n_jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        lib = work / f"{module_name}{EXT_SUFFIX}"
        _run([CC, "-shared", *CFLAGS, "-o", str(lib), *map(str, objects), "-lm"])
        final = out_dir / lib.name
        os.replace(lib, final)
    return final


def _categorical_features(source: ModelSource) -> list[bool]:
    """Per feature: does any tree split on it categorically?"""
    flags = [False] * source.n_features
    tl = source.treelite
    for t in range(tl.num_tree):
        acc = tl.get_tree_accessor(t)
        cat = (acc.get_field("cleft") >= 0) & (acc.get_field("node_type") == 2)
        for f in acc.get_field("split_index")[cat]:
            flags[int(f)] = True
    return flags


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise CompileError(f"cannot run the C compiler {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        diagnostics = (proc.stderr or proc.stdout).strip()[-2000:]
        raise CompileError(f"{cmd[0]} failed (exit {proc.returncode}): {diagnostics}")


def load_library(path: Path, module_name: str) -> Any:
    """Import a built extension from ``path``; raise CompileError if it is not loadable."""
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, str(path), loader=loader)
    if spec is None:
        raise CompileError(f"cannot import compiled model library {str(path)!r}")
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as exc:
        raise CompileError(f"compiled model library {str(path)!r} does not load: {exc}") from exc
    return module


class Tl2cgenPredictor:
    """Scores rows with a TL2cgen-compiled extension. Thread-safe for disjoint row ranges."""

    name = "tl2cgen"

    def __init__(self, module: Any, source: ModelSource) -> None:
        if module.n_features != source.n_features or module.n_outputs != source.output.n_outputs:
            raise CompileError(
                f"compiled library does not match the model: {module.n_features} features / "
                f"{module.n_outputs} outputs, expected {source.n_features} / "
                f"{source.output.n_outputs}"
            )
        self.module = module
        self.n_features = source.n_features
        self.n_outputs = source.output.n_outputs
        self.out_dtype = np.dtype(np.float64 if module.leaf_type == "float64" else np.float32)
        self._predict = module.predict

    def predict_into(
        self, X: np.ndarray, out: np.ndarray, begin: int, end: int, margin: bool
    ) -> None:
        """Score rows [begin, end) of X (float32, C order) into flat out (n * K); no GIL."""
        self._predict(X, out, begin, end, margin)

    def bind(self, margin: bool) -> Any:
        """``run(X, begin, end, out)`` with the output kind pre-bound."""
        predict = self._predict

        def run(X: np.ndarray, begin: int, end: int, out: np.ndarray) -> None:
            predict(X, out, begin, end, margin)

        return run

    def warm_up(self) -> None:
        x = np.zeros((1, self.n_features), dtype=np.float32)
        self.predict_into(x, np.empty(self.n_outputs, self.out_dtype), 0, 1, False)


def compiler_identity_or_none() -> str:
    try:
        return compiler_identity()
    except CompileError:
        return "none"
