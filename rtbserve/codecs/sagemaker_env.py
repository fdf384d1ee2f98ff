"""What ``/invocations`` answers when the client does not say, read once from SageMaker's
environment: ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` (the response type for a missing Accept or
``*/*``; default ``text/csv``) and ``SAGEMAKER_INFERENCE_OUTPUT`` (selectable outputs, see
``rtbserve.codecs.selection``; set but empty is unset). A value that cannot be honoured is a
``ConfigError`` at start-up, never a surprise on the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from rtbserve.codecs.media import parse_media_type
from rtbserve.codecs.selection import SELECTION_MEDIA_TYPES, parse_inference_output
from rtbserve.errors import ConfigError, UnsupportedMediaType

DEFAULT_ACCEPT_ENV = "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"
INFERENCE_OUTPUT_ENV = "SAGEMAKER_INFERENCE_OUTPUT"


@dataclass(frozen=True, slots=True)
class InvocationsOptions:
    """default_accept: a concrete response media type (lower-case, no parameters).
    inference_output: the selected keys, or None for the plain score answers."""

    default_accept: str = "text/csv"
    inference_output: tuple[str, ...] | None = None

    def check(self, supported: tuple[str, ...]) -> InvocationsOptions:
        """Return self when ``default_accept`` is one of ``supported`` (the encoders available:
        every encoder, or ``SELECTION_MEDIA_TYPES`` with selected outputs); else
        ``ConfigError`` listing the choices."""
        if self.inference_output is not None:
            supported = tuple(t for t in supported if t in SELECTION_MEDIA_TYPES)
        if self.default_accept not in supported:
            extra = " with SAGEMAKER_INFERENCE_OUTPUT set" if self.inference_output else ""
            raise ConfigError(
                f"{DEFAULT_ACCEPT_ENV}={self.default_accept!r} is not a type /invocations can "
                f"answer{extra}; supported: {', '.join(supported)}"
            )
        return self


def invocations_options_from_env(
    supported: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> InvocationsOptions:
    """The options from ``environ`` (default ``os.environ``), checked against ``supported``
    response types. Raises ``ConfigError`` for a malformed or unsupported default Accept or an
    unknown output key."""
    env = os.environ if environ is None else environ
    raw_accept = env.get(DEFAULT_ACCEPT_ENV, "").strip()
    default_accept = "text/csv"
    if raw_accept:
        try:
            default_accept, _ = parse_media_type(raw_accept)
        except UnsupportedMediaType as exc:
            raise ConfigError(f"{DEFAULT_ACCEPT_ENV}={raw_accept!r}: {exc}") from None
    raw_output = env.get(INFERENCE_OUTPUT_ENV, "")
    output = parse_inference_output(raw_output) if raw_output.strip() else None  # "" is unset
    return InvocationsOptions(default_accept, output).check(supported)
