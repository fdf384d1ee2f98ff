"""Server error codes -> ``rtbserve.errors`` exceptions, shared by every client transport.

A server answers an error with a transport-neutral code (``RtbError.code``, e.g.
``"invalid_input"``) and a message; ``error_for_code`` turns that pair back into the exception
class the server raised, so callers catch the same classes in and out of process. The client's
own failures (no connection, a broken or timed-out exchange) are ``ConnectionFailed``, which is
both an ``RtbError`` and a ``ConnectionError``.
"""

from __future__ import annotations

from rtbserve.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotAcceptable,
    Overloaded,
    PayloadTooLarge,
    RtbError,
    UnsupportedMediaType,
)

# code -> class: the only table clients use to rebuild a server's error
ERROR_CLASSES: dict[str, type[RtbError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        UnsupportedMediaType,
        NotAcceptable,
        PayloadTooLarge,
        ModelNotFound,
        ModelNotReady,
        Overloaded,
        DeadlineExceeded,
    )
}


class ConnectionFailed(RtbError, ConnectionError):
    """The server could not be reached, or the connection broke before a complete answer.

    Raised by the clients, never by a server. Whether the server saw the request is unknown.
    """

    code = "unavailable"


class RequestTimedOut(ConnectionFailed, TimeoutError):
    """No complete answer (or no free pooled connection) within the client's ``timeout_s``."""

    code = "client_timeout"


def error_for_code(code: str, message: str, *, status: int | None = None) -> RtbError:
    """The exception a server reported as ``code`` with ``message``, ready to raise.

    ``code``: the server's error code (``RtbError.code``); a known code gives its class
    (``"model_not_found"`` -> ``ModelNotFound``), any other code a plain ``RtbError`` whose
    ``code`` attribute keeps the server's value. ``message``: the server's text, kept verbatim
    as ``str(exc)``. ``status``: the transport's status for the answer (the HTTP status code
    for HTTP clients), stored as ``exc.status``; None when there is none.
    """
    cls = ERROR_CLASSES.get(code)
    exc = RtbError(message) if cls is None else cls(message)
    if cls is None and code:
        exc.code = code
    exc.status = status  # type: ignore[attr-defined]
    return exc
