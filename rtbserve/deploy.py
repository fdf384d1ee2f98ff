"""SageMaker deployment: ``rtbserve sagemaker package`` builds a model's ``model.tar.gz`` and
``rtbserve sagemaker deploy`` creates the SageMaker model, endpoint config and endpoint with boto3.

``package`` stages exactly what SageMaker will extract into ``/opt/ml/model`` (the one model file
under its own name, its side files, ``code/`` and, with ``--precompile``, this machine's verified
compile-cache entry under ``.rtbserve-cache/``), writes it as a deterministic archive (sorted
entries, mtime 0, uid/gid 0, gzip header mtime 0: the same inputs give the same bytes), then
re-opens the archive, extracts it and loads the model from the extracted copy. ``deploy`` turns
its flags into the exact CreateModel / CreateEndpointConfig / CreateEndpoint (or UpdateEndpoint)
requests, validated before anything is sent; ``--dry-run`` prints them as JSON lines and calls
nothing. Nothing here imports boto3 until a real deploy needs it (``pip install boto3``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from rtbserve.errors import ArtifactError, ConfigError, RtbError

# Where ``package --precompile`` puts the compile-cache entry inside the archive. The leading dot
# keeps it out of model discovery (``find_model_file``, ``discover_models``, ``model_dir``).
ARCHIVE_CACHE_DIR = ".rtbserve-cache"
CODE_DIR = "code"
# Files beside a model that change how it is served; packaged when present.
PACKAGED_SIDE_FILES = ("features.json", "rtbserve.toml", "sample.csv", "sample.npy")
# Never a model, never packaged (source.py's side files that are not ours to ship).
_NEVER_MODELS = frozenset(PACKAGED_SIDE_FILES) | {"README.md", "model.tar.gz"}
_ARCHIVE_MTIME = 0

# SageMaker's API patterns (botocore's service model) and limits.
_NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_NAME_RULE = "1-63 letters, digits and hyphens, starting and ending with a letter or digit"
_ROLE_ARN_RE = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/[a-zA-Z_0-9+=,.@\-/]+")
_S3_RE = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(.*)")
_ENV_KEY_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_INSTANCE_TYPE_RE = re.compile(r"ml\.[a-z0-9\-]+\.[a-z0-9]+")
_GRAVITON_RE = re.compile(r"ml\.[a-z]+\d+g[a-z]*\.")  # c7g, m6gd, c6gn, r8g: arm64 hosts
_IMAGE_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._\-]*(:\d+)?/[a-zA-Z0-9._\-/]+([:@][\w.\-:]+)?")
_ECR_RE = re.compile(r"\d{12}\.dkr\.ecr(?:-fips)?\.([a-z0-9\-]+)\.amazonaws\.com(?:\.cn)?/")
_MAX_ENV_ENTRIES = 100
_MAX_ENV_CHARS = 1024
_MAX_CONTAINERS = 15
DEFAULT_INSTANCE_TYPE = "ml.c7i.large"
DEFAULT_VARIANT_NAME = "AllTraffic"
INFERENCE_MODES = ("serial", "direct")


# -- package --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageResult:
    """What ``package_model`` wrote: the archive, its digest and size, its members."""

    path: Path
    sha256: str
    size_bytes: int
    members: tuple[tuple[str, int], ...]  # (archive name, size in bytes) of every regular file
    model_file: str  # the model's name at the archive root
    skipped: tuple[str, ...] = ()  # entries of the model directory left out
    verified: str | None = None  # the verification summary, None with verify=False


def package_model(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    code_dir: str | os.PathLike[str] | None = None,
    precompile: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
) -> PackageResult:
    """Build SageMaker's ``model.tar.gz`` for one model.

    source: a model file, or a directory holding exactly one model (several: ``ConfigError``).
    The model keeps its name at the archive root (``serve`` finds any usual name); the side files
    ``PACKAGED_SIDE_FILES`` beside it are included; so is the directory's ``code/``, or
    ``code_dir`` (not both). Symbolic links are stored as the files they point to, and must point
    inside the directory being packaged.
    precompile: compile, verify and autotune the model as ``serve`` will (its ``rtbserve.toml``)
    and ship the cache entry under ``.rtbserve-cache/``. It is keyed by the CPU model and the
    library versions, so it only helps a server with the same CPU model and the same image.
    cache_dir: the compile cache used to compile and to verify (default ``$RTBSERVE_CACHE_DIR``
    or ``~/.cache/rtbserve``).
    verify: re-open the archive, check every member against the staged bytes, extract it and load
    the model from the extracted copy (with ``precompile``, from the packaged cache only).
    The archive is written to a temporary file beside ``output`` and renamed into place once
    verified: a refused package leaves no ``output`` behind.
    """
    out = Path(output)
    if not out.name.endswith(".tar.gz"):
        raise ConfigError(f"output {str(out)!r} must end in .tar.gz (SageMaker's ModelDataUrl)")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {str(out.parent)!r} does not exist")
    entries, model_name, skipped = collect_package_files(source, code_dir=code_dir, exclude=out)
    with tempfile.TemporaryDirectory(prefix="rtbserve-package-") as tmp:
        stage = Path(tmp) / "model"
        stage.mkdir()
        for arcname, src in entries:
            _stage_file(src, stage / arcname)
        if precompile:
            _precompile_into(stage, cache_dir)
        members = tuple(
            (rel, path.stat().st_size) for rel, path in _walk_sorted(stage) if path.is_file()
        )
        # beside the output (same file system), renamed into place only once verified
        fd, partial_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        partial = Path(partial_name)
        try:
            with os.fdopen(fd, "wb") as raw:
                _write_archive(stage, raw)
            verified = None
            if verify:
                verified = _verify_archive(
                    partial,
                    stage,
                    Path(tmp) / "extracted",
                    precompile=precompile,
                    cache_dir=cache_dir,
                )
            sha256, size = _file_digest(partial), partial.stat().st_size
            os.chmod(partial, 0o644)
            os.replace(partial, out)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
    return PackageResult(out, sha256, size, members, model_name, tuple(skipped), verified)


def collect_package_files(
    source: str | os.PathLike[str],
    *,
    code_dir: str | os.PathLike[str] | None = None,
    exclude: Path | None = None,
) -> tuple[list[tuple[str, Path]], str, list[str]]:
    """(archive name, source file) pairs for ``source``, the model's archive name, and the names
    of the directory entries left out. Raises ``ConfigError`` for several models, a repository,
    both a ``code/`` directory and ``code_dir``, or a symlink leaving its directory."""
    src = Path(source)
    if not src.exists():
        raise ConfigError(f"model path {str(src)!r} does not exist")
    excluded = {exclude.resolve()} if exclude is not None else set()
    skipped: list[str] = []
    if src.is_dir():
        model = _single_model_file(src)
        side_root = src
        own_code = src / CODE_DIR
        has_own_code = own_code.exists() or own_code.is_symlink()
        for entry in sorted(src.iterdir()):
            if entry.resolve() in excluded:
                continue
            if entry.name.startswith(".") and entry.name != ARCHIVE_CACHE_DIR:
                continue  # an old packaged cache is worth a note: --precompile rebuilds it
            if entry.name not in (model.name, CODE_DIR, *PACKAGED_SIDE_FILES):
                skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    elif src.is_file():
        model = src  # named explicitly: may be a link to anywhere
        side_root = src.parent
        own_code, has_own_code = src.parent / CODE_DIR, False
    else:
        raise ConfigError(f"model path {str(src)!r} is neither a file nor a directory")
    entries = [(model.name, model if src.is_file() else _inside(model, side_root))]
    for name in PACKAGED_SIDE_FILES:
        side = side_root / name
        if name != model.name and side.is_file():
            entries.append((name, _inside(side, side_root)))
    if code_dir is not None and has_own_code:
        raise ConfigError(
            f"{str(src)!r} already has a {CODE_DIR}/ directory and --code {str(code_dir)!r} was "
            "given: keep one"
        )
    if code_dir is not None:
        code_root = Path(code_dir)
        if not code_root.is_dir():
            raise ConfigError(f"--code {str(code_root)!r} is not a directory")
        entries += _code_files(code_root.resolve(), excluded)
    elif has_own_code:
        if own_code.is_symlink() or not own_code.is_dir():
            raise ConfigError(f"{str(own_code)!r} must be a directory, not a link or a file")
        entries += _code_files(own_code.resolve(), excluded)
    return entries, model.name, skipped


def _single_model_file(directory: Path) -> Path:
    """The one model file in ``directory``; ``ConfigError`` when it holds several or is a
    repository (``serve`` would silently pick one, or serve several)."""
    from rtbserve.predictors.source import MODEL_FILE_NAMES, find_model_file

    files = [
        c
        for c in sorted(directory.iterdir())
        if not c.name.startswith(".") and c.name not in _NEVER_MODELS and c.is_file()
    ]
    models = [c for c in files if c.name in MODEL_FILE_NAMES or _looks_like_model(c)]
    if len(models) > 1:
        raise ConfigError(
            f"several models in {str(directory)!r} ({', '.join(c.name for c in models)}); "
            "package one model: pass its file instead of the directory, or keep one model per "
            "directory"
        )
    if not models:
        nested = [
            d.name
            for d in sorted(directory.iterdir())
            if d.is_dir() and not d.name.startswith((".", "_")) and d.name != CODE_DIR
            if _holds_model(d)
        ]
        if nested:
            raise ConfigError(
                f"{str(directory)!r} is a repository of {len(nested)} models "
                f"({', '.join(nested)}); package one model directory per archive (a multi-model "
                "endpoint takes one model.tar.gz per model under its S3 prefix)"
            )
    try:
        return find_model_file(directory)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None


def _looks_like_model(path: Path) -> bool:
    # a private helper of source.py: the same sniffing ``find_model_file`` does
    from rtbserve.predictors.source import _sniff_format

    with open(path, "rb") as fh:
        return _sniff_format(fh.read(64)) is not None


def _holds_model(directory: Path) -> bool:
    from rtbserve.predictors.source import find_model_file

    try:
        find_model_file(directory)
    except ArtifactError:
        return False
    return True


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; ``ConfigError`` if a link takes it outside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ConfigError(
            f"{str(path)!r} is a symlink to {str(resolved)!r}, outside {str(root)!r}; copy the "
            "file in instead"
        )
    if not resolved.is_file():
        raise ConfigError(f"{str(path)!r} is not a regular file")
    return resolved


def _code_files(root: Path, excluded: set[Path]) -> list[tuple[str, Path]]:
    """``code/`` members: every file under ``root``, minus caches (``__pycache__``, ``*.pyc``)
    and hidden names. Links to files inside ``root`` are stored as files; links to directories
    and links leaving ``root`` are refused."""
    if not (root / "inference.py").is_file():
        print(
            f"rtbserve sagemaker package: note: {str(root)!r} has no inference.py "
            "(set SAGEMAKER_PROGRAM to name the handler script)",
            file=sys.stderr,
        )
    found: list[tuple[str, Path]] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            name = entry.name
            if name.startswith(".") or name == "__pycache__" or name.endswith(".pyc"):
                continue
            if entry.resolve() in excluded:
                continue
            arcname = f"{prefix}/{name}"
            if entry.is_symlink() and entry.is_dir():
                raise ConfigError(f"{str(entry)!r} is a link to a directory; copy it in instead")
            if entry.is_dir():
                walk(entry, arcname)
            else:
                found.append((arcname, _inside(entry, root)))

    walk(root, CODE_DIR)
    return found


def _stage_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    executable = os.stat(src).st_mode & stat.S_IXUSR
    os.chmod(dst, 0o755 if executable else 0o644)


def _precompile_into(stage: Path, cache_dir: str | os.PathLike[str] | None) -> None:
    """Compile, verify and autotune the staged model as ``serve`` loads it (its rtbserve.toml),
    then copy its cache entry into ``stage/.rtbserve-cache`` (under the entry's lock)."""
    from rtbserve import load_model
    from rtbserve.config import discover_models
    from rtbserve.registry.cache import (
        ArtifactDir,
        cache_key,
        default_cache_dir,
        file_sha256,
        toolchain_identity,
    )

    (settings,) = discover_models(stage)
    load_model(
        settings.path, backend=settings.backend, threshold=settings.threshold, cache_dir=cache_dir
    )
    from rtbserve.predictors.source import find_model_file

    key = cache_key(file_sha256(find_model_file(stage)), toolchain_identity())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = ArtifactDir(root, key)
    target = stage / ARCHIVE_CACHE_DIR / key[:2] / key
    target.mkdir(parents=True)
    with entry.locked():
        for item in sorted(entry.path.iterdir()):
            if item.is_file() and not item.name.startswith("."):  # .lock, temporaries
                _stage_file(item, target / item.name)


def _walk_sorted(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX name, path) of every directory and file under ``root``, sorted by name,
    each directory before its contents."""

    def walk(directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            rel = f"{prefix}{entry.name}"
            yield rel, entry
            if entry.is_dir():
                yield from walk(entry, rel + "/")

    yield from walk(root, "")


def _write_archive(stage: Path, raw: BinaryIO) -> None:
    """``stage`` as a reproducible tar.gz into ``raw``: sorted names, mtime 0, root ownership,
    modes 0644/0755, a gzip header without file name or time; flushed to disk."""
    with (
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=_ARCHIVE_MTIME
        ) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, path in _walk_sorted(stage):
            info = tarfile.TarInfo(rel)
            info.mtime = _ARCHIVE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.size = path.stat().st_size
            info.mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    raw.flush()
    os.fsync(raw.fileno())


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_archive(
    archive: Path,
    stage: Path,
    extract_to: Path,
    *,
    precompile: bool,
    cache_dir: str | os.PathLike[str] | None,
) -> str:
    """Re-open ``archive``, compare it with ``stage``, extract it and load the model from the
    extracted copy; return a one-line summary. ``ArtifactError`` on any difference."""
    from rtbserve import load_model
    from rtbserve.config import discover_models

    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isreg() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                raise ArtifactError(f"{str(archive)!r}: unexpected member {m.name!r}")
        tar.extractall(extract_to, filter="data")
    want = {rel: _file_digest(p) for rel, p in _walk_sorted(stage) if p.is_file()}
    got = {m.name: _file_digest(extract_to / m.name) for m in members if m.isreg()}
    if got != want:
        differ = sorted(set(got) ^ set(want) | {k for k in got if got[k] != want.get(k)})
        raise ArtifactError(f"{str(archive)!r} does not hold the staged files: {differ}")
    models = discover_models(extract_to)
    if len(models) != 1:
        raise ArtifactError(f"{str(archive)!r} extracts to {len(models)} models, expected one")
    settings = models[0]
    packaged_cache = extract_to / ARCHIVE_CACHE_DIR
    model = load_model(
        settings.path,
        backend=settings.backend,
        threshold=settings.threshold,
        cache_dir=packaged_cache if precompile else cache_dir,
    )
    summary = f"loads ({model.backend}, {model.n_features} features)"
    if precompile:
        compiled = {n: r for n, r in model.reports.items() if r["report"]["kind"] != "reference"}
        rebuilt = sorted(n for n, r in compiled.items() if not r["from_cache"])
        if rebuilt:
            raise ArtifactError(
                f"the packaged compile cache did not serve {', '.join(rebuilt)}: it was rebuilt "
                "on load, so the archive's cache entry is incomplete"
            )
        if compiled:
            summary += f"; {', '.join(sorted(compiled))} from the packaged cache"
    return summary


def seed_cache(
    model_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Copy the compile-cache entries a packaged model carries (``MODEL/.rtbserve-cache``) into
    the writable cache ``cache_dir`` (default ``$RTBSERVE_CACHE_DIR``); return the keys copied.

    For ``serve``, before it loads the model: SageMaker mounts ``/opt/ml/model`` read-only, so the
    packaged cache cannot be the cache itself (a server on another CPU model must add its own
    entry beside it). Entries already present are left alone. Each entry is copied to a
    temporary directory and renamed into place; its files are digest-checked and its probe
    re-scored when the model loads, so a bad copy is rebuilt, never served. A copy that fails
    (disk full, read-only cache) is logged and skipped: the model then compiles as usual.
    """
    import logging

    from rtbserve.registry.cache import default_cache_dir

    src_root = Path(model_dir) / ARCHIVE_CACHE_DIR
    dst_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not src_root.is_dir():
        return []
    copied = []
    for prefix in sorted(p for p in src_root.iterdir() if p.is_dir() and len(p.name) == 2):
        for entry in sorted(p for p in prefix.iterdir() if p.is_dir()):
            target = dst_root / prefix.name / entry.name
            if target.exists():
                continue
            tmp = None
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=target.parent))
                for item in sorted(entry.iterdir()):
                    if item.is_file() and not item.is_symlink() and not item.name.startswith("."):
                        shutil.copyfile(item, tmp / item.name)
                os.rename(tmp, target)  # fails if a concurrent copy won: theirs is as good
                copied.append(entry.name)
            except OSError as exc:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                if not target.exists():
                    logging.getLogger("rtbserve.deploy").warning(
                        "packaged compile cache %s not copied to %s (%s); compiling instead",
                        entry,
                        dst_root,
                        exc,
                    )
    return copied


