"""LIBSVM payloads (``text/libsvm``, ``text/x-libsvm``) -> float32 feature matrices.

One row per line: an optional label, then ``index:value`` pairs separated by spaces or tabs
(``1 0:0.5 3:1.25``). As in the SageMaker XGBoost container, indices are 0-based column numbers
taken as written, every token holding a ``:`` is a feature (so a line may omit the label), the
label is ignored, and a column the line does not name is missing (NaN); an explicit ``0`` is
the value 0. ``qid:N`` tokens (ranking data) are skipped. An index at or beyond the model's
feature count is ``InvalidInput`` (400); anything malformed (a blank line inside the body, a
label that is not a number, a token that is not ``index:value``, a non-integer or negative
index, a value that is not a number, an index twice on one line) is ``UnsupportedMediaType``
(415) naming the line and token (1-based).

Two paths. The fast one drops each line's label with one split per line, checks the token
structure on the whole body at once (one ``:`` per token via a byte skeleton, digit-only indices
via one segmented NumPy sum) and parses every index and value with one call of the CSV parser
(as a single row ``i,v,i,v,...``). Any error goes to the exact per-token parser, which returns
the same matrix or the precise error. Values become ``np.float32(float(token))`` either way.
"""

from __future__ import annotations

import numpy as np

from rtbserve.codecs.csv_codec import parse_csv_rows
from rtbserve.errors import InvalidInput, RtbError, UnsupportedMediaType

_KEEP_SPACE_COLON = bytes(b for b in range(256) if b not in (32, 58))  # delete all but " :"
_DIGITS = b"0123456789"
_NOT_SPACE_COLON_TO_X = bytes(b if b in (32, 58) else 120 for b in range(256))
_OTHER_WHITESPACE = b"\t\r\x0b\x0c"  # what bytes.split() also splits on, besides " " and \n
_SPACE_RUNS = bytes(b for b in range(256) if b not in _OTHER_WHITESPACE)  # delete all but those
_WHITESPACE_TO_SPACE = bytes.maketrans(_OTHER_WHITESPACE, b" " * len(_OTHER_WHITESPACE))
_MAX_TOKEN_SHOWN = 40


def _show(token: bytes) -> str:
    shown = token.decode("utf-8", "replace")
    if len(shown) > _MAX_TOKEN_SHOWN:
        shown = shown[:_MAX_TOKEN_SHOWN] + "..."
    return repr(shown)


