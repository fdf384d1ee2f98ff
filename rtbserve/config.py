"""Settings, parsed once: the server's (``ServerSettings``) and each served model's
(``ModelSettings``), and the discovery of what a ``MODEL_OR_REPO`` path holds.

A path is one of: a model file; a directory holding one model (``REPO/NAME/model.json`` style,
with side files such as ``features.json`` and ``rtbserve.toml``); or a repository: a directory
whose sub-directories each hold one model, served under the sub-directory's name (``code/``,
SageMaker's user-script directory, never counts as one). A model's ``rtbserve.toml`` (beside
its file) sets its serving options::

    backend = "auto"            # auto | numba | tl2cgen | xgboost | lightgbm | gtil
    threshold = 0.5             # label threshold (default: features.json's, else 0.5)
    output = "probability"      # probability | margin | label
    default = true              # the model /invocations serves when the repository has several
    handler_threads = 1         # threads running its handler script's functions (per worker)

    [batching]
    max_batch_rows = 256
    max_batch_delay_us = 500
    max_queue_rows = 65536

    [fail_open]                 # answer a default decision instead of 504 / 503
    score = 1.0                 # the score every row gets when failing open
    on_overload = true          # also when the queue is full (default: deadline misses only)

Unknown keys are refused, so a typo never silently falls back to a default.

A handler script (``PATH/code/inference.py``, SageMaker's inference-toolkit convention; see
``rtbserve.handlers``) belongs to the model ``/invocations`` serves: the single model, or a
repository's default one. A directory whose ``code/`` holds a Python script is one model even
when it holds no model file rtbserve recognises (the script's ``model_fn`` loads it).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rtbserve.errors import ConfigError

OUTPUTS = ("probability", "margin", "label")
SETTINGS_FILE = "rtbserve.toml"
# Never a model of a repository: SageMaker's user-script directory (model.tar.gz's code/), even
# when it holds a file that looks like a model (a JSON config, say).
RESERVED_DIR_NAMES = frozenset({"code"})
HANDLER_DIR = "code"
DEFAULT_HANDLER_PROGRAM = "inference.py"
_BACKENDS = ("auto", "numba", "tl2cgen", "xgboost", "lightgbm", "gtil")


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    max_batch_rows: int = 256
    max_batch_delay_us: int = 500
    max_queue_rows: int = 65_536


@dataclass(frozen=True, slots=True)
class FailOpenSettings:
    score: float
    on_overload: bool = False


@dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str
    path: Path  # the model file, or the directory holding it
    backend: str = "auto"
    threshold: float | None = None
    output: str = "probability"
    is_default: bool = False
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    fail_open: FailOpenSettings | None = None
    handler_script: Path | None = None  # code/inference.py: see rtbserve.handlers
    handler_threads: int = 1


@dataclass(frozen=True, slots=True)
class ExecutionParameters:
    """SageMaker Batch Transform's ``GET /execution-parameters`` answer (see rtbserve.sagemaker).

    max_payload_in_mb: 0 means SageMaker streams the payload chunked (no fixed size).
    """

    max_concurrent_transforms: int
    batch_strategy: str  # MULTI_RECORD | SINGLE_RECORD
    max_payload_in_mb: int

    def to_json(self) -> bytes:
        import json

        doc = {
            "MaxConcurrentTransforms": self.max_concurrent_transforms,
            "BatchStrategy": self.batch_strategy,
            "MaxPayloadInMB": self.max_payload_in_mb,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class MultiModelSettings:
    """A SageMaker multi-model endpoint (``SAGEMAKER_MULTI_MODEL=true``): models come and go
    through the management API (``rtbserve.model_registry``) instead of being loaded at start.

    max_models: models loaded at once; a load past it answers 507. None: no bound.
    memory_budget_mb: resident memory of one worker (each worker holds every model); a load
    that would start above it, or ends above it, answers 507. None: no bound (a MemoryError
    during a load still answers 507).
    """

    max_models: int | None = None
    memory_budget_mb: int | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """One serving run. Ports of 0 pick a free port; ``None`` disables that listener.

    port_range: when set, a gRPC or metrics port of 0 is the first free port of this inclusive
    range (never the HTTP port) instead of one the kernel picks (SAGEMAKER_SAFE_PORT_RANGE).
    skip_unavailable_ports: a gRPC or metrics port that is taken (or a range with no free port)
    disables that listener with a warning instead of failing the start.
    execution_parameters: when set, HTTP serves ``GET /execution-parameters``.
    multi_model: when set, the workers serve SageMaker's multi-model API (``/models``) and
    ``models`` is usually empty.
    """

    models: tuple[ModelSettings, ...]
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int | None = 9000
    metrics_port: int | None = None
    workers: int = 1
    cache_dir: str | None = None
    drain_timeout_s: float = 20.0
    max_body_bytes: int = 6 * 1024 * 1024
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 60.0
    port_range: tuple[int, int] | None = None
    skip_unavailable_ports: bool = False
    execution_parameters: ExecutionParameters | None = None
    multi_model: MultiModelSettings | None = None

    @property
    def default_model(self) -> ModelSettings:
        return default_model(self.models)


def default_model(models: tuple[ModelSettings, ...]) -> ModelSettings:
    marked = [m for m in models if m.is_default]
    return marked[0] if marked else models[0]


def discover_models(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    program: str = DEFAULT_HANDLER_PROGRAM,
) -> list[ModelSettings]:
    """The models ``path`` holds (see the module docstring), each with its ``rtbserve.toml``;
    ``path/code/<program>``, when it exists, is the default model's handler script.

    backend: overrides every model's backend (the CLI's ``--backend``) when not None.
    program: the handler script's path under ``code/`` (SageMaker's SAGEMAKER_PROGRAM).
    """
    from rtbserve.errors import ArtifactError
    from rtbserve.predictors.source import find_model_file

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model path {str(p)!r} does not exist")
    if p.is_file():
        found = [_model_settings(p.parent.name or p.stem, p, p.parent)]
    else:
        try:
            find_model_file(p)
            found = [_model_settings(p.resolve().name, p, p)]
        except ArtifactError as single_error:
            subdirs = sorted(
                d
                for d in p.iterdir()
                if d.is_dir()
                and not d.name.startswith((".", "_"))
                and d.name not in RESERVED_DIR_NAMES
            )
            found = []
            for d in subdirs:
                try:
                    find_model_file(d)
                except ArtifactError:
                    continue  # not a model directory (code/, data, ...)
                found.append(_model_settings(d.name, d, d))
            if not found and _holds_scripts(p):
                found = [_model_settings(p.resolve().name, p, p)]  # the script's model_fn loads it
            if not found:
                raise ConfigError(
                    f"{str(p)!r} is neither a model directory nor a repository of model "
                    f"directories ({single_error})"
                ) from None
    if backend is not None:
        found = [replace(m, backend=backend) for m in found]
    defaults = [m.name for m in found if m.is_default]
    if len(defaults) > 1:
        raise ConfigError(f"several models are marked default: {', '.join(defaults)}")
    script = find_handler_script(p, program) if p.is_dir() else None
    return with_handler_script(found, script)


def find_handler_script(directory: Path, program: str = DEFAULT_HANDLER_PROGRAM) -> Path | None:
    """``directory/code/<program>`` when it is a file, else None."""
    script = directory / HANDLER_DIR / program
    return script if script.is_file() else None


def with_handler_script(models: list[ModelSettings], script: Path | None) -> list[ModelSettings]:
    """``models`` with ``script`` as the default model's handler script (and no other's)."""
    default = default_model(tuple(models)) if models else None
    return [replace(m, handler_script=script if m is default else None) for m in models]


def _holds_scripts(directory: Path) -> bool:
    code = directory / HANDLER_DIR
    return code.is_dir() and any(code.glob("*.py"))


def _model_settings(name: str, path: Path, directory: Path) -> ModelSettings:
    toml_file = directory / SETTINGS_FILE
    if not toml_file.is_file():
        return ModelSettings(name=name, path=path)
    try:
        doc = tomllib.loads(toml_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{toml_file}: {exc}") from exc
    where = str(toml_file)
    _check_keys(
        where,
        doc,
        {"backend", "threshold", "output", "default", "batching", "fail_open", "handler_threads"},
    )
    backend = _get(where, doc, "backend", str, "auto")
    if backend not in _BACKENDS:
        raise ConfigError(
            f"{where}: backend must be one of {', '.join(_BACKENDS)}, got {backend!r}"
        )
    output = _get(where, doc, "output", str, "probability")
    if output not in OUTPUTS:
        raise ConfigError(f"{where}: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    threshold = _get(where, doc, "threshold", float, None)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{where}: threshold must lie in [0, 1], got {threshold}")
    handler_threads = _get(where, doc, "handler_threads", int, 1)
    if not 1 <= handler_threads <= 256:
        raise ConfigError(f"{where}: handler_threads must lie in 1..256, got {handler_threads}")
    batching = BatchingSettings()
    if "batching" in doc:
        table = _table(where, doc, "batching")
        names = {f.name for f in fields(BatchingSettings)}
        _check_keys(f"{where} [batching]", table, names)
        values = {k: _get(f"{where} [batching]", table, k, int, None) for k in table}
        for k, v in values.items():
            if v is None or v < (0 if k == "max_batch_delay_us" else 1):
                raise ConfigError(f"{where} [batching]: {k} must be a positive integer, got {v}")
        batching = BatchingSettings(**values)
    fail_open = None
    if "fail_open" in doc:
        table = _table(where, doc, "fail_open")
        _check_keys(f"{where} [fail_open]", table, {"score", "on_overload"})
        if "score" not in table:
            raise ConfigError(f"{where} [fail_open]: score is required (the default decision)")
        fail_open = FailOpenSettings(
            score=_get(where, table, "score", float, 0.0),
            on_overload=_get(where, table, "on_overload", bool, False),
        )
    return ModelSettings(
        name=name,
        path=path,
        backend=backend,
        threshold=threshold,
        output=output,
        is_default=_get(where, doc, "default", bool, False),
        batching=batching,
        fail_open=fail_open,
        handler_threads=handler_threads,
    )


def _check_keys(where: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}"
        )


def _table(where: str, doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _get(where: str, table: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def settings_to_json(settings: ServerSettings) -> str:
    """Settings as JSON, for handing to worker processes (``settings_from_json`` reverses it)."""
    import json
    from dataclasses import asdict

    return json.dumps(asdict(settings), default=str)


def settings_from_json(text: str) -> ServerSettings:
    import json

    doc = json.loads(text)
    models = []
    for m in doc.pop("models"):
        fail_open = m.pop("fail_open")
        script = m.pop("handler_script", None)
        models.append(
            ModelSettings(
                **{k: v for k, v in m.items() if k not in ("path", "batching")},
                path=Path(m["path"]),
                handler_script=None if script is None else Path(script),
                batching=BatchingSettings(**m["batching"]),
                fail_open=None if fail_open is None else FailOpenSettings(**fail_open),
            )
        )
    port_range = doc.pop("port_range")
    params = doc.pop("execution_parameters")
    multi_model = doc.pop("multi_model", None)
    return ServerSettings(
        models=tuple(models),
        port_range=None if port_range is None else (int(port_range[0]), int(port_range[1])),
        execution_parameters=None if params is None else ExecutionParameters(**params),
        multi_model=None if multi_model is None else MultiModelSettings(**multi_model),
        **doc,
    )


_LEVEL_NAMES = {
    "DEBUG": 10,
    "INFO": 20,
    "WARN": 30,
    "WARNING": 30,
    "ERROR": 40,
    "CRITICAL": 50,
    "FATAL": 50,
}


def parse_log_level(text: str) -> int:
    """A Python logging level from a name (``info``, ``WARNING``, any case) or a number
    (``20``, as SageMaker's SAGEMAKER_CONTAINER_LOG_LEVEL); raises ConfigError otherwise."""
    value = text.strip()
    if value.lstrip("-").isdigit():
        level = int(value)
        if not 0 <= level <= 50:
            raise ConfigError(f"log level must lie in 0..50, got {level}")
        return level
    level_or_none = _LEVEL_NAMES.get(value.upper())
    if level_or_none is None:
        raise ConfigError(
            f"unknown log level {text!r}; expected a number 0..50 or one of "
            "DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    return level_or_none
