"""The HTTP app: routes, codec choice and the one table from error codes to HTTP statuses.

Routes: SageMaker's ``GET /ping`` and ``POST /invocations`` (the default model); the Open
Inference Protocol (KServe v2) REST API under ``/v2``; Prometheus ``GET /metrics``. Thin by
design: decode with the codecs, call the dataplane, encode. Health and metadata routes answer
synchronously (no task); inference awaits the micro-batcher.

``/invocations`` takes every content type in ``rtbserve.codecs.DECODERS`` and answers the
Accept-negotiated type of ``ENCODERS`` (``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` for none or
``*/*``). With ``SAGEMAKER_INFERENCE_OUTPUT`` set, it answers the selected outputs instead
(``rtbserve.codecs.selection``) in CSV, JSON, JSON Lines or RecordIO-protobuf; both are read
once, when the app is built, and a bad value stops the start-up. When the default model has a
handler script (``rtbserve.handlers``), ``/invocations`` runs it instead (its own route method,
chosen once: the plain route's hot path is untouched).

A SageMaker multi-model endpoint (``models``, a ``rtbserve.model_registry.ModelRegistry``) adds
the management API on the same port: ``POST /models`` ``{"model_name", "url"}``, ``GET /models
[?limit=&next_page_token=]``, ``GET /models/NAME``, ``DELETE /models/NAME`` and ``POST
/models/NAME/invoke`` (the formats of ``/invocations``). ``/invocations`` itself answers 400
there: SageMaker invokes ``/models/NAME/invoke``, and ``X-Amzn-SageMaker-Target-Model`` holds
the model's S3 path, not its name, so it only goes to the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import numpy as np
import orjson

from rtbserve import __version__
from rtbserve.codecs import ENCODERS, decode_rows, encode_scores
from rtbserve.codecs.media import negotiate
from rtbserve.codecs.oip_codec import encode_oip_response, parse_oip_request, server_metadata
from rtbserve.codecs.sagemaker_env import InvocationsOptions, invocations_options_from_env
from rtbserve.codecs.selection import SELECTION_MEDIA_TYPES, OutputSelection
from rtbserve.config import ModelSettings
from rtbserve.dataplane import DataPlane, ServedModel
from rtbserve.errors import ConfigError, InvalidInput, ModelNotFound, RtbError
from rtbserve.metrics import ModelMetrics, WorkerMetrics, route_index
from rtbserve.transports.http.protocol import DeferredResponse, HttpRequest, HttpResponse

if TYPE_CHECKING:
    from rtbserve.model_registry import ModelRegistry

log = logging.getLogger("rtbserve.http")

# error code -> HTTP status: the only place the mapping lives
STATUS_BY_CODE = {
    "invalid_input": 400,
    "unsupported_media_type": 415,
    "not_acceptable": 406,
    "payload_too_large": 413,
    "model_not_found": 404,
    "model_not_ready": 503,
    "overloaded": 503,
    "deadline_exceeded": 504,
    "handler_error": 500,
    "model_already_loaded": 409,
    "insufficient_memory": 507,
}
DEADLINE_HEADER = "x-rtb-deadline-ms"
FAIL_OPEN_HEADER = "x-rtb-fail-open"
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
OIP_HEADER_LENGTH = "inference-header-content-length"
_PING_OK = HttpResponse(200)
_PING_NOT_READY = HttpResponse(503)
_NO_CONTENT = HttpResponse(204)
_JSON = "application/json"
_R_INVOCATIONS = route_index("invocations")
_R_V2_INFER = route_index("v2_infer")
TARGET_MODEL = "x-amzn-sagemaker-target-model"
_MAX_PAGE = 1000
_DEFAULT_PAGE = 100


def error_response(exc: RtbError) -> HttpResponse:
    status = STATUS_BY_CODE.get(exc.code, 500)
    if exc.code == "handler_error":
        message = str(exc)  # user code failed: logged where it was caught, with its traceback
    elif status == 500:
        log.error("unexpected error", exc_info=exc)
        message = "internal error"
    else:
        log.info("%s: %s", exc.code, exc)
        message = str(exc)
    # "error" is the Open Inference Protocol's field; the others are rtbserve's
    body = orjson.dumps({"code": status, "type": exc.code, "message": message, "error": message})
    return HttpResponse(status, body, _JSON)


def _not_found(path: str) -> HttpResponse:
    message = f"no route {path!r}"
    body = orjson.dumps({"code": 404, "type": "not_found", "message": message, "error": message})
    return HttpResponse(404, body, _JSON)


class InferenceApp:
    """Every HTTP route over one worker's dataplane.

    metrics: this worker's metrics; ``render_metrics`` renders the whole server's (every
    worker's) exposition for ``GET /metrics``. options: the default Accept and selected
    outputs; None reads them from the SageMaker environment (``ConfigError`` for a bad value, or
    for selected outputs on a model that does not serve its default predictions). models: a
    multi-model endpoint's registry: serve the ``/models`` API (see the module docstring).
    """

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: WorkerMetrics,
        *,
        options: InvocationsOptions | None = None,
        render_metrics: Callable[[], tuple[bytes, str]] | None = None,
        extra_routes: dict[str, Callable[[HttpRequest], HttpResponse]] | None = None,
        models: ModelRegistry | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        supported = tuple(ENCODERS)
        if options is None:
            options = invocations_options_from_env(supported)
        self.options = options.check(supported)
        self.default_accept = options.default_accept
        self.supported_accept = supported
        self._selections: dict[str, OutputSelection] = {}
        if options.inference_output is not None:
            self.supported_accept = tuple(t for t in supported if t in SELECTION_MEDIA_TYPES)
            for served in dataplane.served_models:  # check every model now: fail at start-up
                self._selection(served)
            # selected outputs take their own route; the plain one keeps its hot path untouched
            self._invocations = self._invocations_selected  # type: ignore[method-assign]
        self._handled = dataplane.invocations_handler
        if self._handled is not None:
            if options.inference_output is not None:
                raise ConfigError(
                    "SAGEMAKER_INFERENCE_OUTPUT selects rtbserve's own outputs, but "
                    f"{self._handled.script.label} answers /invocations; unset one of them"
                )
            self._invocations = self._invocations_handled  # type: ignore[method-assign]
        self._render_metrics = render_metrics
        # exact path -> sync handler, for deployment-specific routes (SageMaker's
        # /execution-parameters); looked up after the hot routes
        self._extra_routes = dict(extra_routes or {})
        self._accept_cache: dict[str | None, str] = {}
        self._models = models
        if models is not None:
            models.validators.append(self._check_servable)
            models.removed.append(self._forget_model)
            self._invocations = self._invocations_multi_model  # type: ignore[method-assign]

    def _accept(self, header: str | None) -> str:
        # clients send the same few Accept values: negotiate each once, not per request
        chosen = self._accept_cache.get(header)
        if chosen is None:
            chosen = negotiate(header, self.supported_accept, self.default_accept)
            if len(self._accept_cache) < 64:
                self._accept_cache[header] = chosen
        return chosen

    def handle(self, request: HttpRequest) -> HttpResponse | DeferredResponse:
        path = request.path
        if path == "/invocations":
            if request.method != "POST":
                return _method_not_allowed("POST")
            return self._invocations(request)
        if path == "/ping":
            response = _PING_OK if self.dataplane.is_ready else _PING_NOT_READY
            self.metrics.count_request("ping", "", response.status)
            return response
        if path.startswith("/v2"):
            return self._v2(request, path)
        if path == "/metrics":
            return self.metrics_response(request)
        if self._models is not None and path.startswith("/models"):
            return self._models_api(request, path)
        extra = self._extra_routes.get(path)
        if extra is not None:
            response = extra(request)
            self.metrics.count_request("other", "", response.status)
            return response
        self.metrics.count_request("other", "", 404)
        return _not_found(path)

    def metrics_response(self, request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed("GET")
        self.metrics.count_request("metrics", "", 200)
        if self._render_metrics is None:
            return _not_found(request.path)
        body, content_type = self._render_metrics()
        return HttpResponse(200, body, content_type)

    # -- inference, shared by both protocols ------------------------------------------------

    def _submit(
        self,
        request: HttpRequest,
        served: ServedModel,
        model_metrics: ModelMetrics,
        rows: np.ndarray,
        route: int,
        finish: Callable[[np.ndarray, bool], HttpResponse],
        decode_s: float,
    ) -> HttpResponse | DeferredResponse:
        """Queue ``rows`` on the model's micro-batcher; ``finish(scores, failed_open)`` builds the
        response when they are scored (from the batcher's flush: no Task, no future).
        decode_s: the decode stage's time, recorded with the outcome."""
        deadline = None
        if DEADLINE_HEADER in request.headers:
            try:
                deadline = time.monotonic() + _deadline_ms(request) / 1e3  # type: ignore[operator]
            except RtbError as exc:
                model_metrics.observe_decode_s(decode_s)
                return self._failed(exc, route, model_metrics)
        deferred = DeferredResponse()

        def on_scored(scores: np.ndarray | None, exc: BaseException | None) -> None:
            deferred.resolve(
                self._scored(served, model_metrics, rows, route, finish, decode_s, scores, exc)
            )

        try:
            served.batcher.submit_callback(rows, deadline, on_scored)
        except RtbError as exc:  # shed or already late: answered at once
            return self._scored(served, model_metrics, rows, route, finish, decode_s, None, exc)
        return deferred

    def _scored(
        self,
        served: ServedModel,
        model_metrics: ModelMetrics,
        rows: np.ndarray,
        route: int,
        finish: Callable[[np.ndarray, bool], HttpResponse],
        decode_s: float,
        scores: np.ndarray | None,
        exc: BaseException | None,
    ) -> HttpResponse:
        failed_open = False
        try:
            if exc is not None:
                if not isinstance(exc, RtbError):
                    raise exc
                scores = self.dataplane.fail_open(served, rows.shape[0], exc)
                failed_open = True
                model_metrics.count_fail_open()
            t0 = time.perf_counter()
            response = finish(scores, failed_open)  # type: ignore[arg-type]
            encode_s = time.perf_counter() - t0
        except RtbError as error:
            model_metrics.observe_decode_s(decode_s)
            return self._failed(error, route, model_metrics)
        except Exception as error:  # a bug in scoring or encoding: one 500, logged once
            model_metrics.observe_decode_s(decode_s)
            internal = RtbError(f"scoring or encoding failed for model {served.name!r}")
            internal.__cause__ = error
            return self._failed(internal, route, model_metrics)
        model_metrics.ok_request(route, decode_s, encode_s)
        if failed_open:
            response.headers.append((FAIL_OPEN_HEADER, "1"))
        return response

    def _failed(
        self, exc: RtbError, route: int, model_metrics: ModelMetrics | None
    ) -> HttpResponse:
        response = error_response(exc)
        if model_metrics is None:
            self.metrics.count_request(route, "", response.status)
        else:
            model_metrics.request(route, response.status)
            if exc.code == "overloaded":
                model_metrics.count_shed()
            elif exc.code == "deadline_exceeded":
                model_metrics.count_deadline_missed()
        return response

    # -- SageMaker -------------------------------------------------------------------------

    def _invocations(
        self, request: HttpRequest, selected: bool = False
    ) -> HttpResponse | DeferredResponse:
        """``/invocations`` on the default model; ``selected``: answer the outputs
        SAGEMAKER_INFERENCE_OUTPUT names instead of the scores."""
        dp = self.dataplane
        model_metrics = None
        encode_selected = None
        try:
            if not request.body:
                self.metrics.count_request(_R_INVOCATIONS, "", 204)
                return _NO_CONTENT
            served = dp.get(None)
            model_metrics = served.metrics or self.metrics.model(served.name)
            dp.check_capacity(served)  # shed before decoding
            accept = self._accept(request.headers.get("accept"))
            if selected:
                encode_selected = self._selection(served).encoder(accept)
            t0 = time.perf_counter()
            rows = decode_rows(
                request.body, request.headers.get("content-type", "text/csv"), served.n_features
            )
            decode_s = time.perf_counter() - t0
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, model_metrics)
        attrs = request.headers.get(CUSTOM_ATTRIBUTES)

        def finish(scores: np.ndarray, failed_open: bool) -> HttpResponse:
            if encode_selected is None:
                body, media_type = encode_scores(scores, accept)
            else:
                body, media_type = encode_selected(scores), accept
            response = HttpResponse(200, body, media_type)
            if attrs is not None:
                response.headers.append((CUSTOM_ATTRIBUTES, attrs))
            return response

        return self._submit(request, served, model_metrics, rows, _R_INVOCATIONS, finish, decode_s)

    def _selection(self, served: ServedModel) -> OutputSelection:
        """The model's selected outputs (built once per model)."""
        selection = self._selections.get(served.name)
        if selection is None:
            keys = self.options.inference_output or ()
            if served.settings.output != "probability":
                raise ConfigError(
                    f"SAGEMAKER_INFERENCE_OUTPUT derives every value from the model's default "
                    f"predictions, but model {served.name!r} is served with output="
                    f"{served.settings.output!r} (rtbserve.toml); remove that setting or unset "
                    "SAGEMAKER_INFERENCE_OUTPUT"
                )
            model = served.model
            selection = OutputSelection(
                keys,
                objective=model.objective,
                n_outputs=served.n_outputs,
                is_classifier=bool(model.meta.output.is_classifier),
                threshold=model.threshold,
                model_name=served.name,
            )
            self._selections[served.name] = selection
        return selection

    def _invocations_selected(self, request: HttpRequest) -> HttpResponse | DeferredResponse:
        """``/invocations`` answering the selected outputs (SAGEMAKER_INFERENCE_OUTPUT)."""
        # the class attribute: this instance's ``_invocations`` is this very method
        return InferenceApp._invocations(self, request, selected=True)

    def _invocations_handled(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """``/invocations`` through the default model's handler script (rtbserve.handlers)."""
        handled = self._handled
        model_metrics = handled.metrics or self.metrics.model(handled.name)
        try:
            if not request.body:
                self.metrics.count_request(_R_INVOCATIONS, "", 204)
                return _NO_CONTENT
            self.dataplane.check_ready()
            handled.check_capacity()  # shed before decoding
            deadline_ms = _deadline_ms(request)
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, model_metrics)
        deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3
        return self._handled_response(request, model_metrics, deadline)

    async def _handled_response(
        self, request: HttpRequest, model_metrics: ModelMetrics, deadline: float | None
    ) -> HttpResponse:
        headers = request.headers
        try:
            body, media_type, failed_open = await self._handled.invoke(
                request.body,
                headers.get("content-type", "text/csv"),
                headers.get("accept"),
                self.default_accept,
                deadline,
            )
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, model_metrics)
        response = HttpResponse(200, body, media_type)
        attrs = headers.get(CUSTOM_ATTRIBUTES)
        if attrs is not None:
            response.headers.append((CUSTOM_ATTRIBUTES, attrs))
        if failed_open:
            model_metrics.count_fail_open()
            response.headers.append((FAIL_OPEN_HEADER, "1"))
        model_metrics.request(_R_INVOCATIONS, 200)
        return response

    # -- SageMaker multi-model endpoints -----------------------------------------------------

    def _invocations_multi_model(self, request: HttpRequest) -> HttpResponse:
        """``/invocations`` on a multi-model endpoint: no default model to answer with."""
        return self._failed(
            InvalidInput(
                "this is a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true): invoke a model "
                "with POST /models/NAME/invoke"
            ),
            _R_INVOCATIONS,
            None,
        )

    def _check_servable(self, settings: ModelSettings) -> None:
        """Refuse, before it is registered, a model the selected outputs cannot serve."""
        if self.options.inference_output is not None and settings.output != "probability":
            raise InvalidInput(
                f"SAGEMAKER_INFERENCE_OUTPUT derives every value from the model's default "
                f"predictions, but model {settings.name!r} is served with output="
                f"{settings.output!r} (rtbserve.toml)"
            )

    def _forget_model(self, name: str) -> None:
        self._selections.pop(name, None)  # a reload under this name may differ

    def _managed(self, response: HttpResponse) -> HttpResponse:
        self.metrics.count_request("other", "", response.status)
        return response

    def _models_api(
        self, request: HttpRequest, path: str
    ) -> HttpResponse | DeferredResponse | Awaitable[HttpResponse]:
        if path != "/models" and not path.startswith("/models/"):
            return self._managed(_not_found(path))
        parts = [unquote(p) for p in path.split("/")[2:]]  # "/models/a/invoke" -> ["a", "invoke"]
        if parts and parts[-1] == "":
            parts.pop()  # tolerate a trailing slash
        method = request.method
        if len(parts) == 2 and parts[1] == "invoke":
            if method != "POST":
                return _method_not_allowed("POST")
            return self._model_invoke(request, parts[0])
        if not parts:
            if method == "POST":
                return self._model_load(request)
            if method in ("GET", "HEAD"):
                return self._managed(self._model_list(request))
            return _method_not_allowed("GET, POST")
        if len(parts) == 1:
            if method in ("GET", "HEAD"):
                return self._managed(self._model_describe(parts[0]))
            if method == "DELETE":
                return self._managed(self._model_unload(request, parts[0]))
            return _method_not_allowed("GET, DELETE")
        return self._managed(_not_found(path))

    async def _model_load(self, request: HttpRequest) -> HttpResponse:
        assert self._models is not None
        try:
            name, url = _load_request(request.body)
            entry = await self._models.load(name, url)
        except RtbError as exc:
            return self._managed(error_response(exc))
        log.info(
            "loaded model %r from %s (target model %s)",
            name,
            url,
            request.headers.get(TARGET_MODEL, "-"),
        )
        body = {"modelName": entry.name, "modelUrl": entry.url, "status": "loaded"}
        return self._managed(HttpResponse(200, orjson.dumps(body), _JSON))

    def _model_list(self, request: HttpRequest) -> HttpResponse:
        assert self._models is not None
        try:
            query = parse_qs(request.query, keep_blank_values=True)
            limit = _query_int(query, "limit", _DEFAULT_PAGE, 1, _MAX_PAGE)
            start = _query_int(query, "next_page_token", 0, 0, 1 << 62)
        except RtbError as exc:
            return error_response(exc)
        self._models.sync()
        entries = self._models.entries
        page = entries[start : start + limit]
        doc: dict[str, Any] = {"models": [{"modelName": e.name, "modelUrl": e.url} for e in page]}
        if start + limit < len(entries):
            doc["nextPageToken"] = str(start + limit)
        return HttpResponse(200, orjson.dumps(doc), _JSON)

    def _model_describe(self, name: str) -> HttpResponse:
        assert self._models is not None
        try:
            self._models.sync()
            entry = self._models.entry(name)
        except RtbError as exc:
            return error_response(exc)
        return HttpResponse(
            200, orjson.dumps({"modelName": entry.name, "modelUrl": entry.url}), _JSON
        )

    def _model_unload(self, request: HttpRequest, name: str) -> HttpResponse:
        assert self._models is not None
        try:
            entry = self._models.unload(name)
        except RtbError as exc:
            return error_response(exc)
        log.info(
            "unloaded model %r (target model %s)", name, request.headers.get(TARGET_MODEL, "-")
        )
        body = {"modelName": entry.name, "modelUrl": entry.url, "status": "unloaded"}
        return HttpResponse(200, orjson.dumps(body), _JSON)

    def _model_invoke(
        self, request: HttpRequest, name: str
    ) -> HttpResponse | DeferredResponse | Awaitable[HttpResponse]:
        """``POST /models/NAME/invoke``: as ``/invocations``, for the named model."""
        assert self._models is not None
        self._models.sync()  # one integer comparison unless a model came or went
        try:
            served = self.dataplane.get(name)
        except ModelNotFound:  # not here yet (registered by another worker), or unknown
            return self._invoke_when_loaded(request, name)
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, None)
        prepared = self._prepare_invoke(request, served)
        if prepared.__class__ is HttpResponse:
            return prepared  # type: ignore[return-value]
        model_metrics, rows, decode_s, finish = prepared  # type: ignore[misc]
        return self._submit(request, served, model_metrics, rows, _R_INVOCATIONS, finish, decode_s)

    async def _invoke_when_loaded(self, request: HttpRequest, name: str) -> HttpResponse:
        """The first invoke of a model this worker has not loaded yet: load it (from the
        compile cache), then score through its micro-batcher."""
        assert self._models is not None
        try:
            served = await self._models.served(name)
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, None)
        prepared = self._prepare_invoke(request, served)
        if isinstance(prepared, HttpResponse):
            return prepared
        model_metrics, rows, decode_s, finish = prepared
        try:
            deadline_ms = _deadline_ms(request)
        except RtbError as exc:
            model_metrics.observe_decode_s(decode_s)
            return self._failed(exc, _R_INVOCATIONS, model_metrics)
        deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3
        scores, error = None, None
        try:
            scores = await served.batcher.submit(rows, deadline)
        except Exception as exc:  # answered by _scored: fail-open, error status or 500
            error = exc
        return self._scored(
            served, model_metrics, rows, _R_INVOCATIONS, finish, decode_s, scores, error
        )

    def _prepare_invoke(
        self, request: HttpRequest, served: ServedModel
    ) -> (
        HttpResponse
        | tuple[ModelMetrics, np.ndarray, float, Callable[[np.ndarray, bool], HttpResponse]]
    ):
        """Shed, negotiate and decode an invoke: (metrics, rows, decode seconds, finish), or
        the response when it ends here (empty body, error)."""
        model_metrics = served.metrics or self.metrics.model(served.name)
        try:
            if not request.body:
                self.metrics.count_request(_R_INVOCATIONS, "", 204)
                return _NO_CONTENT
            self.dataplane.check_capacity(served)  # shed before decoding
            media_type = self._accept(request.headers.get("accept"))
            selected = None
            if self.options.inference_output is not None:
                selected = self._selection(served).encoder(media_type)
            t0 = time.perf_counter()
            rows = decode_rows(
                request.body, request.headers.get("content-type", "text/csv"), served.n_features
            )
            decode_s = time.perf_counter() - t0
        except RtbError as exc:
            return self._failed(exc, _R_INVOCATIONS, model_metrics)
        attrs = request.headers.get(CUSTOM_ATTRIBUTES)

        def finish(scores: np.ndarray, failed_open: bool) -> HttpResponse:
            if selected is None:
                body, out_type = encode_scores(scores, media_type)
            else:
                body, out_type = selected(scores), media_type
            response = HttpResponse(200, body, out_type)
            if attrs is not None:
                response.headers.append((CUSTOM_ATTRIBUTES, attrs))
            return response

        return model_metrics, rows, decode_s, finish

    # -- Open Inference Protocol -----------------------------------------------------------

    def _v2(self, request: HttpRequest, path: str) -> HttpResponse | DeferredResponse:
        parts = [unquote(p) for p in path.split("/")[2:]]  # "/v2/a/b" -> ["a", "b"]
        dp = self.dataplane
        if parts and parts[-1] == "":
            parts.pop()  # tolerate a trailing slash
        if len(parts) >= 2 and parts[0] == "models":
            name, rest = parts[1], parts[2:]
            if len(rest) >= 2 and rest[0] == "versions":
                if rest[1] != "1":
                    return self._v2_done(
                        error_response(
                            ModelNotFound(f"model {name!r} has no version {rest[1]!r}; versions: 1")
                        )
                    )
                rest = rest[2:]
            if rest == ["infer"]:
                if request.method != "POST":
                    return _method_not_allowed("POST")
                return self._v2_infer(request, name)
            if request.method not in ("GET", "HEAD"):
                return _method_not_allowed("GET")
            if rest == ["ready"]:
                return self._v2_done(_PING_OK if dp.is_model_ready(name) else _PING_NOT_READY)
            if not rest:
                try:
                    served = dp.get(name)
                except RtbError as exc:
                    return self._v2_done(error_response(exc))
                return self._v2_done(HttpResponse(200, orjson.dumps(served.metadata()), _JSON))
            return self._v2_done(_not_found(path))
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed("GET")
        if not parts:
            return self._v2_done(HttpResponse(200, server_metadata(__version__), _JSON))
        if parts == ["health", "live"]:
            return self._v2_done(_PING_OK, "v2_health")
        if parts == ["health", "ready"]:
            return self._v2_done(_PING_OK if dp.is_ready else _PING_NOT_READY, "v2_health")
        return self._v2_done(_not_found(path))

    def _v2_done(self, response: HttpResponse, route: str = "v2_metadata") -> HttpResponse:
        self.metrics.count_request(route, "", response.status)
        return response

    def _v2_infer(self, request: HttpRequest, name: str) -> HttpResponse | DeferredResponse:
        dp = self.dataplane
        out_dtype = "FP32"
        model_metrics = None
        try:
            served = dp.get(name)
            model_metrics = served.metrics or self.metrics.model(served.name)
            out_dtype = served.out_datatype
            dp.check_capacity(served)
            header_length = _header_length(request)
            t0 = time.perf_counter()
            parsed = parse_oip_request(request.body, served.n_features, header_length)
            decode_s = time.perf_counter() - t0
        except RtbError as exc:
            return self._failed(exc, _R_V2_INFER, model_metrics)

        def finish(scores: np.ndarray, failed_open: bool) -> HttpResponse:
            body, json_length = encode_oip_response(
                served.name, scores, parsed, failed_open=failed_open, out_dtype=out_dtype
            )
            if json_length is None:
                return HttpResponse(200, body, _JSON)
            headers = [("Inference-Header-Content-Length", str(json_length))]
            return HttpResponse(200, body, "application/octet-stream", headers)

        return self._submit(
            request, served, model_metrics, parsed.rows, _R_V2_INFER, finish, decode_s
        )


