"""Codecs: request payload bytes -> float32 feature matrix, scores -> response bytes.

A codec is a pair of plain functions keyed by media type in ``DECODERS`` / ``ENCODERS``: one
module per format (CSV, JSON, JSON Lines, LIBSVM, RecordIO-protobuf, npy, Arrow/Parquet), plus
``selection`` for SageMaker's selectable outputs and ``sagemaker_env`` for the defaults read from
the environment. ``decode_rows`` and ``encode_scores`` are what a transport calls: they parse
the media type (case-insensitive, with parameters), check the parameters (``charset``; CSV's
``label_size``) and dispatch. Codecs know nothing about sockets or HTTP; they raise
``rtbserve.errors`` exceptions that each transport maps to status codes
(``UnsupportedMediaType`` 415, ``InvalidInput`` 400, ``NotAcceptable`` 406).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rtbserve.codecs.arrow_codec import parse_arrow_stream_rows, parse_parquet_rows
from rtbserve.codecs.csv_codec import parse_csv_rows, scores_to_csv
from rtbserve.codecs.json_codec import parse_json_rows, scores_to_json
from rtbserve.codecs.jsonlines_codec import parse_jsonlines_rows, scores_to_jsonlines
from rtbserve.codecs.libsvm_codec import parse_libsvm_rows
from rtbserve.codecs.media import negotiate, parse_media_type
from rtbserve.codecs.npy_codec import parse_npy_rows, scores_to_npy
from rtbserve.codecs.recordio_codec import parse_recordio_rows, scores_to_recordio
from rtbserve.errors import NotAcceptable, UnsupportedMediaType

DECODERS: dict[str, Callable[[bytes, int], np.ndarray]] = {
    "text/csv": parse_csv_rows,
    "application/json": parse_json_rows,
    "application/jsonlines": parse_jsonlines_rows,
    "text/libsvm": parse_libsvm_rows,
    "text/x-libsvm": parse_libsvm_rows,
    "application/x-recordio-protobuf": parse_recordio_rows,
    "application/x-npy": parse_npy_rows,
    "application/vnd.apache.arrow.stream": parse_arrow_stream_rows,
    "application/x-parquet": parse_parquet_rows,
}
# in preference order: a wildcard Accept ("application/*") that matches several picks the first
ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "text/csv": scores_to_csv,
    "application/json": scores_to_json,
    "application/jsonlines": scores_to_jsonlines,
    "application/x-recordio-protobuf": scores_to_recordio,
    "application/x-npy": scores_to_npy,
}
SUPPORTED_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def decode_rows(body: bytes, content_type: str, n_features: int) -> np.ndarray:
    """Decode a request body into a float32 (rows, n_features) C-contiguous array.

    ``content_type``: the raw Content-Type value, e.g. ``"text/csv; charset=utf-8"``.
    Raises ``UnsupportedMediaType`` for a missing/unknown type (listing the supported ones) or
    a charset other than UTF-8/ASCII, and whatever the decoder raises.
    """
    decoder = _DECODER_BY_HEADER.get(content_type)
    if decoder is None:
        decoder = _decoder_for(content_type)
        if len(_DECODER_BY_HEADER) < 256:  # clients send a few distinct values: parse each once
            _DECODER_BY_HEADER[content_type] = decoder
    return decoder(body, n_features)


_DECODER_BY_HEADER: dict[str, Callable[[bytes, int], np.ndarray]] = {}
_ENCODER_BY_TYPE: dict[str, tuple[Callable[[np.ndarray], bytes], str]] = {}


def _decoder_for(content_type: str) -> Callable[[bytes, int], np.ndarray]:
    if not content_type or not content_type.strip():
        raise UnsupportedMediaType(f"missing content type; supported: {', '.join(DECODERS)}")
    media, params = parse_media_type(content_type)
    decoder = DECODERS.get(media)
    if decoder is None:
        raise UnsupportedMediaType(
            f"unsupported content type {media!r}; supported: {', '.join(DECODERS)}"
        )
    charset = params.get("charset")
    if charset is not None and charset.lower() not in SUPPORTED_CHARSETS:
        raise UnsupportedMediaType(f"unsupported charset {charset!r}; supported: utf-8, ascii")
    label_size = params.get("label_size")
    if media == "text/csv" and label_size is not None and label_size != "1":
        # As the XGBoost container: label_size must be 1 (its training data's label column);
        # inference bodies carry no label column, so 1 is accepted and changes nothing.
        raise UnsupportedMediaType(
            f"unsupported label_size {label_size!r} for text/csv; only label_size=1 is accepted"
        )
    return decoder


def encode_scores(scores: np.ndarray, media_type: str) -> tuple[bytes, str]:
    """Encode scores for ``media_type`` (a type from ``negotiate``); returns (body, content type).

    The content type returned is concrete (no wildcards, no parameters). Raises
    ``NotAcceptable`` listing the supported types when ``media_type`` has no encoder.
    """
    found = _ENCODER_BY_TYPE.get(media_type)
    if found is None:
        media, _ = parse_media_type(media_type)
        encoder = ENCODERS.get(media)
        if encoder is None:
            raise NotAcceptable(
                f"cannot encode scores as {media!r}; supported: {', '.join(ENCODERS)}"
            )
        found = (encoder, media)
        if len(_ENCODER_BY_TYPE) < 256:
            _ENCODER_BY_TYPE[media_type] = found
    return found[0](scores), found[1]


__all__ = [
    "DECODERS",
    "ENCODERS",
    "decode_rows",
    "encode_scores",
    "negotiate",
    "parse_arrow_stream_rows",
    "parse_csv_rows",
    "parse_json_rows",
    "parse_jsonlines_rows",
    "parse_libsvm_rows",
    "parse_media_type",
    "parse_npy_rows",
    "parse_parquet_rows",
    "parse_recordio_rows",
    "scores_to_csv",
    "scores_to_json",
    "scores_to_jsonlines",
    "scores_to_npy",
    "scores_to_recordio",
]
