"""The one table from rtbserve error codes to gRPC status codes, the exception -> status step,
and the one place a finished call is counted.

Every gRPC handler turns a failure into ``(status, message, code)`` through ``status_for``: client
errors keep their message and log at info without a traceback; anything unexpected logs once with
its traceback and answers INTERNAL with a generic message. Unary calls also carry the error code
in the trailing metadata (``ERROR_CODE_KEY``) so rtbserve's clients rebuild the exact exception
class, not just the one the status implies. ``record_outcome`` counts each call (each message on
a stream) in the worker's metrics, as the HTTP transport does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc

from rtbserve.errors import RtbError

if TYPE_CHECKING:  # the clients import this module: keep it light
    from rtbserve.dataplane import ServedModel

log = logging.getLogger("rtbserve.grpc")

# error code -> gRPC status: the only place the mapping lives
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_media_type": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_model": grpc.StatusCode.INVALID_ARGUMENT,
    "payload_too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "not_acceptable": grpc.StatusCode.INVALID_ARGUMENT,
    "model_not_found": grpc.StatusCode.NOT_FOUND,
    "model_not_ready": grpc.StatusCode.UNAVAILABLE,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
}
# trailing-metadata key carrying ``RtbError.code`` on failed unary calls
ERROR_CODE_KEY = "rtb-error-code"
INTERNAL_MESSAGE = "internal error"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """``(status, message, error_code)`` to answer ``exc`` with; logs it (see module docstring)."""
    code = exc.code if isinstance(exc, RtbError) else "internal"
    status = STATUS_BY_CODE.get(code)
    if status is None and code.startswith("unsupported_"):
        status = grpc.StatusCode.INVALID_ARGUMENT
    if status is None:
        log.error("unexpected error", exc_info=exc)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, "internal"
    log.info("%s: %s", code, exc)
    return status, str(exc), code


def status_number(status: grpc.StatusCode) -> int:
    """The wire number of ``status`` (3 for INVALID_ARGUMENT, ...)."""
    return int(status.value[0])


def record_outcome(
    metrics: Any,
    route: int,
    served: ServedModel | None,
    status: grpc.StatusCode,
    code: str = "",
    failed_open: bool = False,
) -> None:
    """Count one finished call in ``metrics`` (a ``rtbserve.metrics.WorkerMetrics``, or None).

    route: a ``rtbserve.metrics.ROUTE_GRPC_*``. served: the model, None when the request named no
    model that could be found (counted under model ""). code: the error code of a failure
    (``status_for``'s third value); shed and missed deadlines also count on their own, as do
    fail-open answers.
    """
    if metrics is None:
        return
    if served is None:
        metrics.server.request(route, status)
        return
    handle = metrics.model(served.name)
    handle.request(route, status)
    if failed_open:
        handle.count_fail_open()
    elif code == "overloaded":
        handle.count_shed()
    elif code == "deadline_exceeded":
        handle.count_deadline_missed()
