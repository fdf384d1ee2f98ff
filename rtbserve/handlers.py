"""User handler scripts: SageMaker's inference-toolkit convention, served by rtbserve.

A model directory's ``code/inference.py`` (or ``code/$SAGEMAKER_PROGRAM``) may define any of
``model_fn(model_dir)``, ``input_fn(request_body, request_content_type)``,
``predict_fn(input_data, model)``, ``output_fn(prediction, accept)`` -> body or
``(body, content_type)``, or ``transform_fn(model, request_body, content_type, accept)`` (which
replaces the other three: defining it with any of them is refused at load). What the script does
not define falls back to rtbserve's defaults: the compiled, verified model; the codecs (without
rtbserve's model: CSV, JSON or npy to a float32 matrix); the micro-batched kernel call (without
rtbserve's model: ``model.predict(data)``); the encoders with ``Accept`` negotiation. The script
serves ``POST /invocations``; a script with only ``input_fn``/``output_fn`` leaves the model on
``/v2`` and gRPC as before, one that replaces the model or the prediction serves ``/invocations``
only. A script that defines none of the functions changes nothing.

Where user code runs (one worker, one event loop)::

    request ── input_fn ──────── predict ─────────────────── output_fn ── response
    batched:   handler thread    micro-batcher: one call      handler thread
               (default: loop)   for many requests, in a       (default: loop)
                                 handler thread
    threaded:  ─────── one handler-thread job: input_fn, predict_fn, output_fn ───────
               (or transform_fn)

- *batched*: rtbserve's model with the default predict (its micro-batcher, as without a script),
  or a ``predict_fn`` declared batch-safe (``@rtbserve.handlers.batch_safe`` or
  ``predict_fn.batch_safe = True``): ``predict_fn(rows, model)`` takes a float32 (n, F) matrix
  and returns (n,) or (n, K) scores, row by row independent, so concurrent requests coalesce into
  one call (its own micro-batcher, one call at a time, always in a handler thread).
- *threaded*: any other ``predict_fn``, a custom model's ``model.predict`` and ``transform_fn``:
  one job per request in the model's handler pool (``handler_threads`` in ``rtbserve.toml``,
  default 1: one call at a time per worker, as the toolkit's model server runs a script), so slow
  user code never blocks the loop and ``/ping`` keeps answering.

The script is imported once per process: by the supervisor's prepare step (which checks it and
compiles rtbserve's model into the cache unless ``model_fn`` replaces it; it never calls
``model_fn``, which may be slow) and by each worker, which calls ``model_fn`` once before it is
ready. Errors: an ``rtbserve.errors.RtbError`` raised by user code keeps its meaning
(``InvalidInput`` 400, ``UnsupportedMediaType`` 415, ``NotAcceptable`` 406); any other exception,
``ValueError`` included (it is what bugs raise too), becomes ``HandlerError``: a 500 whose message
names the function, the exception type and its message, with the traceback logged once for the
request (once per call for a batch). Failures at load (import, ``model_fn``, a conflicting or
unusable script) stop the start-up with exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from rtbserve.config import ModelSettings
from rtbserve.errors import ConfigError, DeadlineExceeded, InvalidInput, Overloaded, RtbError

log = logging.getLogger("rtbserve.handlers")

HANDLER_NAMES = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")
# bodies of these types reach input_fn / transform_fn as str, as the inference toolkit does
TEXT_MEDIA_TYPES = frozenset({"text/csv", "application/json"})
MAX_FEATURE_WIDTHS = 16  # distinct row widths a custom model's batch-safe predict_fn batches
_MESSAGE_CHARS = 1000
_F32 = np.dtype(np.float32)

F = TypeVar("F", bound=Callable[..., Any])


class HandlerError(RtbError):
    """User handler code failed (or returned what cannot be served): HTTP 500 with a message."""

    code = "handler_error"


def batch_safe(fn: F) -> F:
    """Declare a ``predict_fn`` batch-safe: ``predict_fn(rows, model)`` takes a float32 (n, F)
    matrix and returns (n,) or (n, K) scores, each row's independent of the others, so rtbserve
    may score many requests' rows in one call (see the module docstring)."""
    fn.batch_safe = True  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True, slots=True)