# -- deploy ---------------------------------------------------------------------------------

# boto3 method for each SageMaker operation we send, and the parameter naming its resource
_METHODS = {
    "CreateModel": "create_model",
    "CreateEndpointConfig": "create_endpoint_config",
    "CreateEndpoint": "create_endpoint",
    "UpdateEndpoint": "update_endpoint",
}
_SUBJECT_KEYS = {
    "CreateModel": "ModelName",
    "CreateEndpointConfig": "EndpointConfigName",
    "CreateEndpoint": "EndpointName",
    "UpdateEndpoint": "EndpointName",
}


@dataclass(frozen=True)
class ApiCall:
    """One SageMaker API request: its operation name and exact parameters."""

    operation: str
    params: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"operation": self.operation, "params": self.params}, sort_keys=True)


@dataclass(frozen=True)
class DeploymentPlan:
    """The validated requests of one deployment; ``calls`` orders them.

    Without ``replace`` the model, endpoint config and endpoint are all named ``endpoint_name``
    and none may exist. With ``replace`` the model and config get a revision suffix and the
    endpoint is created, or rolled to the new config with UpdateEndpoint (blue/green, no
    downtime); nothing is deleted.
    """

    endpoint_name: str
    model_name: str
    config_name: str
    create_model: dict[str, Any]
    create_endpoint_config: dict[str, Any]
    replace: bool
    warnings: tuple[str, ...] = ()
    image_uris: tuple[str, ...] = ()  # for the region check once the client's region is known

    def calls(self, *, endpoint_exists: bool) -> list[ApiCall]:
        endpoint = {"EndpointName": self.endpoint_name, "EndpointConfigName": self.config_name}
        return [
            ApiCall("CreateModel", self.create_model),
            ApiCall("CreateEndpointConfig", self.create_endpoint_config),
            ApiCall("UpdateEndpoint" if endpoint_exists else "CreateEndpoint", endpoint),
        ]


