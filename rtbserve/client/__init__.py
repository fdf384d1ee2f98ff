"""Python clients for ad servers calling rtbserve: HTTP/1.1 and gRPC, sync and asyncio.

Import-light: ``import rtbserve.client`` loads no transport; each client's module (and its
dependencies: httptools, or grpcio) loads on first use of its name. The errors they raise are the
``rtbserve.errors`` classes the server raised, plus ``ConnectionFailed`` / ``RequestTimedOut``
for the connection itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtbserve.client._common import Prediction
    from rtbserve.client._errors import ConnectionFailed, RequestTimedOut, error_for_code
    from rtbserve.client.grpc import AsyncGrpcClient, GrpcClient
    from rtbserve.client.http import AsyncHttpClient, HttpClient

# public name -> module that defines it
_EXPORTS = {
    "HttpClient": "rtbserve.client.http",
    "AsyncHttpClient": "rtbserve.client.http",
    "Prediction": "rtbserve.client._common",
    "GrpcClient": "rtbserve.client.grpc",
    "AsyncGrpcClient": "rtbserve.client.grpc",
    "ConnectionFailed": "rtbserve.client._errors",
    "RequestTimedOut": "rtbserve.client._errors",
    "error_for_code": "rtbserve.client._errors",
}

__all__ = [
    "AsyncGrpcClient",
    "AsyncHttpClient",
    "ConnectionFailed",
    "GrpcClient",
    "HttpClient",
    "Prediction",
    "RequestTimedOut",
    "error_for_code",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
