"""SageMaker's environment -> rtbserve's settings: what the image's ``serve`` command runs.

SageMaker starts the image as ``docker run IMAGE serve`` and states its contract in environment
variables (``ENVIRONMENT`` lists them with their defaults). ``parse_environment`` validates all
of them at once, so a bad value is one clear error (exit 2), never a silent default;
``server_settings`` turns the result into the ``ServerSettings`` the supervisor runs, and
``http_routes`` gives the workers SageMaker's extra route, ``GET /execution-parameters``.

User scripts: ``BASE/model/code/inference.py`` (or ``code/$SAGEMAKER_PROGRAM``) is the served
model's handler script (``rtbserve.handlers``), also when the model itself is baked into the
image and ``BASE/model`` brings only ``code/``.

Multi-model endpoints (``SAGEMAKER_MULTI_MODEL=true``): no model is loaded at start and
``BASE/model`` may be empty; SageMaker loads and unloads models through the management API
(``rtbserve.model_registry``), bounded by ``RTBSERVE_MAX_MODELS`` and
``RTBSERVE_MEMORY_BUDGET_MB`` (past either, a load answers 507 and SageMaker unloads a model).

Ports: HTTP on ``SAGEMAKER_BIND_TO_PORT`` (8080) on every interface. Other listeners must stay
inside ``SAGEMAKER_SAFE_PORT_RANGE`` when it is set: gRPC and a metrics listener then take the
first free ports of the range (never the HTTP port). Without the range, gRPC takes 9000 unless
that is taken (then the server runs without gRPC and says so) and metrics stay on the HTTP port.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rtbserve.config import (
    DEFAULT_HANDLER_PROGRAM,
    HANDLER_DIR,
    RESERVED_DIR_NAMES,
    ExecutionParameters,
    ModelSettings,
    MultiModelSettings,
    ServerSettings,
    find_handler_script,
    parse_log_level,
    with_handler_script,
)
from rtbserve.errors import ConfigError

DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 9000
REALTIME_MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's real-time payload limit
BATCH_MAX_PAYLOAD_MB = 100  # SageMaker's largest MaxPayloadInMB
DEFAULT_DRAIN_TIMEOUT_S = 20.0
# SageMaker sends SIGKILL 30 s after SIGTERM; the supervisor adds a 5 s kill grace after the
# drain bound, so draining never waits longer than this.
MAX_DRAIN_TIMEOUT_S = 20.0
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
_STRATEGY_ALIASES = {"MULTIRECORD": "MULTI_RECORD", "SINGLERECORD": "SINGLE_RECORD"}

# (variable, default, what it sets): the contract, printed by ``serve --help``
ENVIRONMENT = (
    ("SAGEMAKER_BASE_DIR", "/opt/ml", "the model is read from BASE/model"),
    ("SAGEMAKER_BIND_TO_PORT", "8080", "HTTP port (0.0.0.0)"),
    (
        "SAGEMAKER_SAFE_PORT_RANGE",
        "unset",
        "XXXX-YYYY: gRPC and metrics on free ports of the range; unset: gRPC 9000 if free, "
        "metrics on the HTTP port",
    ),
    ("SAGEMAKER_MODEL_SERVER_WORKERS", "CPU count", "worker processes"),
    (
        "SAGEMAKER_MODEL_SERVER_TIMEOUT",
        "60",
        "seconds: request timeout; also bounds draining (at most 20 s)",
    ),
    ("SAGEMAKER_CONTAINER_LOG_LEVEL", "WARNING", "20 or INFO, 10 or DEBUG, ..."),
    ("SAGEMAKER_BATCH", "false", "true: body limit MaxPayloadInMB (0: 100) instead of 6 MiB"),
    ("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "CPU count", "/execution-parameters"),
    ("SAGEMAKER_BATCH_STRATEGY", "MULTI_RECORD", "/execution-parameters"),
    ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6", "/execution-parameters; 0..100"),
    (
        "SAGEMAKER_PROGRAM",
        DEFAULT_HANDLER_PROGRAM,
        "the handler script under the model's code/ (model_fn, input_fn, ...); optional",
    ),
    (
        "RTBSERVE_BAKED_MODEL",
        "unset",
        "a model baked into the image, served when BASE/model holds none",
    ),
    (
        "SAGEMAKER_MULTI_MODEL",
        "false",
        "true: a multi-model endpoint (POST/GET/DELETE /models, POST /models/NAME/invoke)",
    ),
    ("RTBSERVE_MAX_MODELS", "unset", "multi-model: models loaded at once; past it a load is 507"),
    (
        "RTBSERVE_MEMORY_BUDGET_MB",
        "unset",
        "multi-model: resident MB per worker; a load that would exceed it is 507",
    ),
)


@dataclass(frozen=True, slots=True)
class SageMakerEnvironment:
    """SageMaker's variables, validated (see ``ENVIRONMENT``)."""

    base_dir: Path
    http_port: int
    safe_port_range: tuple[int, int] | None
    workers: int
    timeout_s: float | None
    log_level: int
    is_batch: bool
    execution_parameters: ExecutionParameters
    baked_model_dir: Path | None = None
    program: str | None = None  # SAGEMAKER_PROGRAM; None: unset (code/inference.py if present)
    multi_model: MultiModelSettings | None = None  # SAGEMAKER_MULTI_MODEL=true

    @property
    def max_body_bytes(self) -> int:
        if not self.is_batch:
            return REALTIME_MAX_BODY_BYTES
        mb = self.execution_parameters.max_payload_in_mb or BATCH_MAX_PAYLOAD_MB  # 0: chunked
        return mb * 1024 * 1024


