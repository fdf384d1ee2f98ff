"""Arrow IPC stream (``application/vnd.apache.arrow.stream``) and Parquet
(``application/x-parquet``) payloads -> float32 feature matrices, through pyarrow.

A table's columns are the features, in order (names are not matched); every column must be
numeric (int, uint, float or bool, or all-null); a null is a missing value (NaN). A column of
another type is ``UnsupportedMediaType`` naming it; a column count other than the model's
feature count is ``InvalidInput``. Bytes pyarrow cannot read are ``UnsupportedMediaType``; an
IPC stream is fully validated before its buffers are read, as Arrow advises for untrusted input.
pyarrow is imported on first use, so processes that never see these types never load it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtbserve.codecs.arrays import to_float32
from rtbserve.errors import InvalidInput, UnsupportedMediaType

_pa: Any = None


def _pyarrow() -> Any:
    global _pa
    if _pa is None:
        import pyarrow  # heavy: loaded on first use
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401

        _pa = pyarrow
    return _pa


def _is_numeric(pa: Any, dtype: Any) -> bool:
    t = pa.types
    return bool(
        t.is_integer(dtype) or t.is_floating(dtype) or t.is_boolean(dtype) or t.is_null(dtype)
    )


def table_to_rows(table: Any, n_features: int) -> np.ndarray:
    """A pyarrow ``Table`` as a float32 C-contiguous (rows, n_features) array (see the module
    docstring for the rules)."""
    pa = _pyarrow()
    for i, field in enumerate(table.schema):
        if not _is_numeric(pa, field.type):
            raise UnsupportedMediaType(
                f"column {i} ({field.name!r}) has type {field.type}; every column must be "
                "numeric (int, uint, float or bool)"
            )
    if table.num_columns != n_features:
        raise InvalidInput(f"expected {n_features} features, got {table.num_columns}")
    if table.num_rows == 0:
        raise InvalidInput("the table has no rows")
    try:  # one conversion for int/float columns (nulls -> NaN), to float64 if types are mixed
        tensor = table.to_tensor(null_to_nan=True, row_major=True)
    except (pa.ArrowException, AttributeError):  # bool or all-null columns; pyarrow < 16
        pass
    else:
        return to_float32(np.asarray(tensor))
    out = np.empty((table.num_rows, n_features), dtype=np.float32)  # allocates
    with np.errstate(over="ignore", invalid="ignore"):
        for i, column in enumerate(table.columns):
            if not pa.types.is_floating(column.type):  # ints through float64, as their text
                column = column.cast(pa.float64(), safe=False)
            out[:, i] = column.to_numpy()  # nulls -> NaN; float64 -> float32 rounds once
    return out


def parse_arrow_stream_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse an Arrow IPC stream body into a float32 (rows, n_features) array; every record
    batch is read. Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType`` or
    ``InvalidInput`` (module docstring). Thread-safe."""
    if not body:
        raise InvalidInput("empty body")
    pa = _pyarrow()
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UnsupportedMediaType(f"body is not a valid Arrow IPC stream: {exc}") from exc
    return table_to_rows(table, n_features)


def parse_parquet_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a Parquet file body into a float32 (rows, n_features) array. Raises
    ``InvalidInput("empty body")``, ``UnsupportedMediaType`` or ``InvalidInput`` (module
    docstring). Thread-safe."""
    if not body:
        raise InvalidInput("empty body")
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(pa.BufferReader(body))
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UnsupportedMediaType(f"body is not a valid Parquet file: {exc}") from exc
    return table_to_rows(table, n_features)