def plan_deployment(
    *,
    name: str,
    role_arn: str,
    image_uri: str | None = None,
    model_data: str | None = None,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    instance_count: int = 1,
    multi_model: bool = False,
    env: Sequence[str] = (),
    containers: Sequence[str] = (),
    containers_json: str | os.PathLike[str] | None = None,
    inference_mode: str | None = None,
    replace: bool = False,
    revision: str | None = None,
    region: str | None = None,
) -> DeploymentPlan:
    """Validate a deployment's inputs and build its requests; ``ConfigError`` names every bad
    input at once. Arguments mirror ``rtbserve sagemaker deploy``'s flags.

    env: ``KEY=VALUE`` items for the single container. containers / containers_json: a serial
    pipeline or a direct-invocation multi-container model (``inference_mode``); a container
    without an image runs ``image_uri``. Containers that run ``image_uri`` (rtbserve) have their
    environment checked the way ``serve`` will read it.
    region: when known, an ECR image must live in it (SageMaker pulls from its own region only).
    """
    errors: list[str] = []
    warnings: list[str] = []
    if not _NAME_RE.fullmatch(name):
        errors.append(f"--name {name!r}: expected {_NAME_RULE}")
    if not (20 <= len(role_arn) <= 2048 and _ROLE_ARN_RE.fullmatch(role_arn)):
        errors.append(
            f"--role-arn {role_arn!r}: expected arn:aws:iam::<12-digit account>:role/<name>"
        )
    if image_uri is not None:
        _check_image(image_uri, "--image-uri", errors)
    if not _INSTANCE_TYPE_RE.fullmatch(instance_type):
        errors.append(f"--instance-type {instance_type!r}: expected ml.<family>.<size>")
    elif _GRAVITON_RE.match(instance_type):
        warnings.append(
            f"{instance_type} is an arm64 (Graviton) instance: the image must be built for "
            "linux/arm64 (docker build --platform linux/arm64)"
        )
    if instance_count < 1:
        errors.append(f"--instance-count {instance_count}: expected at least 1")
    model_name = config_name = name
    if replace:
        rev = revision if revision is not None else time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        model_name = config_name = f"{name}-{rev}"
        if not _NAME_RE.fullmatch(model_name):
            errors.append(
                f"--replace names the new model and config {model_name!r}: expected {_NAME_RULE} "
                "(a shorter --name or --revision)"
            )
    elif revision is not None:
        errors.append("--revision only applies with --replace")

    request: dict[str, Any] = {"ModelName": model_name, "ExecutionRoleArn": role_arn}
    pipeline = bool(containers) or containers_json is not None
    images: list[str] = []
    if pipeline:
        for flag, given in (
            ("--model-data", model_data),
            ("--multi-model", multi_model or None),
            ("--env", env or None),
        ):
            if given is not None:
                errors.append(
                    f"{flag} does not apply to --container/--containers-json: give each container "
                    "its own model-data and env"
                )
        mode = inference_mode or "serial"
        if mode not in INFERENCE_MODES:
            errors.append(f"--inference-mode {mode!r}: expected {' or '.join(INFERENCE_MODES)}")
        defs = _pipeline_containers(containers, containers_json, image_uri, errors)
        if defs is not None:
            _check_pipeline(defs, mode, image_uri, errors)
            request["Containers"] = defs
        request["InferenceExecutionConfig"] = {"Mode": mode.capitalize()}
        images = [d["Image"] for d in defs or () if isinstance(d.get("Image"), str)]
    else:
        if inference_mode is not None:
            errors.append("--inference-mode applies to --container/--containers-json only")
        request["PrimaryContainer"] = _primary_container(
            image_uri, model_data, multi_model, env, errors, warnings
        )
        images = [image_uri] if image_uri else []
    errors += image_region_errors(images, region)
    if errors:
        raise ConfigError("invalid deployment: " + "; ".join(errors))
    config = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [
            {
                "VariantName": DEFAULT_VARIANT_NAME,
                "ModelName": model_name,
                "InstanceType": instance_type,
                "InitialInstanceCount": instance_count,
                "InitialVariantWeight": 1.0,
            }
        ],
    }
    return DeploymentPlan(
        endpoint_name=name,
        model_name=model_name,
        config_name=config_name,
        create_model=request,
        create_endpoint_config=config,
        replace=replace,
        warnings=tuple(warnings),
        image_uris=tuple(images),
    )


