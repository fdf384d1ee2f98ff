"""CSV payloads <-> float32 feature matrices and score lines, by the SageMaker CSV rules.

A body is rows of numbers, one per line (``\\n`` or ``\\r\\n``), no header, no label column.
Whitespace around the whole body and around each field is ignored; an empty field is a missing
value (NaN); ``nan`` and ``inf`` are numbers. Every value is exactly ``np.float32(float(token))``.

Parsing has up to three paths; the first two return the exact path's matrix or pass the body
on. The C path (``_csv_fast.c``, built at install; one pass, straight into the float32
result, without the GIL for large bodies) takes every body whose rows all have
``n_features`` fields of valid tokens; it checks each token against float()'s grammar itself
and converts through float64 as float() does. What it passes on (every body, when no compiler
built it at install) goes to the Python fast path, which checks cheap byte-level invariants
(only numeric bytes; no blank line; every line has ``n_features - 1`` commas), spells empty
fields as missing values and hands the whole body to one C parser call: orjson when every
field is a JSON number, else numpy's ``fromstring``. Anything else falls to the exact path, a
per-token Python parser that either returns the same matrix or raises the precise error:
``UnsupportedMediaType`` for bytes that are not this format (with line and column, counted in
the original body), ``InvalidInput`` for a well-formed body with the wrong feature count.
Scores are written with the shortest text that round-trips float32.
"""

from __future__ import annotations

import numpy as np
import orjson

from rtbserve.errors import InvalidInput, UnsupportedMediaType

try:
    from rtbserve.codecs._csv_fast import parse_rows as _parse_rows_c
except ImportError:  # built without a C compiler: the Python paths below do the same job
    _parse_rows_c = None

# Bytes a valid numeric body can contain: digits, signs, point, exponent, the letters of
# nan/inf/infinity, and separators. Spaces and tabs also go to the exact path: numpy's parser
# treats whitespace around separators loosely (a blank field can come back as -1.0).
_NUMERIC_BYTES = b"0123456789.eE+-nNaAiIfFtTyY,\n\r"
_JSON_NUMBER_BYTES = b"0123456789.eE+-,"
_MAX_TOKEN_SHOWN = 40
# orjson writes NaN and +-inf as null, and no finite number has an "n": one byte test (an int
# in bytes is the cheapest) tells whether its text needs the nan/inf spellings.
_NULL_FIRST_BYTE = ord("n")
_JSON_LIST_TO_LINES = bytes.maketrans(b",]", b"\n\n")


def _float64_to_float32(values: np.ndarray) -> np.ndarray:
    # float64 -> float32 rounding is what np.float32(float(token)) does; values beyond
    # float32's range become +-inf, as there, without a RuntimeWarning.
    with np.errstate(over="ignore"):
        return values.astype(np.float32)  # allocates


