"""rtbserve: compiled tree models served for real-time bidding."""

from __future__ import annotations

__version__ = "0.1.0"

from rtbserve.errors import (  # noqa: E402
    ArtifactError,
    CompileError,
    InvalidInput,
    RtbError,
    UnsupportedModel,
    VerificationFailed,
)
from rtbserve.registry.model import Model, load_model  # noqa: E402

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