def _primary_container(
    image_uri: str | None,
    model_data: str | None,
    multi_model: bool,
    env: Sequence[str],
    errors: list[str],
    warnings: list[str],
) -> dict[str, Any]:
    """The one container of a single-model or multi-model endpoint."""
    if image_uri is None:
        errors.append("--image-uri is required (the rtbserve image in ECR)")
    container: dict[str, Any] = {"Image": image_uri or ""}
    if multi_model:
        if model_data is None:
            errors.append("--multi-model needs --model-data s3://bucket/prefix/ (the models)")
        else:
            _check_s3(model_data, "--model-data", errors, prefix=True)
            container["ModelDataUrl"] = model_data
    elif model_data is not None:
        _check_s3(model_data, "--model-data", errors, prefix=False)
        container["ModelDataUrl"] = model_data
    else:
        warnings.append(
            "no --model-data: the image must have a model baked in "
            "(docker build --build-arg MODEL_DIR=...), or the endpoint will not start"
        )
    environment = _parse_env(env, "--env", errors)
    if multi_model:
        # `serve` turns on the /models API only when told: do not rely on the platform setting it
        environment.setdefault("SAGEMAKER_MULTI_MODEL", "true")
    if environment:
        _check_env_map(environment, "--env", errors)
        _check_rtbserve_env(environment, "--env", errors)
        container["Environment"] = environment
    container["Mode"] = "MultiModel" if multi_model else "SingleModel"
    return container


