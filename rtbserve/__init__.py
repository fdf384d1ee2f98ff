"""rtbserve: compiled tree models served for real-time bidding.

``load_model`` and ``Model`` import lazily, so the supervisor and the clients (which never score)
do not pay for numpy, numba and the reference libraries.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from rtbserve.errors import (  # noqa: E402
    ArtifactError,
    CompileError,
    InvalidInput,
    RtbError,
    UnsupportedModel,
    VerificationFailed,
)


def __getattr__(name: str) -> Any:
    if name in ("Model", "load_model"):
        from rtbserve.registry import model

        return getattr(model, name)
    raise AttributeError(f"module 'rtbserve' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "CompileError",
    "InvalidInput",
    "Model",
    "RtbError",
    "UnsupportedModel",
    "VerificationFailed",
    "__version__",
    "load_model",
]