def cpu_count() -> int:
    """CPUs this process may run on (the container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0))


def parse_environment(
    environ: Mapping[str, str], *, cpus: int | None = None
) -> SageMakerEnvironment:
    """Validate SageMaker's variables in ``environ``; raise ConfigError naming every bad one.

    cpus: the default for workers and MaxConcurrentTransforms (default: ``cpu_count()``).
    """
    cpus = cpu_count() if cpus is None else cpus
    reader = _Reader(environ)
    http_port = reader.integer("SAGEMAKER_BIND_TO_PORT", DEFAULT_HTTP_PORT, 1, 65535)
    port_range = reader.port_range("SAGEMAKER_SAFE_PORT_RANGE")
    workers = reader.integer("SAGEMAKER_MODEL_SERVER_WORKERS", cpus, 1, 1024)
    timeout_s = reader.seconds("SAGEMAKER_MODEL_SERVER_TIMEOUT")
    log_level = reader.log_level("SAGEMAKER_CONTAINER_LOG_LEVEL")
    is_batch = reader.boolean("SAGEMAKER_BATCH")
    # 0 is what CreateTransformJob means by "not set" for the concurrency
    concurrency = reader.integer("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", cpus, 0, 1_000_000)
    strategy = reader.strategy("SAGEMAKER_BATCH_STRATEGY")
    payload_mb = reader.integer("SAGEMAKER_MAX_PAYLOAD_IN_MB", 6, 0, BATCH_MAX_PAYLOAD_MB)
    base_dir = reader.path("SAGEMAKER_BASE_DIR") or Path("/opt/ml")
    baked = reader.path("RTBSERVE_BAKED_MODEL")
    program = reader.program("SAGEMAKER_PROGRAM")
    is_multi_model = reader.boolean("SAGEMAKER_MULTI_MODEL")
    bounds = MultiModelSettings(  # checked even when unused: a typo is an error, not a no-op
        max_models=reader.optional_integer("RTBSERVE_MAX_MODELS", 1, 1_000_000),
        memory_budget_mb=reader.optional_integer("RTBSERVE_MEMORY_BUDGET_MB", 1, 1 << 30),
    )
    reader.raise_errors()
    return SageMakerEnvironment(
        base_dir=base_dir,
        http_port=http_port,
        safe_port_range=port_range,
        workers=workers,
        timeout_s=timeout_s,
        log_level=log_level,
        is_batch=is_batch,
        execution_parameters=ExecutionParameters(
            max_concurrent_transforms=concurrency or cpus,
            batch_strategy=strategy,
            max_payload_in_mb=payload_mb,
        ),
        baked_model_dir=baked,
        program=program,
        multi_model=bounds if is_multi_model else None,
    )


def model_dir(env: SageMakerEnvironment) -> Path:
    """Where the model is: ``BASE/model`` (SageMaker extracts ``model.tar.gz`` there) when it
    holds anything besides ``code/``, else the model baked into the image; ConfigError if
    neither holds one."""
    extracted = env.base_dir / "model"
    if _holds_files(extracted):
        return extracted
    if env.baked_model_dir is not None and _holds_files(env.baked_model_dir):
        return env.baked_model_dir
    baked = (
        "no model is baked into the image (RTBSERVE_BAKED_MODEL is unset)"
        if env.baked_model_dir is None
        else f"the baked-in model directory {str(env.baked_model_dir)!r} is empty too"
    )
    raise ConfigError(
        f"no model in {str(extracted)!r} (SageMaker extracts the model's model.tar.gz there; "
        f"it is missing or empty) and {baked}"
    )


def _holds_files(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any(
        not entry.name.startswith(".") and entry.name not in RESERVED_DIR_NAMES
        for entry in path.iterdir()
    )


def server_settings(
    env: SageMakerEnvironment, models: list[ModelSettings] | tuple[ModelSettings, ...]
) -> ServerSettings:
    """The ``ServerSettings`` for ``env`` serving ``models`` (from ``discover_models``).

    Batch Transform (``SAGEMAKER_BATCH``) lifts each model's queue bound: SageMaker already
    bounds the load (MaxConcurrentTransforms requests of at most MaxPayloadInMB), and a shed
    request would fail the job's records instead of protecting a latency target.

    The default model's handler script is ``code/<SAGEMAKER_PROGRAM>`` (default
    ``inference.py``) of ``BASE/model``, else of the served model directory (a baked model);
    a SAGEMAKER_PROGRAM that names no file there is a ConfigError.

    A multi-model endpoint (``env.multi_model``) starts with ``models`` only (usually none) and
    no handler script: SageMaker loads the models through the management API.
    """
    if env.multi_model is None:
        served = tuple(with_handler_script(list(models), _handler_script(env)))
    else:
        served = tuple(models)
    if env.is_batch:
        served = tuple(
            replace(m, batching=replace(m.batching, max_queue_rows=1 << 40)) for m in served
        )
    ranged = env.safe_port_range is not None
    timeout_s = env.timeout_s
    return ServerSettings(
        models=served,
        host="0.0.0.0",
        http_port=env.http_port,
        grpc_port=0 if ranged else DEFAULT_GRPC_PORT,
        metrics_port=0 if ranged else None,
        workers=env.workers,
        drain_timeout_s=(
            DEFAULT_DRAIN_TIMEOUT_S if timeout_s is None else min(timeout_s, MAX_DRAIN_TIMEOUT_S)
        ),
        max_body_bytes=env.max_body_bytes,
        request_timeout_s=60.0 if timeout_s is None else timeout_s,
        port_range=env.safe_port_range,
        skip_unavailable_ports=True,
        execution_parameters=env.execution_parameters,
        multi_model=env.multi_model,
    )


def _handler_script(env: SageMakerEnvironment) -> Path | None:
    program = env.program or DEFAULT_HANDLER_PROGRAM
    places = [env.base_dir / "model"]
    try:
        served_dir = model_dir(env)
    except ConfigError:
        served_dir = None  # no model at all: discovery already said so
    if served_dir is not None and served_dir not in places:
        places.append(served_dir)
    for place in places:
        script = find_handler_script(place, program)
        if script is not None:
            return script
    if env.program is not None:
        where = " nor ".join(str(p / HANDLER_DIR) for p in places)
        raise ConfigError(
            f"SAGEMAKER_PROGRAM={env.program!r}: no such script in {where} (SageMaker extracts "
            "model.tar.gz's code/ directory into the model directory)"
        )
    return None


def http_routes(params: ExecutionParameters) -> dict[str, Callable[[Any], Any]]:
    """SageMaker's extra HTTP routes for ``InferenceApp(extra_routes=...)``."""
    from rtbserve.transports.http import HttpResponse

    ok = HttpResponse(200, params.to_json(), "application/json")
    not_allowed = HttpResponse(
        405,
        b'{"code":405,"type":"method_not_allowed","message":"use GET","error":"use GET"}',
        "application/json",
        [("allow", "GET")],
    )

    def execution_parameters(request: Any) -> Any:
        return ok if request.method in ("GET", "HEAD") else not_allowed

    return {"/execution-parameters": execution_parameters}