class HandlerScript:
    """The handler functions a script defines (None: rtbserve's default)."""

    path: Path
    module: ModuleType
    model_fn: Callable[..., Any] | None
    input_fn: Callable[..., Any] | None
    predict_fn: Callable[..., Any] | None
    output_fn: Callable[..., Any] | None
    transform_fn: Callable[..., Any] | None
    is_predict_batch_safe: bool

    @property
    def defines_any(self) -> bool:
        return any(getattr(self, name) is not None for name in HANDLER_NAMES)

    @property
    def label(self) -> str:
        """``code/inference.py``: how messages name the script."""
        return f"{self.path.parent.name}/{self.path.name}"


_SCRIPTS: dict[Path, HandlerScript] = {}


def load_script(path: Path) -> HandlerScript:
    """Import the handler script at ``path`` once per process and check it.

    Its directory goes first on ``sys.path`` (the script may import helpers beside it). Anything
    it prints while imported goes to stderr (stdout is the worker's protocol with the
    supervisor). Raises ConfigError for an import that fails (traceback logged), a handler name
    bound to a non-callable, ``transform_fn`` with ``input_fn``/``predict_fn``/``output_fn``,
    or a ``batch_safe`` attribute that is not a bool.
    """
    path = path.resolve()
    found = _SCRIPTS.get(path)
    if found is not None:
        return found
    label = f"{path.parent.name}/{path.name}"
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{label}: not a Python script ({path})")
    module = importlib.util.module_from_spec(spec)
    code_dir = str(path.parent)
    if code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    is_registered = name not in sys.modules  # never shadow an imported module of that name
    if is_registered:
        sys.modules[name] = module  # as an import would (pickle, dataclasses need it)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            spec.loader.exec_module(module)
    except BaseException as exc:  # SyntaxError, SystemExit: all mean "cannot serve this"
        if is_registered:
            sys.modules.pop(name, None)
        log.error("importing the handler script %s failed", path, exc_info=True)
        raise ConfigError(f"{label}: importing it failed: {_describe(exc)}") from None
    functions: dict[str, Callable[..., Any] | None] = {}
    for handler in HANDLER_NAMES:
        fn = getattr(module, handler, None)
        if fn is not None and not callable(fn):
            raise ConfigError(f"{label}: {handler} must be a function, got {type(fn).__name__}")
        functions[handler] = fn
    others = [n for n in ("input_fn", "predict_fn", "output_fn") if functions[n] is not None]
    if functions["transform_fn"] is not None and others:
        raise ConfigError(
            f"{label} defines transform_fn together with {', '.join(others)}: transform_fn "
            "replaces input_fn, predict_fn and output_fn; define either transform_fn alone or "
            "any of the other three"
        )
    flag = getattr(functions["predict_fn"], "batch_safe", False)
    if not isinstance(flag, bool):
        raise ConfigError(f"{label}: predict_fn.batch_safe must be True or False, got {flag!r}")
    script = HandlerScript(path=path, module=module, is_predict_batch_safe=flag, **functions)
    _SCRIPTS[path] = script
    return script


def call_model_fn(script: HandlerScript, model_dir: Path) -> Any:
    """``model_fn(model_dir)``, as a worker calls it once before it is ready; ConfigError (with
    the traceback logged) when it raises or returns None."""
    assert script.model_fn is not None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = script.model_fn(str(model_dir))
    except BaseException as exc:
        log.error("model_fn in %s failed", script.path, exc_info=True)
        raise ConfigError(f"{script.label}: model_fn failed: {_describe(exc)}") from None
    if model is None:
        raise ConfigError(f"{script.label}: model_fn returned None; return the loaded model")
    return model