_SPEC_KEYS = {
    "image": "Image",
    "model-data": "ModelDataUrl",
    "env": "Environment",
    "hostname": "ContainerHostname",
}
_SPEC_SPLIT = re.compile(r",(?=(?:image|model-data|env|hostname)=)")
_JSON_KEYS = frozenset(_SPEC_KEYS.values())


def parse_container_spec(spec: str) -> dict[str, Any]:
    """``image=URI,model-data=S3,env=K=V;K2=V2,hostname=H`` -> a ContainerDefinition (unchecked
    values; ``plan_deployment`` validates them). Commas split fields only before a known key, so
    values may hold commas; ``;`` separates variables (use --containers-json for values with
    ``;``)."""
    out: dict[str, Any] = {}
    for part in _SPEC_SPLIT.split(spec):
        key, sep, value = part.partition("=")
        if not sep or key not in _SPEC_KEYS:
            raise ConfigError(
                f"--container {spec!r}: unknown field {part!r}; expected "
                f"{', '.join(k + '=' for k in _SPEC_KEYS)}"
            )
        api_key = _SPEC_KEYS[key]
        if api_key in out:
            raise ConfigError(f"--container {spec!r}: {key}= given twice")
        out[api_key] = value.split(";") if api_key == "Environment" else value
    return out


def _pipeline_containers(
    specs: Sequence[str],
    json_file: str | os.PathLike[str] | None,
    image_uri: str | None,
    errors: list[str],
) -> list[dict[str, Any]] | None:
    """The ContainerDefinitions of --container / --containers-json, images defaulted to
    ``image_uri`` and environments parsed; None when they cannot be read at all."""
    raw: list[tuple[str, dict[str, Any]]] = []
    if specs and json_file is not None:
        errors.append("give --container or --containers-json, not both")
        return None
    for i, spec in enumerate(specs, 1):
        try:
            raw.append((f"--container #{i}", parse_container_spec(spec)))
        except ConfigError as exc:
            errors.append(str(exc))
    if json_file is not None:
        where = f"--containers-json {str(json_file)!r}"
        try:
            doc = json.loads(Path(json_file).read_text())
        except (OSError, ValueError) as exc:
            errors.append(f"{where}: {exc}")
            return None
        if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
            errors.append(f"{where}: expected a JSON list of ContainerDefinition objects")
            return None
        for i, d in enumerate(doc, 1):
            unknown = sorted(set(d) - _JSON_KEYS)
            if unknown:
                errors.append(
                    f"{where} container #{i}: unknown keys {', '.join(unknown)}; expected "
                    f"{', '.join(sorted(_JSON_KEYS))}"
                )
            raw.append((f"{where} container #{i}", dict(d)))
    defs = []
    for where, d in raw:
        out: dict[str, Any] = {}
        image = d.get("Image", image_uri)
        if image is None:
            errors.append(f"{where}: no image and no --image-uri to default to")
        elif not isinstance(image, str):
            errors.append(f"{where}: Image must be a string")
        else:
            out["Image"] = image
        if "ContainerHostname" in d:
            out["ContainerHostname"] = d["ContainerHostname"]
        if "ModelDataUrl" in d:
            out["ModelDataUrl"] = d["ModelDataUrl"]
        env = d.get("Environment")
        if isinstance(env, list):  # KEY=VALUE items from a spec
            env = _parse_env(env, where, errors)
        if env:
            out["Environment"] = env
        defs.append(out)
    return defs