def _is_label(token: bytes) -> bool:
    if b"_" in token:  # Python's digit-group underscores are not LIBSVM numbers
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_libsvm_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a LIBSVM body into a float32 C-contiguous array of shape (lines, n_features).

    Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType`` (malformed; see the module
    docstring) or ``InvalidInput`` (an index >= ``n_features``). Thread-safe.
    """
    text = body.strip()
    if not text:
        raise InvalidInput("empty body")
    lines = text.split(b"\n")
    if text.translate(None, _SPACE_RUNS):  # tabs, \r, ...: one space between tokens
        text = text.translate(_WHITESPACE_TO_SPACE)
    while b"  " in text:
        text = text.replace(b"  ", b" ")  # allocates
    feature_lines = text.split(b"\n")
    has_qid = b"qid:" in text
    counts = np.empty(len(feature_lines), dtype=np.intp)
    for i, line in enumerate(feature_lines):  # drop each line's label: one split per line
        line = line.strip(b" ")
        if not line:
            return _parse_exact(lines, n_features)
        head, _, rest = line.partition(b" ")
        if b":" in head:
            rest = line
        elif not _is_label(head):
            return _parse_exact(lines, n_features)
        if has_qid:
            rest = b" ".join(t for t in rest.split(b" ") if not t.startswith(b"qid:"))
        counts[i] = rest.count(b":")
        feature_lines[i] = rest
    n_tokens = int(counts.sum())
    if n_tokens == 0:  # labels only: every value missing
        return np.full((len(lines), n_features), np.nan, dtype=np.float32)
    joined = b" ".join(line for line in feature_lines if line)  # allocates
    if not _is_index_value_list(joined, n_tokens):
        return _parse_exact(lines, n_features)
    try:  # "i:v i:v" -> one CSV row "i,v,i,v": float() grammar, straight into float32
        pairs = parse_csv_rows(joined.replace(b":", b",").replace(b" ", b","), 2 * n_tokens)
    except RtbError:
        return _parse_exact(lines, n_features)  # the exact parser names the line and token
    pairs = pairs.reshape(n_tokens, 2)
    cols = pairs[:, 0]  # digits only (checked), exact in float32 below 2**24
    if cols.max() >= n_features:
        return _parse_exact(lines, n_features)
    cols = cols.astype(np.intp)
    rows = np.repeat(np.arange(len(lines), dtype=np.intp), counts)
    if _has_repeats(rows, cols, n_features):
        return _parse_exact(lines, n_features)
    out = np.full((len(lines), n_features), np.nan, dtype=np.float32)  # allocates
    out[rows, cols] = pairs[:, 1]
    return out


def _is_index_value_list(joined: bytes, n_tokens: int) -> bool:
    """True when ``joined`` is ``n_tokens`` space-separated tokens, each a non-empty run of
    ASCII digits, one ``:``, and a non-empty value without spaces or colons. Byte-level only."""
    if (
        joined.translate(None, _KEEP_SPACE_COLON) != b": " * (n_tokens - 1) + b":"
        or joined[0] == 58
        or joined[-1] == 58
        or b" :" in joined
        or b": " in joined
    ):
        return False  # not exactly one ":" per token, or an empty index or value
    # With digits deleted and every other byte but " " and ":" spelled "x", an index holding
    # anything but digits shows as "x:" (a value, which has no ":", never does).
    return b"x:" not in joined.translate(_NOT_SPACE_COLON_TO_X, _DIGITS)


def _has_repeats(rows: np.ndarray, cols: np.ndarray, n_features: int) -> bool:
    """True when some line names an index twice."""
    if cols.size < 2:
        return False
    same_row = rows[1:] == rows[:-1]
    if not (cols[1:][same_row] <= cols[:-1][same_row]).any():
        return False  # ascending within every line, as LIBSVM writers produce
    keys = rows.astype(np.int64) * n_features + cols
    return np.unique(keys).size != keys.size


def _parse_exact(lines: list[bytes], n_features: int) -> np.ndarray:
    """The reference parser: token by token, with the precise error for any invalid body."""
    out = np.full((len(lines), n_features), np.nan, dtype=np.float64)
    for i, line in enumerate(lines):
        lineno = i + 1
        parts = line.split()
        if not parts:
            raise UnsupportedMediaType(
                f"line {lineno}: blank line inside the body; rows must be on consecutive lines"
            )
        first = 1
        if b":" not in parts[0]:
            if not _is_label(parts[0]):
                raise UnsupportedMediaType(
                    f"line {lineno}, token 1: label {_show(parts[0])} is not a number"
                )
            first = 2
        seen: set[int] = set()
        for pos, token in enumerate(parts[first - 1 :], start=first):
            if token.startswith(b"qid:"):
                continue
            index_text, colon, value_text = token.partition(b":")
            where = f"line {lineno}, token {pos}"
            if not colon or not index_text.isdigit() or b":" in value_text:
                raise UnsupportedMediaType(
                    f"{where}: {_show(token)} is not index:value (a 0-based column number, "
                    "a colon and a number)"
                )
            if not value_text or b"_" in value_text:
                raise UnsupportedMediaType(f"{where}: {_show(token)} has no numeric value")
            try:
                value = float(value_text)
            except ValueError:
                raise UnsupportedMediaType(
                    f"{where}: value {_show(value_text)} is not a number"
                ) from None
            index = int(index_text)
            if index >= n_features:
                raise InvalidInput(
                    f"expected {n_features} features (indices 0-{n_features - 1}), got index "
                    f"{index} ({where})"
                )
            if index in seen:
                raise UnsupportedMediaType(f"{where}: index {index} appears twice on the line")
            seen.add(index)
            out[i, index] = value
    with np.errstate(over="ignore"):
        return out.astype(np.float32)
