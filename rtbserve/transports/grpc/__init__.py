"""gRPC transport (grpc.aio, on the worker's uvloop loop): rtbserve's Predictor and the Open
Inference Protocol's GRPCInferenceService, plus the standard health and reflection services.

Exports resolve lazily so ``python -m rtbserve.transports.grpc.codegen`` runs even when the
generated modules in ``rtbserve/_proto/`` are missing or stale.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GrpcServer", "start_grpc_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rtbserve.transports.grpc import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