def _load_request(body: bytes) -> tuple[str, str]:
    """``POST /models``'s body -> (model_name, url); ``InvalidInput`` for anything else."""
    from rtbserve.model_registry import check_model_name

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            f"expected a JSON object {{model_name, url}}, got bad JSON: {exc}"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"expected a JSON object {{model_name, url}}, got {type(doc).__name__}")
    url = doc.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"url must be a non-empty string (the model's directory), got {url!r}")
    return check_model_name(doc.get("model_name")), url


def _query_int(query: dict[str, list[str]], key: str, default: int, lo: int, hi: int) -> int:
    values = query.get(key)
    if not values:
        return default
    raw = values[-1]
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise InvalidInput(f"{key} must be an integer in {lo}..{hi}, got {raw!r}")
    return value


def _header_length(request: HttpRequest) -> int | None:
    raw = request.headers.get(OIP_HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(
            f"Inference-Header-Content-Length must be an integer, got {raw!r}"
        ) from None


def _deadline_ms(request: HttpRequest) -> float | None:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(
            f"{DEADLINE_HEADER} must be a number of milliseconds, got {raw!r}"
        ) from None
    if not value > 0:
        raise InvalidInput(f"{DEADLINE_HEADER} must be positive, got {raw!r}")
    return value


def _method_not_allowed(allowed: str) -> HttpResponse:
    message = f"use {allowed}"
    body = orjson.dumps(
        {"code": 405, "type": "method_not_allowed", "message": message, "error": message}
    )
    return HttpResponse(405, body, _JSON, [("allow", allowed)])
