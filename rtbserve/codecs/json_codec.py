"""JSON payloads <-> float32 feature matrices and prediction objects.

Accepted request forms: a list of rows (``[[...], ...]``), one flat row (``[...]``),
``{"instances": [[...], ...]}``, ``{"instances": [{"features": [...]}, ...]}`` and
``{"features": [...]}``. ``null`` is a missing value (NaN); booleans and strings are not
numbers. Bytes that are not JSON, or JSON of another shape, raise ``UnsupportedMediaType``;
a row of the wrong length raises ``InvalidInput``. Responses follow the SageMaker XGBoost
container: ``{"predictions": [{"score": p}, ...]}`` (``"scores"`` lists for multiclass),
each value the shortest text that round-trips float32; NaN and +-inf, which JSON cannot
spell, are written as ``null``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from rtbserve.codecs.csv_codec import _float64_to_float32, as_score_array
from rtbserve.errors import InvalidInput, UnsupportedMediaType

_NEXT_SCORE = b'},{"score":'
_NEXT_SCORES = b']},{"scores":['
_FORMS = (
    'expected one of: [[f1, f2, ...], ...], [f1, f2, ...], {"instances": [[...], ...]}, '
    '{"instances": [{"features": [...]}, ...]}, {"features": [...]}'
)


def rows_of(doc: Any) -> list[Any]:
    """The list of rows in any accepted form; UnsupportedMediaType for other shapes."""
    if isinstance(doc, dict):
        if "instances" in doc:
            instances = doc["instances"]
            if not isinstance(instances, list):
                raise UnsupportedMediaType(f'"instances" must be a list; {_FORMS}')
            if instances and isinstance(instances[0], dict):
                rows = []
                for i, inst in enumerate(instances):
                    if not isinstance(inst, dict) or not isinstance(inst.get("features"), list):
                        raise UnsupportedMediaType(f'instance {i} has no "features" list; {_FORMS}')
                    rows.append(inst["features"])
                return rows
            if instances and not isinstance(instances[0], list):
                return [instances]  # one flat row under "instances"
            return instances
        if "features" in doc and isinstance(doc["features"], list):
            return [doc["features"]]
        raise UnsupportedMediaType(f"unrecognised JSON object with keys {sorted(doc)}; {_FORMS}")
    if isinstance(doc, list):
        if not doc or isinstance(doc[0], list):
            return doc
        return [doc]
    raise UnsupportedMediaType(f"JSON {type(doc).__name__} is not a feature payload; {_FORMS}")


def _check_rows(rows: list[Any], n_features: int) -> np.ndarray:
    """Slow exact path: validate every value, naming the first bad row and index."""
    out = np.empty((len(rows), n_features), dtype=np.float64)
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise UnsupportedMediaType(f"row {r} is a {type(row).__name__}, not a list; {_FORMS}")
        if len(row) != n_features:
            raise InvalidInput(f"expected {n_features} features, got {len(row)} (row {r})")
        for i, v in enumerate(row):
            if v is None:
                out[r, i] = np.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[r, i] = float(v)
            else:
                raise UnsupportedMediaType(
                    f"row {r}, index {i}: {orjson.dumps(v).decode()[:40]} is not a number or null"
                )
    return out


def parse_json_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a JSON body into a float32 C-contiguous array of shape (rows, n_features).

    ``body``: raw UTF-8 bytes in one of the accepted forms (module docstring).
    ``n_features``: the model's feature count. Rows are numbered from 0 in errors, as JSON
    arrays are indexed. Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType``
    (not JSON, with orjson's line/column; wrong shape; non-numeric value) or ``InvalidInput``
    (wrong feature count; no rows). Thread-safe.
    """
    if not body.strip():
        raise InvalidInput("empty body")
    try:
        doc = orjson.loads(body)  # allocates
    except orjson.JSONDecodeError as exc:
        raise UnsupportedMediaType(f"body is not valid JSON: {exc}") from exc
    rows = rows_of(doc)
    if not rows:
        raise InvalidInput("no rows in the JSON body")
    return json_rows_to_matrix(
        rows,
        n_features,
        may_hold_bools=b"true" in body or b"false" in body,
        may_hold_strings=body.count(b'"') != _envelope_quotes(doc),
    )


def _envelope_quotes(doc: Any) -> int:
    """The double quotes the accepted forms' keys account for (-1: unknown), so that any other
    quote in the body is a string somewhere."""
    if isinstance(doc, list):
        return 0
    if isinstance(doc, dict) and len(doc) == 1:
        instances = doc.get("instances")
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            return 2 + 2 * len(instances) if all(len(i) == 1 for i in instances) else -1
        return 2
    return -1


def json_rows_to_matrix(
    rows: list[Any], n_features: int, *, may_hold_bools: bool, may_hold_strings: bool
) -> np.ndarray:
    """Rows decoded from JSON (a non-empty list of lists) as a float32 C-contiguous matrix.

    ``may_hold_bools`` / ``may_hold_strings``: whether the source text has ``true``/``false`` /
    strings other than the envelope's keys; NumPy would coerce those silently, so they narrow
    the fast paths. Raises ``UnsupportedMediaType`` (a row that is not a list; a value that is
    not a number or null) or ``InvalidInput`` (wrong feature count), naming the row (0-based)
    and index.
    """
    arr = None
    if not may_hold_bools:  # booleans: every value is checked one by one
        # Strings possible: numpy infers a float/int matrix only from plain numbers. Numbers and
        # nulls only: one C-level conversion to float64, null -> NaN.
        dtype = None if may_hold_strings else np.float64
        try:
            arr = np.array(rows, dtype=dtype)  # allocates
        except (ValueError, TypeError, OverflowError):
            arr = None  # ragged, nested or odd: the exact path says where
    if arr is not None and arr.dtype.kind in "fiu" and arr.ndim == 2:
        if arr.shape[1] != n_features:
            raise InvalidInput(f"expected {n_features} features, got {arr.shape[1]}")
        values = arr.astype(np.float64, copy=False)
    else:
        values = _check_rows(rows, n_features)
    return np.ascontiguousarray(_float64_to_float32(values))


def scores_to_json(scores: np.ndarray) -> bytes:
    """Encode scores as ``{"predictions": [{"score": p}, ...]}`` UTF-8 JSON.

    ``scores``: (n,) -> one ``{"score": p}`` per row; (n, K) -> ``{"scores": [p1, ..., pK]}``
    per row (multiclass). Cast to float32; non-finite values become ``null``.
    """
    arr = as_score_array(scores)
    if arr.size == 0:
        return b'{"predictions":[]}'
    # orjson writes float32 values' shortest text and NaN/+-inf as null: its list is ours
    dumped = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)  # allocates
    if arr.ndim == 1:  # "[a,b]" -> {"score":a},{"score":b}
        return b'{"predictions":[{"score":' + dumped[1:-1].replace(b",", _NEXT_SCORE) + b"}]}"
    rows = dumped[2:-2].replace(b"],[", _NEXT_SCORES)  # "[[a,b],[c,d]]"
    return b'{"predictions":[{"scores":[' + rows + b"]}]}"
