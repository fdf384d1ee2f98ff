"""The HTTP app: routes, codec choice and the one table from error codes to HTTP statuses.

Thin by design: decode with the codecs, call the dataplane, encode. ``/ping`` and ``GET``
health routes answer synchronously (no task); ``/invocations`` awaits the micro-batcher.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import orjson

from rtbserve.codecs import ENCODERS, decode_rows, encode_scores
from rtbserve.codecs.media import negotiate
from rtbserve.dataplane import DataPlane
from rtbserve.errors import InvalidInput, RtbError
from rtbserve.transports.http.protocol import HttpRequest, HttpResponse

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
}
DEADLINE_HEADER = "x-rtb-deadline-ms"
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
_PING_OK = HttpResponse(200)
_PING_NOT_READY = HttpResponse(503)
_NO_CONTENT = HttpResponse(204)


def error_response(exc: RtbError) -> HttpResponse:
    status = STATUS_BY_CODE.get(exc.code, 500)
    if status == 500:
        log.error("unexpected error", exc_info=exc)
        message = "internal error"
    else:
        log.info("%s: %s", exc.code, exc)
        message = str(exc)
    body = orjson.dumps({"code": status, "type": exc.code, "message": message})
    return HttpResponse(status, body, "application/json")


class InferenceApp:
    """SageMaker-style ``/ping`` and ``/invocations`` over the dataplane."""

    def __init__(self, dataplane: DataPlane, *, default_accept: str = "text/csv") -> None:
        self.dataplane = dataplane
        self.default_accept = default_accept
        self.supported_accept = tuple(ENCODERS)
        self._accept_cache: dict[str | None, str] = {}

    def _accept(self, header: str | None) -> str:
        # clients send the same few Accept values: negotiate each once, not per request
        chosen = self._accept_cache.get(header)
        if chosen is None:
            chosen = negotiate(header, self.supported_accept, self.default_accept)
            if len(self._accept_cache) < 64:
                self._accept_cache[header] = chosen
        return chosen

    def handle(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        path = request.path
        if path == "/invocations":
            if request.method != "POST":
                return _method_not_allowed("POST")
            return self._invocations(request)
        if path == "/ping":
            return _PING_OK if self.dataplane.is_ready else _PING_NOT_READY
        body = orjson.dumps({"code": 404, "type": "not_found", "message": f"no route {path!r}"})
        return HttpResponse(404, body, "application/json")

    async def _invocations(self, request: HttpRequest) -> HttpResponse:
        try:
            if not request.body:
                return _NO_CONTENT
            dp = self.dataplane
            served = dp.get(None)
            dp.check_capacity(served)  # shed before decoding
            accept = self._accept(request.headers.get("accept"))
            content_type = request.headers.get("content-type", "text/csv")
            rows = decode_rows(request.body, content_type, served.n_features)
            scores = await dp.infer(served, rows, _deadline_ms(request))
            body, media_type = encode_scores(scores, accept)
        except RtbError as exc:
            return error_response(exc)
        response = HttpResponse(200, body, media_type)
        attrs = request.headers.get(CUSTOM_ATTRIBUTES)
        if attrs is not None:
            response.headers.append((CUSTOM_ATTRIBUTES, attrs))
        return response


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
    body = orjson.dumps({"code": 405, "type": "method_not_allowed", "message": f"use {allowed}"})
    return HttpResponse(405, body, "application/json", [("allow", allowed)])