def help_text() -> str:
    width = max(len(name) for name, _, _ in ENVIRONMENT)
    lines = [
        "usage: serve [serve | compile]",
        "",
        "Serve the SageMaker model (BASE/model) as SageMaker's hosting and Batch Transform",
        "contract asks (`serve compile`: compile and verify it into the cache, then exit),",
        "or a multi-model endpoint's models (SAGEMAKER_MULTI_MODEL=true);",
        "configured by the environment only:",
        "",
    ]
    lines += [
        f"  {name:<{width}}  {default:<12}  {effect}" for name, default, effect in ENVIRONMENT
    ]
    return "\n".join(lines)


class _Reader:
    """Reads variables, collecting every error so one message names them all."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.errors: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        if value is None or not value.strip():
            return None  # set but empty counts as unset, as SageMaker's own containers do
        return value.strip()

    def _bad(self, name: str, raw: str, expected: str) -> None:
        self.errors.append(f"{name}={raw!r}: expected {expected}")

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            self._bad(name, raw, f"an integer in {lo}..{hi}")
            return default
        return value

    def optional_integer(self, name: str, lo: int, hi: int) -> int | None:
        if self._raw(name) is None:
            return None
        value = self.integer(name, -1, lo, hi)
        return None if value == -1 else value

    def seconds(self, name: str) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not 0 < value < 1e6:  # also refuses nan and inf
            self._bad(name, raw, "a positive number of seconds")
            return None
        return value

    def boolean(self, name: str) -> bool:
        raw = self._raw(name)
        if raw is None:
            return False
        value = raw.lower()
        if value in ("true", "1", "yes"):
            return True
        if value not in ("false", "0", "no"):
            self._bad(name, raw, "true or false")
        return False

    def port_range(self, name: str) -> tuple[int, int] | None:
        raw = self._raw(name)
        if raw is None:
            return None
        lo_text, sep, hi_text = raw.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text)
        except ValueError:
            lo = hi = 0
        if not sep or not 1 <= lo <= hi <= 65535:
            self._bad(name, raw, "XXXX-YYYY, two ports with XXXX <= YYYY")
            return None
        return lo, hi

    def log_level(self, name: str) -> int:
        raw = self._raw(name)
        if raw is None:
            return 30
        try:
            return parse_log_level(raw)
        except ConfigError:
            self._bad(name, raw, "a level 0..50 (20) or a name (INFO, DEBUG, WARNING, ...)")
            return 30

    def strategy(self, name: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return "MULTI_RECORD"
        value = raw.upper()
        value = _STRATEGY_ALIASES.get(value, value)  # the API's MultiRecord spelling
        if value not in BATCH_STRATEGIES:
            self._bad(name, raw, " or ".join(BATCH_STRATEGIES))
            return "MULTI_RECORD"
        return value

    def program(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        parts = Path(raw).parts
        if Path(raw).is_absolute() or ".." in parts or not raw.endswith(".py"):
            self._bad(name, raw, "a .py script's path relative to the model's code/ directory")
            return None
        return raw

    def path(self, name: str) -> Path | None:
        raw = self._raw(name)
        return None if raw is None else Path(raw)

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError("invalid SageMaker environment: " + "; ".join(self.errors))
