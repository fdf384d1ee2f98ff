"""The on-disk compile cache: one directory per (model content, toolchain, host).

The key hashes the model file's bytes, rtbserve's cache format, the versions of every library
that shapes an artifact (numba, tl2cgen, treelite, the reference library), the C compiler and its
flags, the Python ABI and the CPU (model name and feature flags). A changed model, compiler or
machine therefore never reuses another's artifact.

Writers hold an exclusive ``flock`` on ``<dir>/.lock`` while they build, and publish every file
with write-to-temporary + ``os.replace``, so a reader sees a whole file or none and two processes
loading the same model for the first time build it once. Each artifact's SHA-256 is recorded in
its manifest; a file that no longer matches (truncated, corrupted) is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from rtbserve.errors import ArtifactError

CACHE_FORMAT = "rtbserve-cache-2"


def default_cache_dir() -> Path:
    env = os.environ.get("RTBSERVE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rtbserve"


@cache
def cpu_identity() -> str:
    """CPU model name and feature flags: compiled code and tuning choices depend on both."""
    model, flags = platform.processor(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}|{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def toolchain_identity() -> dict[str, str]:
    """Everything besides the model that an artifact depends on."""
    from rtbserve import __version__
    from rtbserve.predictors import tl2cgen_impl

    versions = {"rtbserve": __version__, "format": CACHE_FORMAT, "python": sys.version.split()[0]}
    for mod in ("numba", "numpy", "treelite", "tl2cgen", "xgboost", "lightgbm"):
        versions[mod] = _module_version(mod)
    versions["cc"] = tl2cgen_impl.compiler_identity_or_none()
    versions["cflags"] = " ".join(tl2cgen_impl.CFLAGS)
    versions["ext_suffix"] = tl2cgen_impl.EXT_SUFFIX
    versions["cpu"] = cpu_identity()
    return versions


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "absent"


def cache_key(model_sha256: str, toolchain: dict[str, str]) -> str:
    blob = orjson.dumps({"model": model_sha256, **toolchain}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactDir:
    """One cache entry: artifacts and JSON manifests for one model on one toolchain and host."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.path = root / key[:2] / key
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(
                f"compile cache {str(root)!r} is not writable ({exc.strerror}); point "
                "RTBSERVE_CACHE_DIR (or cache_dir=) at a writable directory"
            ) from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes; blocks until a concurrent builder finishes."""
        with open(self.path / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            data = orjson.loads((self.path / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.write_bytes(name, orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def write_bytes(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def publish_file(self, src: Path, name: str) -> str:
        """Move a finished file into the entry atomically; return its SHA-256."""
        digest = file_sha256(src)
        os.replace(src, self.path / name)
        return digest

    def intact(self, name: str, sha256: str | None) -> bool:
        path = self.path / name
        return sha256 is not None and path.is_file() and file_sha256(path) == sha256