def model_dir_of(settings: ModelSettings) -> Path:
    """The directory ``model_fn`` gets: the model's directory (its file's, for a file)."""
    return settings.path if settings.path.is_dir() else settings.path.parent


def is_rtbserve_model(model: Any) -> bool:
    module = sys.modules.get("rtbserve.registry.model")  # not imported: cannot be its Model
    return module is not None and isinstance(model, module.Model)


def serves_natively(script: HandlerScript, model: Any) -> bool:
    """Whether the model keeps ``/v2`` and gRPC: rtbserve's model, scored by rtbserve."""
    return script.predict_fn is None and script.transform_fn is None and is_rtbserve_model(model)


class HandledModel:
    """One model whose ``/invocations`` runs through its handler script (module docstring).

    served: the ``ServedModel`` that ``dataplane`` (a ``DataPlane``) serves when
    ``serves_natively`` (its micro-batcher scores the default predictions), else None. The
    handler pool is the model's own (``settings.handler_threads`` threads). Not thread-safe:
    owned by the worker's event loop.
    """

    def __init__(
        self,
        settings: ModelSettings,
        script: HandlerScript,
        model: Any,
        *,
        served: Any = None,
        dataplane: Any = None,
        metrics: Any = None,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.script = script
        self.model = model
        self.served = served
        self._dataplane = dataplane
        self.metrics = metrics  # rtbserve.metrics.ModelMetrics, or None
        self.is_rtbserve_model = is_rtbserve_model(model)
        self.n_features: int | None = int(model.n_features) if self.is_rtbserve_model else None
        self.max_in_flight = settings.batching.max_queue_rows  # requests, here
        self.in_flight = 0
        self._batchers: dict[int, Any] = {}
        self._predict = self._check_predict()
        self.executor: Executor = ThreadPoolExecutor(
            settings.handler_threads, thread_name_prefix=f"rtbserve-handler-{settings.name}"
        )
        self.is_batched = script.transform_fn is None and (
            script.is_predict_batch_safe or (script.predict_fn is None and served is not None)
        )

    def _check_predict(self) -> Callable[[Any], Any]:
        """The threaded path's prediction step: predict_fn, or a custom model's ``predict``."""
        script, model = self.script, self.model
        if script.predict_fn is not None:
            predict_fn = script.predict_fn
            return lambda data: predict_fn(data, model)
        if script.transform_fn is not None or self.served is not None:
            return _unused  # transform_fn replaces it; the micro-batcher scores rtbserve's model
        predict = getattr(model, "predict", None)
        if not callable(predict):
            raise ConfigError(
                f"{script.label}: model_fn returned a {type(model).__name__}, which has no "
                "predict method; define predict_fn(input_data, model) (or transform_fn)"
            )
        return lambda data: predict(data)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- per request -----------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Shed before decoding: ``Overloaded`` past ``max_queue_rows`` requests in flight."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"model {self.name!r} is overloaded: {self.in_flight} requests in its handler "
                f"script (limit {self.max_in_flight}); retry later"
            )

    async def invoke(
        self,
        body: bytes,
        content_type: str,
        accept_header: str | None,
        default_accept: str,
        deadline: float | None = None,
    ) -> tuple[bytes, str, bool]:
        """Answer one ``/invocations`` request: ``(body, content_type, failed_open)``.

        content_type: the request's Content-Type (the transport's default when it sent none).
        accept_header: the raw Accept value or None; user functions get it, or
        ``default_accept`` when it is missing or ``*/*`` (as the toolkit does).
        deadline: absolute ``time.monotonic()`` seconds, or None. Raises RtbError subclasses.
        """
        accept = default_accept if not accept_header or accept_header == "*/*" else accept_header
        self.in_flight += 1
        try:
            if not self.is_batched:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self.executor,
                    self._run_threaded,
                    body,
                    content_type,
                    accept,
                    default_accept,
                    deadline,
                )
                return result[0], result[1], False
            return await self._run_batched(body, content_type, accept, default_accept, deadline)
        finally:
            self.in_flight -= 1

    def _run_threaded(
        self,
        body: bytes,
        content_type: str,
        accept: str,
        default_accept: str,
        deadline: float | None,
    ) -> tuple[bytes, str]:
        """The whole request in one handler thread (runs in ``self.executor``)."""
        _check_deadline(deadline)
        script = self.script
        if script.transform_fn is not None:
            result = self._call(
                "transform_fn",
                script.transform_fn,
                self.model,
                _user_body(body, content_type),
                content_type,
                accept,
            )
            return _as_response(result, accept, script.label, "transform_fn")
        data = self._input(body, content_type)
        name = "predict_fn" if script.predict_fn is not None else "model.predict"
        prediction = self._call(name, self._predict, data)
        return self._output(prediction, accept, default_accept)

    async def _run_batched(
        self,
        body: bytes,
        content_type: str,
        accept: str,
        default_accept: str,
        deadline: float | None,
    ) -> tuple[bytes, str, bool]:
        script = self.script
        loop = asyncio.get_running_loop()
        if script.input_fn is None:
            rows = self._rows(self._default_input(body, content_type), "input_fn")
        else:
            rows = await loop.run_in_executor(self.executor, self._input_rows, body, content_type)
        failed_open = False
        if script.predict_fn is None:
            remaining_ms = None if deadline is None else (deadline - time.monotonic()) * 1e3
            scores, failed_open = await self._dataplane.predict(self.served, rows, remaining_ms)
        else:
            scores = await self._batcher(rows.shape[1]).submit(rows, deadline)
        if script.output_fn is None:
            body_out, media_type = _default_output(scores, accept, default_accept)
        else:
            body_out, media_type = await loop.run_in_executor(
                self.executor, self._output, scores, accept, default_accept
            )
        return body_out, media_type, failed_open

    # -- stages ----------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; a non-RtbError becomes HandlerError, its traceback logged once."""
        try:
            return fn(*args)
        except RtbError:
            raise
        except Exception as exc:
            log.error("%s in %s failed", name, self.script.path, exc_info=True)
            message = f"handler {name} in {self.script.label} failed: {_describe(exc)}"
            raise HandlerError(message) from exc

    def _input(self, body: bytes, content_type: str) -> Any:
        input_fn = self.script.input_fn
        if input_fn is None:
            return self._default_input(body, content_type)
        return self._call("input_fn", input_fn, _user_body(body, content_type), content_type)

    def _input_rows(self, body: bytes, content_type: str) -> np.ndarray:
        return self._rows(self._input(body, content_type), "input_fn")

    def _default_input(self, body: bytes, content_type: str) -> np.ndarray:
        if self.n_features is not None:
            from rtbserve.codecs import decode_rows

            return decode_rows(body, content_type, self.n_features)
        return decode_matrix(body, content_type)

    def _output(self, prediction: Any, accept: str, default_accept: str) -> tuple[bytes, str]:
        output_fn = self.script.output_fn
        if output_fn is None:
            return _default_output(prediction, accept, default_accept)
        result = self._call("output_fn", output_fn, prediction, accept)
        return _as_response(result, accept, self.script.label, "output_fn")

    def _rows(self, data: Any, producer: str) -> np.ndarray:
        """``data`` as a float32 C-contiguous (n, F) matrix for a batched predict."""
        width = self.n_features
        if (
            type(data) is np.ndarray
            and data.dtype == _F32
            and data.ndim == 2
            and data.flags.c_contiguous
            and data.shape[0] > 0
            and (width is None or data.shape[1] == width)
        ):
            return data  # the default input_fn's result
        if not isinstance(data, np.ndarray | list | tuple):
            raise HandlerError(
                f"{producer} in {self.script.label} returned a {type(data).__name__}; the "
                "batched predict takes a numeric (rows, features) array"
            )
        try:
            values = np.asarray(data)
        except ValueError as exc:  # ragged lists
            raise InvalidInput(f"{producer}'s rows are not a matrix: {exc}") from None
        if values.dtype.kind not in "fiub":
            raise HandlerError(
                f"{producer} in {self.script.label} returned values of dtype {values.dtype}; "
                "the batched predict takes numbers"
            )
        if values.ndim == 1:
            values = values.reshape(1, -1)
        if values.ndim != 2 or values.shape[0] == 0:
            raise InvalidInput(f"expected rows of features (n, F), got shape {values.shape}")
        if width is not None and values.shape[1] != width:
            raise InvalidInput(f"expected {width} features, got {values.shape[1]}")
        from rtbserve.codecs.arrays import to_float32

        return to_float32(values)

    def _batcher(self, width: int) -> Any:
        """The micro-batcher of a batch-safe predict_fn for rows of ``width`` features."""
        batcher = self._batchers.get(width)
        if batcher is not None:
            return batcher
        if len(self._batchers) >= MAX_FEATURE_WIDTHS:
            raise InvalidInput(
                f"rows of {width} features; this model has seen rows of "
                f"{', '.join(map(str, sorted(self._batchers)))} features already"
            )
        from rtbserve.batching import MicroBatcher

        b = self.settings.batching
        batcher = MicroBatcher(
            self._score_batch,
            max_batch_rows=b.max_batch_rows,
            max_batch_delay_us=b.max_batch_delay_us,
            max_queue_rows=b.max_queue_rows,
            inline_max_rows=0,  # user code never runs on the loop
            executor=self.executor,
            metrics=self.metrics,
        )
        self._batchers[width] = batcher
        return batcher

    def _score_batch(self, rows: np.ndarray) -> np.ndarray:
        """A batch-safe predict_fn as the micro-batcher's kernel (one call at a time)."""
        assert self.script.predict_fn is not None
        scores = self._call("predict_fn", self.script.predict_fn, rows, self.model)
        n = rows.shape[0]
        shape = getattr(scores, "shape", None)
        if not isinstance(scores, np.ndarray):
            try:
                scores = np.asarray(scores)
            except ValueError:
                shape = None
            else:
                shape = scores.shape
        if shape is None or len(shape) not in (1, 2) or shape[0] != n:
            raise HandlerError(
                f"batch-safe predict_fn in {self.script.label} returned "
                f"{'shape ' + str(shape) if shape is not None else type(scores).__name__} for "
                f"{n} rows; expected ({n},) or ({n}, K)"
            )
        return scores


