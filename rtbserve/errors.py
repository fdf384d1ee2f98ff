"""The one exception hierarchy of rtbserve.

Every error a caller can act on derives from ``RtbError`` and carries a transport-neutral
``code``. Each transport owns one table from code to HTTP status / gRPC status, so the core never
knows about either. Messages say what was expected and what arrived.
"""

from __future__ import annotations


class RtbError(Exception):
    """Root of every rtbserve error. ``code`` is transport-neutral."""

    code = "internal"


class InvalidInput(RtbError):
    """The request's data cannot be scored as sent (shape, dtype, feature count)."""

    code = "invalid_input"


class UnsupportedMediaType(InvalidInput):
    """The payload's content type is unknown, or its bytes do not parse as that type."""

    code = "unsupported_media_type"


class NotAcceptable(RtbError):
    """No response type the client accepts can be produced."""

    code = "not_acceptable"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class ModelNotFound(RtbError):
    code = "model_not_found"


class ModelNotReady(RtbError):
    code = "model_not_ready"


class Overloaded(RtbError):
    code = "overloaded"


class DeadlineExceeded(RtbError):
    code = "deadline_exceeded"


class ArtifactError(RtbError):
    """A model artifact cannot be read, compiled or served (bad file, unsupported feature)."""

    code = "artifact_error"


class UnsupportedModel(ArtifactError):
    """The model is valid but uses something this backend cannot serve."""

    code = "unsupported_model"


class CompileError(ArtifactError):
    """The native compiler failed; the message carries its diagnostics."""

    code = "compile_error"


class VerificationFailed(ArtifactError):
    """A backend's scores differ from the reference library's beyond tolerance."""

    code = "verification_failed"


class ConfigError(RtbError):
    """Server or model settings that cannot be used (bad rtbserve.toml, bad flag)."""

    code = "config_error"
