"""HTTP/1.1 response bytes: precomputed status lines and header encoding, nothing else.

Pure functions over primitives so the protocol's hot path is one call and a few concatenations.
"""

from __future__ import annotations

import json
from http import HTTPStatus

STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii")) for s in HTTPStatus
}
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Statuses that never carry a body nor a content-length (RFC 9110 8.6).
_BODYLESS = frozenset({204, 304})
_CONTENT_TYPE_LINES: dict[str, bytes] = {}
_MAX_CACHED_CONTENT_TYPES = 64


def status_to_line(status: int) -> bytes:
    """``HTTP/1.1 {status} {reason}\\r\\n``; unknown codes in 100..999 get an empty reason."""
    line = STATUS_LINES.get(status)
    if line is not None:
        return line
    if not 100 <= status <= 999:
        raise ValueError(f"expected an HTTP status in 100..999, got {status!r}")
    return b"HTTP/1.1 %d \r\n" % status


def _content_type_line(content_type: str) -> bytes:
    line = _CONTENT_TYPE_LINES.get(content_type)
    if line is None:
        line = _header_line("content-type", content_type)
        if len(_CONTENT_TYPE_LINES) < _MAX_CACHED_CONTENT_TYPES:
            _CONTENT_TYPE_LINES[content_type] = line
    return line


def _header_line(name: str, value: str) -> bytes:
    line = f"{name}: {value}\r\n"
    if "\r" in line[:-2] or "\n" in line[:-2]:
        raise ValueError(f"header {name!r} contains CR or LF; refusing to send it")
    return line.encode("latin-1")


def encode_response(
    status: int,
    body: bytes,
    content_type: str | None,
    headers: list[tuple[str, str]] | None,
    *,
    close: bool,
    http10_keep_alive: bool = False,
    omit_body: bool = False,
) -> bytes:
    """One complete response: status line, headers, blank line, body.

    ``close`` adds ``connection: close``; ``http10_keep_alive`` adds ``connection: keep-alive``
    (an HTTP/1.0 client only keeps the connection when told); ``omit_body`` is for HEAD, where
    the content-length still describes the body that a GET would get. Raises ValueError for an
    invalid status or a header containing CR/LF.
    """
    head = STATUS_LINES.get(status) or status_to_line(status)
    if content_type is not None:
        head += _content_type_line(content_type)
    if status in _BODYLESS:
        omit_body = True
    else:
        head += b"content-length: %d\r\n" % len(body)
    if headers:
        head += b"".join([_header_line(n, v) for n, v in headers])
    if close:
        head += b"connection: close\r\n\r\n"
    elif http10_keep_alive:
        head += b"connection: keep-alive\r\n\r\n"
    else:
        head += b"\r\n"
    return head if omit_body else head + body  # allocates


def error_body(status: int, error_type: str, message: str) -> bytes:
    """The JSON body of an error the transport generates itself."""
    return json.dumps(
        {"code": status, "type": error_type, "message": message}, separators=(",", ":")
    ).encode()