def _check_pipeline(
    defs: list[dict[str, Any]], mode: str, image_uri: str | None, errors: list[str]
) -> None:
    if not 2 <= len(defs) <= _MAX_CONTAINERS:
        errors.append(f"a {mode} model needs 2 to {_MAX_CONTAINERS} containers, got {len(defs)}")
    hostnames = [d.get("ContainerHostname") for d in defs]
    named = [h for h in hostnames if h is not None]
    if mode == "direct" and len(named) != len(defs):
        errors.append("direct invocation needs hostname= on every container (clients name it)")
    elif mode == "serial" and named and len(named) != len(defs):
        errors.append("give hostname= to every container of the pipeline or to none")
    if len(set(named)) != len(named):
        errors.append(f"container hostnames must be unique, got {', '.join(map(str, named))}")
    for i, d in enumerate(defs, 1):
        where = f"container #{i}"
        host = d.get("ContainerHostname")
        if host is not None and not (isinstance(host, str) and _NAME_RE.fullmatch(host)):
            errors.append(f"{where} hostname {host!r}: expected {_NAME_RULE}")
        if "Image" in d and d["Image"] != image_uri:
            _check_image(d["Image"], f"{where} image", errors)
        if "ModelDataUrl" in d:
            url = d["ModelDataUrl"]
            if isinstance(url, str):
                _check_s3(url, f"{where} model-data", errors, prefix=False)
            else:
                errors.append(f"{where} ModelDataUrl must be a string")
        env = d.get("Environment")
        if env is not None and not isinstance(env, dict):
            errors.append(f"{where} Environment must be an object of strings")
        elif env:
            _check_env_map(env, where, errors)
            if image_uri is not None and d.get("Image") == image_uri:
                _check_rtbserve_env(env, where, errors)


