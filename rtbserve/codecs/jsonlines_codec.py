"""JSON Lines payloads (``application/jsonlines``) <-> float32 feature matrices and scores.

A request holds one row per line, each line any JSON form of one row that ``json_codec``
accepts (``[f1, f2, ...]``, ``{"features": [...]}``, ``{"instances": [[...]]}`` holding one
row); ``\\r\\n`` line ends, whitespace around the body and a final newline are fine, a blank
line inside the body is not (Batch Transform needs one record per line). When every line is a
flat list, the whole body is parsed by one orjson call; anything else, or any error, takes the
per-line path, which names the line (1-based). A response is one ``{"score": p}`` object per
row (``{"scores": [...]}`` for multiclass), each line ``\\n``-terminated: exactly one output
line per input record, in order.
"""

from __future__ import annotations

import numpy as np
import orjson

from rtbserve.codecs.csv_codec import as_score_array
from rtbserve.codecs.json_codec import json_rows_to_matrix, rows_of
from rtbserve.errors import InvalidInput, RtbError, UnsupportedMediaType


def parse_jsonlines_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a JSON Lines body into a float32 C-contiguous array of shape (lines, n_features).

    Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType`` (a line that is not JSON,
    is blank, or does not hold exactly one row; a non-numeric value) or ``InvalidInput`` (wrong
    feature count), with the line number. Thread-safe.
    """
    text = body.strip()
    if not text:
        raise InvalidInput("empty body")
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    n_lines = text.count(b"\n") + 1
    may_hold_bools = b"true" in text or b"false" in text
    # Fast path: every line exactly "[...]" with no brackets, objects or strings inside, so the
    # lines joined by commas are one JSON list of rows, valid exactly when every line is.
    if (
        text[0] == 91  # "["
        and text[-1] == 93  # "]"
        and text.count(b"[") == n_lines
        and text.count(b"]") == n_lines
        and text.count(b"]\n[") == n_lines - 1
        and b"{" not in text
        and b'"' not in text
    ):
        try:
            rows = orjson.loads(b"[" + text.replace(b"\n", b",") + b"]")  # allocates
        except orjson.JSONDecodeError:
            rows = None
        if rows is not None and len(rows) == n_lines:
            try:
                return json_rows_to_matrix(  # no '"' in the text: no strings
                    rows, n_features, may_hold_bools=may_hold_bools, may_hold_strings=False
                )
            except RtbError:
                pass  # the per-line path names the line
    return _parse_lines(text, n_features)


def _parse_lines(text: bytes, n_features: int) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(text.split(b"\n"), start=1):
        if not line.strip():
            raise UnsupportedMediaType(
                f"line {lineno}: blank line inside the body; JSON Lines hold one row per line"
            )
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UnsupportedMediaType(f"line {lineno} is not valid JSON: {exc}") from exc
        try:
            line_rows = rows_of(doc)
            if len(line_rows) != 1:
                raise UnsupportedMediaType(
                    f"holds {len(line_rows)} rows; JSON Lines hold exactly one row per line"
                )
            rows.append(
                json_rows_to_matrix(
                    line_rows, n_features, may_hold_bools=True, may_hold_strings=True
                )
            )
        except InvalidInput as exc:  # UnsupportedMediaType too: same type, the line named
            raise type(exc)(f"line {lineno}: {exc}") from None
    return np.ascontiguousarray(np.concatenate(rows))


def scores_to_jsonlines(scores: np.ndarray) -> bytes:
    """Encode scores as JSON Lines: ``{"score":p}`` per row ((n, K): ``{"scores":[...]}``),
    each line ``\\n``-terminated; non-finite values are ``null``. No rows -> ``b""``."""
    arr = as_score_array(scores)
    if arr.size == 0:
        return b""
    # orjson writes float32 values' shortest text and NaN/+-inf as null: its list is ours
    dumped = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)  # allocates
    if arr.ndim == 1:  # "[a,b]" -> {"score":a}\n{"score":b}\n
        return b'{"score":' + dumped[1:-1].replace(b",", b'}\n{"score":') + b"}\n"
    return b'{"scores":[' + dumped[2:-2].replace(b"],[", b']}\n{"scores":[') + b"]}\n"
