"""HTTP/1.1 transport: a lean httptools + asyncio server that calls an app object per request."""

from rtbserve.transports.http.protocol import (
    DeferredResponse,
    HttpApp,
    HttpLimits,
    HttpProtocol,
    HttpRequest,
    HttpResponse,
    HttpServerState,
    shutdown,
    start_http_server,
)

__all__ = [
    "DeferredResponse",
    "HttpApp",
    "HttpLimits",
    "HttpProtocol",
    "HttpRequest",
    "HttpResponse",
    "HttpServerState",
    "shutdown",
    "start_http_server",
]