def _parse_env(items: Sequence[str], where: str, errors: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            errors.append(f"{where} {item!r}: expected KEY=VALUE")
        elif key in env:
            errors.append(f"{where}: {key} given twice")
        else:
            env[key] = value
    return env


def _check_env_map(env: dict[str, Any], where: str, errors: list[str]) -> None:
    if len(env) > _MAX_ENV_ENTRIES:
        errors.append(f"{where}: {len(env)} variables, SageMaker allows {_MAX_ENV_ENTRIES}")
    for key, value in env.items():
        if not (isinstance(key, str) and _ENV_KEY_RE.fullmatch(key) and len(key) <= 1024):
            errors.append(f"{where}: variable name {key!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
        if not isinstance(value, str):
            errors.append(f"{where}: {key}'s value must be a string, got {value!r}")
        elif len(value) > _MAX_ENV_CHARS:
            errors.append(f"{where}: {key}'s value is {len(value)} characters, at most 1024")


def _check_rtbserve_env(env: dict[str, str], where: str, errors: list[str]) -> None:
    """Refuse now what ``serve`` would refuse at start, minutes into endpoint creation."""
    from rtbserve import sagemaker
    from rtbserve.codecs import ENCODERS
    from rtbserve.codecs.sagemaker_env import invocations_options_from_env

    for check in (
        lambda: sagemaker.parse_environment(env, cpus=1),
        lambda: invocations_options_from_env(tuple(ENCODERS), env),
    ):
        try:
            check()
        except RtbError as exc:
            errors.append(f"{where}: {exc}")


def _check_image(image: str, where: str, errors: list[str]) -> None:
    if not (len(image) <= 255 and _IMAGE_RE.fullmatch(image)):
        errors.append(f"{where} {image!r}: expected registry/repository[:tag|@digest]")


def image_region_errors(images: Sequence[str], region: str | None) -> list[str]:
    """One message per ECR image outside ``region``: SageMaker pulls ECR images (and reads the
    model's S3 objects) from its own region only."""
    errors = []
    for image in dict.fromkeys(images):
        ecr = _ECR_RE.match(image)
        if ecr and region is not None and ecr.group(1) != region:
            errors.append(
                f"image {image!r} is in {ecr.group(1)}, the endpoint in {region}: SageMaker "
                "pulls ECR images from its own region only (push the image there)"
            )
    return errors


def _check_s3(url: str, where: str, errors: list[str], *, prefix: bool) -> None:
    m = _S3_RE.fullmatch(url)
    if prefix:
        if m is None or not url.endswith("/"):
            errors.append(
                f"{where} {url!r}: expected an S3 prefix s3://bucket/prefix/ (the multi-model "
                "endpoint loads <prefix><TargetModel>)"
            )
    elif m is None or not m.group(2).endswith(".tar.gz"):
        errors.append(f"{where} {url!r}: expected s3://bucket/key.tar.gz (the model archive)")


# -- running the plan -------------------------------------------------------------------------


def make_client(region: str | None) -> Any:
    """A boto3 SageMaker client (credentials and region from the usual AWS chain)."""
    try:
        import boto3
        from botocore.exceptions import NoRegionError
    except ImportError as exc:
        raise ConfigError(
            "rtbserve sagemaker deploy needs boto3: pip install 'rtbserve[sagemaker]' (or boto3)"
        ) from exc
    try:
        return boto3.session.Session(region_name=region).client("sagemaker")
    except NoRegionError:
        raise ConfigError("no AWS region: pass --region or set AWS_REGION") from None


def execute_plan(
    plan: DeploymentPlan,
    client: Any,
    *,
    wait: bool = False,
    wait_timeout_s: float = 3600.0,
    out: TextIO | None = None,
) -> int:
    """Send ``plan``'s requests with ``client``; return the exit code (0 done, 1 AWS refused or
    the endpoint failed, 2 names taken and nothing changed).

    First the existence checks (DescribeEndpoint, DescribeModel, DescribeEndpointConfig), so a
    conflict changes nothing; then CreateModel, CreateEndpointConfig and CreateEndpoint (or
    UpdateEndpoint with ``plan.replace`` when the endpoint exists); then, with ``wait``, the
    ``endpoint_in_service`` waiter. Not thread-safe (one client, one plan).
    """
    from botocore.exceptions import BotoCoreError, ClientError, WaiterError

    out = sys.stdout if out is None else out
    err = sys.stderr

    def say(message: str) -> None:
        print(message, file=out, flush=True)

    done: list[str] = []
    try:
        endpoint = _describe(client.describe_endpoint, EndpointName=plan.endpoint_name)
        conflicts = []
        if endpoint is not None and not plan.replace:
            conflicts.append(
                f"endpoint {plan.endpoint_name!r} exists ({endpoint.get('EndpointStatus')}, "
                f"config {endpoint.get('EndpointConfigName')!r}); pass --replace to roll it to "
                "the new model (UpdateEndpoint, no downtime)"
            )
        status = None if endpoint is None else endpoint.get("EndpointStatus")
        if plan.replace and status not in (None, "InService"):
            conflicts.append(
                f"endpoint {plan.endpoint_name!r} is {status}: UpdateEndpoint needs it InService "
                "(wait for it; a Failed endpoint must be deleted: aws sagemaker delete-endpoint "
                f"--endpoint-name {plan.endpoint_name})"
            )
        if _describe(client.describe_model, ModelName=plan.model_name) is not None:
            conflicts.append(f"model {plan.model_name!r} exists")
        if (
            _describe(client.describe_endpoint_config, EndpointConfigName=plan.config_name)
            is not None
        ):
            conflicts.append(f"endpoint config {plan.config_name!r} exists")
        if conflicts:
            print(
                "rtbserve sagemaker deploy: error: "
                + "; ".join(conflicts)
                + ". Nothing was changed: delete what is left of an earlier attempt "
                "(aws sagemaker delete-model / delete-endpoint-config), pick another --name, "
                "or pass --replace (new revision names)",
                file=err,
            )
            return 2
        for call in plan.calls(endpoint_exists=endpoint is not None):
            response = getattr(client, _METHODS[call.operation])(**call.params)
            arn = next((v for k, v in response.items() if k.endswith("Arn")), "")
            done.append(f"{call.operation} {_subject(call)}")
            say(f"{call.operation}: {_subject(call)} {arn}".rstrip())
        if endpoint is not None:
            previous = endpoint.get("EndpointConfigName")
            say(
                f"endpoint {plan.endpoint_name!r} is rolling from config {previous!r} to "
                f"{plan.config_name!r}; once it is InService, delete the old config and its "
                f"model if nothing else uses them (aws sagemaker delete-endpoint-config "
                f"--endpoint-config-name {previous})"
            )
        if not wait:
            say(f"endpoint {plan.endpoint_name!r} is being deployed; --wait waits for InService")
            return 0
        delay_s = 15
        say(f"waiting up to {wait_timeout_s:.0f} s for endpoint {plan.endpoint_name!r}...")
        client.get_waiter("endpoint_in_service").wait(
            EndpointName=plan.endpoint_name,
            WaiterConfig={"Delay": delay_s, "MaxAttempts": max(1, int(wait_timeout_s // delay_s))},
        )
        say(f"endpoint {plan.endpoint_name!r} is InService")
        return 0
    except WaiterError as exc:
        reason = (exc.last_response or {}).get("FailureReason") or str(exc)
        print(f"rtbserve sagemaker deploy: endpoint not InService: {reason}", file=err)
        return 1
    except ClientError as exc:
        e = exc.response.get("Error", {})
        print(
            f"rtbserve sagemaker deploy: error: {exc.operation_name}: {e.get('Code')}: "
            f"{e.get('Message')}",
            file=err,
        )
        if done:
            print(f"already done: {'; '.join(done)}", file=err)
        return 1
    except BotoCoreError as exc:  # no credentials, no connection, ...
        print(f"rtbserve sagemaker deploy: error: {exc}", file=err)
        if done:
            print(f"already done: {'; '.join(done)}", file=err)
        return 1


def _describe(method: Callable[..., Any], **params: Any) -> dict[str, Any] | None:
    """The Describe* answer, or None when SageMaker says the resource does not exist."""
    from botocore.exceptions import ClientError

    try:
        return method(**params)  # network op
    except ClientError as exc:
        e = exc.response.get("Error", {})
        if (
            e.get("Code") == "ValidationException"
            and "could not find" in (e.get("Message") or "").lower()
        ):
            return None
        raise


def _subject(call: ApiCall) -> str:
    key = _SUBJECT_KEYS[call.operation]
    return f"{key} {call.params[key]!r}"


# -- command line -----------------------------------------------------------------------------


def add_sagemaker_parser(subparsers: Any) -> None:
    """Add ``sagemaker package`` and ``sagemaker deploy`` to the CLI's sub-command parsers; each
    sets ``func`` to a ``(args) -> int`` exit code (0 ok, 1 failed on AWS's side, 2 refused)."""
    p = subparsers.add_parser(
        "sagemaker",
        help="build a model.tar.gz and deploy it to a SageMaker endpoint",
        description="Package a model for SageMaker and deploy the rtbserve image with it.",
    )
    sub = p.add_subparsers(dest="sagemaker_command", required=True)

    pk = sub.add_parser(
        "package",
        help="build a deterministic model.tar.gz (model, side files, code/, compile cache)",
        description="Build SageMaker's model.tar.gz from a model file or a directory holding one "
        "model. Prints the archive's size and sha256; by default re-opens it and loads the model "
        "from an extracted copy.",
    )
    pk.add_argument("model", metavar="MODEL_DIR_OR_FILE")
    pk.add_argument("output", metavar="OUTPUT.tar.gz")
    pk.add_argument("--code", default=None, metavar="DIR", help="packaged as code/ (inference.py)")
    pk.add_argument(
        "--precompile",
        action="store_true",
        help="ship this machine's verified compile artifacts in .rtbserve-cache/ (used by a "
        "server with the same CPU model and image only)",
    )
    pk.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rtbserve)")
    pk.add_argument("--no-verify", action="store_true", help="skip re-opening and loading")
    pk.set_defaults(func=cmd_package)

    dp = sub.add_parser(
        "deploy",
        help="create the SageMaker model, endpoint config and endpoint",
        description="Create (or, with --replace, roll) a SageMaker endpoint serving the rtbserve "
        "image: one model, a multi-model endpoint, a serial inference pipeline or a "
        "direct-invocation multi-container endpoint. --dry-run prints the API requests as JSON "
        "lines (operation, params) and sends nothing.",
    )
    dp.add_argument("--name", required=True, help="the endpoint's name (also its model's/config's)")
    dp.add_argument("--role-arn", required=True, help="the execution role SageMaker assumes")
    dp.add_argument("--image-uri", default=None, help="the rtbserve image in ECR")
    dp.add_argument(
        "--model-data",
        default=None,
        help="s3://bucket/key/model.tar.gz (with --multi-model: the s3://bucket/prefix/)",
    )
    dp.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    dp.add_argument("--instance-count", type=int, default=1)
    dp.add_argument("--region", default=None, help="default: the AWS configuration's")
    dp.add_argument("--multi-model", action="store_true", help="Mode=MultiModel")
    dp.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="container environment"
    )
    dp.add_argument(
        "--container",
        action="append",
        default=[],
        metavar="SPEC",
        help="one container of a pipeline, in order: image=URI,model-data=S3,env=K=V;K2=V2,"
        "hostname=H (image defaults to --image-uri)",
    )
    dp.add_argument(
        "--containers-json",
        default=None,
        metavar="FILE",
        help="the containers as a JSON list of {Image, ModelDataUrl, Environment, "
        "ContainerHostname}",
    )
    dp.add_argument(
        "--inference-mode",
        default=None,
        choices=INFERENCE_MODES,
        help="with --container: serial pipeline (default), or direct invocation by hostname",
    )
    dp.add_argument(
        "--replace",
        action="store_true",
        help="create the model and config as NAME-REVISION and create or update the endpoint",
    )
    dp.add_argument("--revision", default=None, help="with --replace (default: UTC timestamp)")
    dp.add_argument("--dry-run", action="store_true", help="print the requests; call nothing")
    dp.add_argument("--wait", action="store_true", help="wait until the endpoint is InService")
    dp.add_argument("--wait-timeout-s", type=float, default=3600.0)
    dp.set_defaults(func=cmd_deploy)


def cmd_package(args: argparse.Namespace) -> int:
    try:
        result = package_model(
            args.model,
            args.output,
            code_dir=args.code,
            precompile=args.precompile,
            cache_dir=args.cache_dir,
            verify=not args.no_verify,
        )
    except RtbError as exc:
        print(f"rtbserve sagemaker package: error: {exc}", file=sys.stderr)
        return 2
    if result.skipped:
        print(
            f"rtbserve sagemaker package: note: left out {', '.join(result.skipped)}",
            file=sys.stderr,
        )
    print(str(result.path))
    width = max(len(name) for name, _ in result.members)
    for name, size in result.members:
        print(f"  {name:<{width}}  {size:>12,}")
    print(f"size    {result.size_bytes:,} bytes")
    print(f"sha256  {result.sha256}")
    if result.verified is not None:
        print(f"verified: re-opened, extracted; the model {result.verified}")
    return 0


def cmd_deploy(args: argparse.Namespace, *, client: Any = None) -> int:
    """``rtbserve sagemaker deploy``; ``client``: a SageMaker client to use instead of boto3's
    default (tests pass one wrapped in botocore's Stubber)."""
    try:
        plan = plan_deployment(
            name=args.name,
            role_arn=args.role_arn,
            image_uri=args.image_uri,
            model_data=args.model_data,
            instance_type=args.instance_type,
            instance_count=args.instance_count,
            multi_model=args.multi_model,
            env=args.env,
            containers=args.container,
            containers_json=args.containers_json,
            inference_mode=args.inference_mode,
            replace=args.replace,
            revision=args.revision,
            region=args.region,
        )
        if not args.dry_run:
            if client is None:
                client = make_client(args.region)
            mismatched = image_region_errors(plan.image_uris, client.meta.region_name)
            if mismatched:
                raise ConfigError("invalid deployment: " + "; ".join(mismatched))
    except RtbError as exc:
        print(f"rtbserve sagemaker deploy: error: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"rtbserve sagemaker deploy: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        if plan.replace:
            print(
                "rtbserve sagemaker deploy: dry run: UpdateEndpoint assumes the endpoint exists "
                "(CreateEndpoint otherwise)",
                file=sys.stderr,
            )
        for call in plan.calls(endpoint_exists=plan.replace):
            print(call.to_json())
        return 0
    return execute_plan(plan, client, wait=args.wait, wait_timeout_s=args.wait_timeout_s)