def serve_model(dataplane: Any, settings: ModelSettings, model: Any) -> HandledModel | None:
    """Add ``model`` (rtbserve's, or what ``model_fn`` returned) to ``dataplane`` as its handler
    script asks: natively when rtbserve scores it (``/v2``, gRPC), and through a
    ``HandledModel`` on ``/invocations`` when the script defines more than ``model_fn``.
    Returns that HandledModel, or None. ConfigError when the script cannot serve ``model``."""
    script = None if settings.handler_script is None else load_script(settings.handler_script)
    if script is None or not script.defines_any:
        dataplane.add(settings, model)
        return None
    served = dataplane.add(settings, model) if serves_natively(script, model) else None
    if served is not None and script.input_fn is None and script.output_fn is None:
        return None  # only model_fn, returning rtbserve's model: the default path serves it
    metrics = None if dataplane.metrics is None else dataplane.metrics.model(settings.name)
    handled = HandledModel(
        settings, script, model, served=served, dataplane=dataplane, metrics=metrics
    )
    dataplane.add_handled(settings, handled)
    return handled


def decode_matrix(body: bytes, content_type: str) -> np.ndarray:
    """The default input_fn without rtbserve's model: a CSV, JSON or npy body as a float32
    (rows, features) matrix, the width taken from the data. Raises InvalidInput or
    UnsupportedMediaType (listing these three) as the codecs do."""
    from rtbserve.codecs import parse_csv_rows, parse_json_rows, parse_media_type
    from rtbserve.errors import UnsupportedMediaType

    media, _ = parse_media_type(content_type) if content_type.strip() else ("", {})
    if media == "text/csv":
        first = body.lstrip().split(b"\n", 1)[0]
        return parse_csv_rows(body, first.count(b",") + 1)
    if media == "application/json":
        import orjson

        from rtbserve.codecs.json_codec import rows_of

        if not body.strip():
            raise InvalidInput("empty body")
        try:
            rows = rows_of(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            raise UnsupportedMediaType(f"body is not valid JSON: {exc}") from exc
        if not rows or not isinstance(rows[0], list):
            raise InvalidInput("no rows in the JSON body")
        return parse_json_rows(body, len(rows[0]))
    if media == "application/x-npy":
        from rtbserve.codecs.arrays import rows_to_float32

        try:
            values = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UnsupportedMediaType(f"body is not a .npy array: {exc}") from None
        width = values.shape[-1] if values.ndim else 1
        return rows_to_float32(values, width, "the .npy array")
    raise UnsupportedMediaType(
        f"unsupported content type {media or content_type!r} for a model loaded by model_fn; "
        "supported: text/csv, application/json, application/x-npy (or define input_fn)"
    )


def _default_output(prediction: Any, accept: str, default_accept: str) -> tuple[bytes, str]:
    """rtbserve's encoders, the type negotiated from ``accept``."""
    from rtbserve.codecs import ENCODERS, encode_scores, negotiate

    media_type = negotiate(accept, tuple(ENCODERS), default_accept)
    if not isinstance(prediction, np.ndarray):
        try:
            prediction = np.asarray(prediction)
        except ValueError:
            prediction = np.asarray(None)
    if prediction.dtype.kind not in "fiub" or prediction.ndim > 2:
        raise HandlerError(
            f"rtbserve's output_fn encodes numeric (n,) or (n, K) scores, but the prediction is "
            f"{prediction.dtype} of shape {prediction.shape}; define output_fn"
        )
    scores = np.ascontiguousarray(prediction.reshape(-1) if prediction.ndim == 0 else prediction)
    return encode_scores(scores.astype(_F32, copy=False), media_type)


def _user_body(body: bytes, content_type: str) -> bytes | str:
    """The body as input_fn / transform_fn get it: str for CSV and JSON, else bytes."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in TEXT_MEDIA_TYPES:
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"a {media} body must be UTF-8: {exc}") from None


def _as_response(result: Any, accept: str, label: str, fn: str) -> tuple[bytes, str]:
    """A handler's body or (body, content_type) as response bytes and content type."""
    content_type: Any = accept
    if isinstance(result, tuple):
        if len(result) != 2:
            raise HandlerError(
                f"{fn} in {label} returned a tuple of {len(result)}; expected body or "
                "(body, content_type)"
            )
        result, content_type = result
    if isinstance(result, str):
        body = result.encode()
    elif isinstance(result, bytes | bytearray | memoryview):
        body = bytes(result)
    else:
        raise HandlerError(
            f"{fn} in {label} returned a {type(result).__name__} body; expected bytes or str"
        )
    if (
        not isinstance(content_type, str)
        or not content_type
        or not content_type.isprintable()
        or not content_type.isascii()
    ):
        raise HandlerError(
            f"{fn} in {label} returned content type {content_type!r}; expected a printable "
            "ASCII media type"
        )
    return body, content_type


def _unused(data: Any) -> Any:
    raise AssertionError("not called")


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed while waiting for a handler thread")


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."
