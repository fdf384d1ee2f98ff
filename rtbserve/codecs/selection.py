"""SageMaker selectable inference outputs (``SAGEMAKER_INFERENCE_OUTPUT``): which values each row
answers, and how they are written in JSON, JSON Lines, CSV and RecordIO-protobuf.

The semantics are the SageMaker XGBoost container's (``serve_utils.get_selected_predictions``):
every value derives from the model's prediction, the output ``Model.predict`` returns by default
(a probability for ``binary:logistic``, a margin for ``binary:logitraw``, K probabilities for
multiclass, the value for regressors), so one kernel call serves any selection.

===============  ==================  =====================  ===================
key              binary (sigmoid) p  ``binary:logitraw`` m  multiclass P (n, K)
===============  ==================  =====================  ===================
predicted_label  p >= threshold      m >= logit(threshold)  argmax P
labels           [0, 1]              [0, 1]                 [0, ..., K-1]
probability      p                   (not valid)            max P
probabilities    [1 - p, p]          (not valid)            P
raw_score        p                   m                      max P
raw_scores       [1 - p, p]          [1 - m, m]             P
===============  ==================  =====================  ===================

Regressors answer ``predicted_score`` (the value). ``raw_score`` is the prediction, not the
margin, exactly as in the container (its docstring: "a 'probability' can be considered as a
'raw score'"). ``binary:hinge`` answers like ``binary:logitraw`` with its 0/1 output.
``multi:softmax`` is served with K probabilities, so it answers like ``multi:softprob``.
Differences from the container, on purpose: ``predicted_label`` uses the served model's
threshold and rule (``Model.predict(output="label")``: ``>=``, the ``rtbserve.toml`` /
``features.json`` threshold, 0.5 by default) where the container hard-codes ``p > 0.5``;
values are float32 written with their shortest round-tripping text (``0.8``, where the
container prints the float64 widening ``0.800000011920929``), and ``1 - p`` is computed in
float32; a key not valid for the model (the container answers NaN and logs a warning) is
``null`` in JSON, ``nan`` in CSV, NaN in RecordIO, and is warned about once, at start-up; an
unknown key name is refused at start-up.

Layouts: JSON ``{"predictions": [{"predicted_label": 1, "probability": 0.8}, ...]}``; JSON Lines
one such object per line; CSV one line per row, the values in the order the keys were given,
a list written as in the container, quoted: ``1,0.8,"[0.2, 0.8]"``; RecordIO one record per row
with ``label[key]`` a float32 tensor per key. Every line ``\\n``-terminated, one per row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from rtbserve.codecs.csv_codec import _float32_tokens
from rtbserve.codecs.recordio_codec import columns_to_recordio
from rtbserve.errors import ConfigError

log = logging.getLogger("rtbserve.codecs")

PREDICTED_LABEL = "predicted_label"
LABELS = "labels"
PROBABILITY = "probability"
PROBABILITIES = "probabilities"
RAW_SCORE = "raw_score"
RAW_SCORES = "raw_scores"
PREDICTED_SCORE = "predicted_score"
SELECTABLE_KEYS = (
    PREDICTED_LABEL,
    LABELS,
    PROBABILITY,
    PROBABILITIES,
    RAW_SCORE,
    RAW_SCORES,
    PREDICTED_SCORE,
)
_CLASSIFIER_KEYS = (PREDICTED_LABEL, LABELS, PROBABILITY, PROBABILITIES, RAW_SCORE, RAW_SCORES)
# model kind -> the keys it answers (the container's VALID_OBJECTIVES, by output kind)
VALID_KEYS = {
    "binary": _CLASSIFIER_KEYS,
    "margin": (PREDICTED_LABEL, LABELS, RAW_SCORE, RAW_SCORES),
    "multiclass": _CLASSIFIER_KEYS,
    "regression": (PREDICTED_SCORE,),
}
SELECTION_MEDIA_TYPES = (
    "text/csv",
    "application/json",
    "application/jsonlines",
    "application/x-recordio-protobuf",
)
_F32 = np.dtype(np.float32)
_CHUNK_ROWS = 4096
_NON_FINITE = (b"nan", b"inf", b"-inf")


def parse_inference_output(value: str) -> tuple[str, ...]:
    """The keys of a ``SAGEMAKER_INFERENCE_OUTPUT`` value, in order, without repeats.

    Spaces are ignored and names are case-insensitive, as in the container; empty items
    (``"a,,b"``, a trailing comma) are skipped. Raises ``ConfigError`` naming an unknown key
    and listing the valid ones, or when no key is given.
    """
    keys: list[str] = []
    for item in value.replace(" ", "").lower().split(","):
        if not item or item in keys:
            continue
        if item not in SELECTABLE_KEYS:
            raise ConfigError(
                f"SAGEMAKER_INFERENCE_OUTPUT: unknown key {item!r}; valid keys: "
                f"{', '.join(SELECTABLE_KEYS)}"
            )
        keys.append(item)
    if not keys:
        raise ConfigError(
            f"SAGEMAKER_INFERENCE_OUTPUT={value!r} selects nothing; valid keys: "
            f"{', '.join(SELECTABLE_KEYS)}"
        )
    return tuple(keys)


def model_kind(objective: str, n_outputs: int, is_classifier: bool) -> str:
    """``binary``, ``margin`` (an output that is a margin or a 0/1 decision: logitraw, hinge),
    ``multiclass`` or ``regression``."""
    if n_outputs > 1:
        return "multiclass"
    if not is_classifier:
        return "regression"
    if objective in ("binary:logitraw", "binary:hinge"):
        return "margin"
    return "binary"


@dataclass(frozen=True, slots=True)
class _Column:
    """One selected value per row, as the token lists each layout needs."""

    key: str
    kind: str  # "int" (n,), "float" (n,), "list" (n, k) floats, "const" (same list every row)
    values: Any  # np.ndarray, or a list of ints for "const", or None when not valid (NaN)


class OutputSelection:
    """The selected outputs of one served model; its encoders are thread-safe.

    keys: from ``parse_inference_output``. objective, n_outputs, is_classifier, threshold: the
    served model's facts (``Model.objective``, ``.n_outputs``, ``.meta.output.is_classifier``,
    ``.threshold``); the ``scores`` its encoders take are the model's default predictions.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        *,
        objective: str,
        n_outputs: int,
        is_classifier: bool,
        threshold: float,
        model_name: str = "",
    ) -> None:
        self.keys = keys
        self.kind = model_kind(objective, n_outputs, is_classifier)
        self.n_classes = max(n_outputs, 2)
        self.threshold = float(threshold)
        # the cut predicted_label applies, exactly as Model.predict(output="label") does: a
        # Python float (compared in the scores' precision), or for logitraw the margin logit(t)
        # as a NumPy float64 (compared in float64)
        self._cut: Any = self.threshold
        if objective == "binary:logitraw":
            t = min(max(self.threshold, 1e-12), 1 - 1e-12)
            self._cut = np.log(t / (1 - t))
        self.invalid_keys = tuple(k for k in keys if k not in VALID_KEYS[self.kind])
        if self.invalid_keys:
            log.warning(
                "SAGEMAKER_INFERENCE_OUTPUT: %s not valid for model %r (%s, %s); answered as "
                "NaN/null. Valid keys for it: %s",
                ", ".join(self.invalid_keys),
                model_name,
                objective,
                self.kind,
                ", ".join(VALID_KEYS[self.kind]),
            )
        self._encoders: dict[str, Callable[[np.ndarray], bytes]] = {
            "text/csv": self.to_csv,
            "application/json": self.to_json,
            "application/jsonlines": self.to_jsonlines,
            "application/x-recordio-protobuf": self.to_recordio,
        }

    # -- values ---------------------------------------------------------------------------

    def columns(self, scores: np.ndarray) -> list[_Column]:
        """The selected values for ``scores`` (the model's predictions, (n,) or (n, K))."""
        s = np.asarray(scores)
        kind = self.kind
        out = []
        for key in self.keys:
            if key in self.invalid_keys:
                out.append(_Column(key, "float", None))
            elif key == LABELS:
                out.append(_Column(key, "const", list(range(self.n_classes))))
            elif key == PREDICTED_SCORE:
                out.append(_Column(key, "float", s))
            elif kind == "multiclass":
                if key == PREDICTED_LABEL:
                    out.append(_Column(key, "int", np.argmax(s, axis=1).astype(np.int32)))
                elif key in (PROBABILITY, RAW_SCORE):
                    out.append(_Column(key, "float", s.max(axis=1)))
                else:  # probabilities, raw_scores
                    out.append(_Column(key, "list", s))
            elif key == PREDICTED_LABEL:
                out.append(_Column(key, "int", (s >= self._cut).astype(np.int32)))
            elif key in (PROBABILITY, RAW_SCORE):
                out.append(_Column(key, "float", s))
            else:  # probabilities, raw_scores: [1 - x, x]
                x = s.astype(_F32, copy=False)
                out.append(_Column(key, "list", np.stack([np.float32(1) - x, x], axis=1)))
        return out

    # -- layouts --------------------------------------------------------------------------

    def encoder(self, media_type: str) -> Callable[[np.ndarray], bytes]:
        """The encoder for one of ``SELECTION_MEDIA_TYPES``."""
        return self._encoders[media_type]

    def _joined_rows(self, scores: np.ndarray, json: bool, end: bytes) -> bytes:
        """Every row's selected values as a JSON object (``json``) or a CSV line body, each
        followed by ``end``, concatenated.

        A row is a fixed sequence of literal bytes and per-row tokens; the tokens of each
        column are made by one orjson call and the rows by slice assignment into one list and
        one join, so no Python code runs per row.
        """
        n = int(np.asarray(scores).shape[0])
        segments: list[bytes | list[bytes]] = []  # literal, tokens, literal, ..., literal
        literal = b"{" if json else b""
        for i, col in enumerate(self.columns(scores)):
            if i:
                literal += b","
            if json:
                literal += b'"' + col.key.encode() + b'":'
            if col.values is None:
                literal += b"null" if json else b"nan"
            elif col.kind == "const":
                items = [str(v).encode() for v in col.values]
                literal += (
                    b"[" + b",".join(items) + b"]" if json else b'"[' + b", ".join(items) + b']"'
                )
            elif col.kind == "list":
                segments += [literal + (b"[" if json else b'"['), _list_tokens(col.values, json)]
                literal = b"]" if json else b']"'
            else:
                tokens = (
                    orjson.dumps(col.values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
                    if col.kind == "int"
                    else _scalar_tokens(col.values, json)
                )
                segments += [literal, tokens]
                literal = b""
        segments.append(literal + (b"}" if json else b"") + end)
        stride = len(segments)
        chunks = []
        for start in range(0, n, _CHUNK_ROWS):  # chunks keep the parts list cache-sized
            rows = min(_CHUNK_ROWS, n - start)
            parts: list[bytes] = [b""] * (rows * stride)  # allocates
            for j, segment in enumerate(segments):
                if isinstance(segment, list):
                    parts[j::stride] = segment[start : start + rows]
                else:
                    parts[j::stride] = [segment] * rows
            chunks.append(b"".join(parts))
        return b"".join(chunks)

    def to_json(self, scores: np.ndarray) -> bytes:
        rows = self._joined_rows(scores, json=True, end=b",")
        return b'{"predictions":[' + rows[:-1] + b"]}"

    def to_jsonlines(self, scores: np.ndarray) -> bytes:
        return self._joined_rows(scores, json=True, end=b"\n")

    def to_csv(self, scores: np.ndarray) -> bytes:
        return self._joined_rows(scores, json=False, end=b"\n")

    def to_recordio(self, scores: np.ndarray) -> bytes:
        n = int(np.asarray(scores).shape[0])
        arrays = []
        for col in self.columns(scores):
            if col.values is None:
                arrays.append((col.key, np.full(n, np.nan, dtype=_F32)))
            elif col.kind == "const":
                arrays.append((col.key, np.tile(np.asarray(col.values, dtype=_F32), (n, 1))))
            else:
                arrays.append((col.key, col.values))
        return columns_to_recordio(arrays)


def _scalar_tokens(values: np.ndarray, json: bool) -> list[bytes]:
    arr = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    tokens = _float32_tokens(arr)
    if json and not np.isfinite(arr).all():
        tokens = [b"null" if t in _NON_FINITE else t for t in tokens]
    return tokens


def _list_tokens(values: np.ndarray, json: bool) -> list[bytes]:
    """Per row, the row's values comma-separated (JSON) or ", "-separated (CSV)."""
    arr = np.ascontiguousarray(values, dtype=_F32)
    dumped = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)  # "[[a,b],[c,d]]"
    if json:  # orjson's null for NaN and +-inf is JSON's
        return dumped[2:-2].split(b"],[")
    if np.isfinite(arr).all():
        return dumped[2:-2].replace(b",", b", ").split(b"], [")
    n, k = arr.shape
    flat = _float32_tokens(arr.reshape(-1))  # nan, inf, -inf spelled out
    return [b", ".join(flat[i : i + k]) for i in range(0, n * k, k)]