def parse_csv_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a SageMaker CSV body into a float32 C-contiguous array of shape (rows, n_features).

    ``body``: the raw request bytes (UTF-8/ASCII). ``n_features``: the model's feature count,
    >= 1. Raises ``InvalidInput("empty body")`` for an empty or all-whitespace body,
    ``UnsupportedMediaType`` (message names line and column, 1-based) for a non-numeric token,
    a header row, a blank line inside the body or ragged rows, and ``InvalidInput`` when every
    row has the same width but not ``n_features``. Thread-safe; holds no state; the C path
    releases the GIL while it parses a body over 64 KiB.
    """
    if _parse_rows_c is not None:
        rows = _parse_rows_c(body, n_features)  # allocates; releases GIL for large bodies
        if rows is not None:
            return rows
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    text = body.strip()
    if not text:
        raise InvalidInput("empty body")
    if text.translate(None, _NUMERIC_BYTES):
        return _parse_csv_exact(body, n_features)
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
        if b"\r" in text:
            return _parse_csv_exact(body, n_features)
    n_rows = text.count(b"\n") + 1
    if n_rows == 1:
        if text.count(b",") != n_features - 1:
            return _parse_csv_exact(body, n_features)
        flat = text
    else:
        if b"\n\n" in text or not _has_commas_per_line(text, n_features - 1):
            return _parse_csv_exact(body, n_features)
        flat = text.replace(b"\n", b",")  # allocates
    has_empty = b",," in flat or flat[0] == 44 or flat[-1] == 44  # 44 is ','
    is_json_int_minus_zero = b"-0," in flat or flat.endswith(b"-0")  # orjson: int 0, not -0.0
    if not flat.translate(None, _JSON_NUMBER_BYTES) and not is_json_int_minus_zero:
        # No nan/inf spelled out: the fields are likely JSON numbers, and orjson's parser is
        # several times faster than numpy's. JSON number syntax is a subset of float()'s,
        # with the same correctly rounded value; anything else (".5", "1e400") falls through.
        values = _parse_as_json(_fill_empty(flat, b"null") if has_empty else flat)
        if values is not None and values.size == n_rows * n_features:
            return _float64_to_float32(values).reshape(n_rows, n_features)
    if b"-n" in flat or b"-N" in flat:  # numpy's parser drops the sign bit of "-nan"
        return _parse_csv_exact(body, n_features)
    if has_empty:
        flat = _fill_empty(flat, b"nan")
    try:
        values = np.fromstring(flat, dtype=np.float64, sep=",")  # allocates
    except ValueError:
        return _parse_csv_exact(body, n_features)
    if values.size != n_rows * n_features:
        return _parse_csv_exact(body, n_features)
    return _float64_to_float32(values).reshape(n_rows, n_features)


def _fill_empty(flat: bytes, spelling: bytes) -> bytes:
    """Spell every empty comma-separated field of ``flat`` as ``spelling`` (a missing value)."""
    # Two passes because ",,," overlaps; the added commas at both ends turn a leading/trailing
    # empty field into an inner one and are removed again.
    filled = b"," + spelling + b","
    return (b"," + flat + b",").replace(b",,", filled).replace(b",,", filled)[1:-1]


def _parse_as_json(flat: bytes) -> np.ndarray | None:
    """Comma-separated JSON numbers/nulls as float64 (null -> NaN), or None if not JSON."""
    try:
        items = orjson.loads(b"[" + flat + b"]")  # allocates
    except orjson.JSONDecodeError:
        return None
    return np.array(items, dtype=np.float64)  # allocates


def _has_commas_per_line(text: bytes, commas: int) -> bool:
    """True when every ``\\n``-separated line of ``text`` holds exactly ``commas`` commas."""
    if text.count(b",") != commas * (text.count(b"\n") + 1):
        return False
    data = np.frombuffer(text, dtype=np.uint8)
    comma_pos = np.flatnonzero(data == 44)  # allocates
    newline_pos = np.flatnonzero(data == 10)
    before = np.searchsorted(comma_pos, newline_pos)  # commas before each newline
    per_line = np.diff(before, prepend=0, append=comma_pos.size)
    return bool((per_line == commas).all())


def _show(token: bytes) -> str:
    shown = token.decode("utf-8", "replace")
    if len(shown) > _MAX_TOKEN_SHOWN:
        shown = shown[:_MAX_TOKEN_SHOWN] + "..."
    return repr(shown)


def _to_float(token: bytes) -> float | None:
    """``float(token)``, or None when it is not a number. Python's digit-group underscores
    are not CSV numbers and are refused (numpy's fast path refuses them too)."""
    if b"_" in token:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def _parse_csv_exact(body: bytes, n_features: int) -> np.ndarray:
    """The reference parser: token by token, with the precise error for any invalid body."""
    stripped_head = len(body) - len(body.lstrip())
    first_line = body.count(b"\n", 0, stripped_head) + 1
    lines = body.strip().split(b"\n")
    width = 0
    rows: list[list[float]] = []
    for index, raw in enumerate(lines):
        lineno = first_line + index
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            raise UnsupportedMediaType(
                f"line {lineno}, column 1: blank line inside the body; "
                "rows must be on consecutive lines"
            )
        fields = line.split(b",")
        if index == 0:
            width = len(fields)
        elif len(fields) != width:
            raise UnsupportedMediaType(
                f"line {lineno}, column {min(len(fields), width) + 1}: ragged rows: "
                f"line {lineno} has {len(fields)} fields, line {first_line} has {width}"
            )
        row: list[float] = []
        for col, field in enumerate(fields, start=1):
            token = field.strip()
            if not token:
                row.append(float("nan"))
                continue
            value = _to_float(token)
            if value is None:
                message = f"line {lineno}, column {col}: {_show(token)} is not a number"
                if index == 0 and all(_to_float(f.strip()) is None for f in fields):
                    message += "; CSV bodies have no header row"
                raise UnsupportedMediaType(message)
            row.append(value)
        rows.append(row)
    if width != n_features:
        raise InvalidInput(f"expected {n_features} features, got {width}")
    return _float64_to_float32(np.array(rows, dtype=np.float64))


def _float32_tokens(scores: np.ndarray) -> list[bytes]:
    """Shortest round-tripping text of each float32 value of a flat C-contiguous array."""
    tokens = orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    bad = np.flatnonzero(~np.isfinite(scores))
    for i in bad.tolist():
        v = scores[i]
        tokens[i] = b"nan" if np.isnan(v) else (b"inf" if v > 0 else b"-inf")
    return tokens


def as_score_array(scores: np.ndarray) -> np.ndarray:
    """Scores as a float32 C-contiguous 1-D (n,) or 2-D (n, K) array; ValueError otherwise."""
    arr = np.ascontiguousarray(scores, dtype=np.float32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim not in (1, 2):
        raise ValueError(f"scores must be 1-D or 2-D, got shape {arr.shape}")
    return arr


def scores_to_csv(scores: np.ndarray) -> bytes:
    """Encode scores as CSV: one ``\\n``-terminated line per row.

    ``scores``: shape (n,) for one value per row or (n, K) for K comma-separated values per
    row (multiclass); cast to float32. Each value is the shortest text that parses back to the
    same float32 (``0.1``, ``1e-7``, ``nan``, ``inf``, ``-inf``). No rows -> ``b""``.
    """
    arr = np.ascontiguousarray(scores, dtype=np.float32)  # no copy for the predictors' output
    if arr.ndim != 1:
        arr = as_score_array(arr)
    if arr.size == 0:
        return b""
    dumped = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)  # allocates
    if _NULL_FIRST_BYTE not in dumped:  # all finite: orjson's text is ours
        if arr.ndim == 1:
            return dumped.translate(_JSON_LIST_TO_LINES, b"[")  # "[a,b]" -> "a\nb\n"
        return dumped[2:-2].replace(b"],[", b"\n") + b"\n"
    tokens = _float32_tokens(arr.reshape(-1))
    if arr.ndim == 1:
        return b"\n".join(tokens) + b"\n"
    k = arr.shape[1]
    lines = [b",".join(tokens[i : i + k]) for i in range(0, len(tokens), k)]
    return b"\n".join(lines) + b"\n"
