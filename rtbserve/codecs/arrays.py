"""Numeric arrays -> the float32 (rows, n_features) C-contiguous matrix the predictors take.

One place for the rules the binary formats share (npy, Arrow IPC, Parquet, RecordIO-protobuf,
LIBSVM): which dtypes are numbers (float, signed and unsigned int, bool), how a value becomes
float32 (through float64, as a CSV token does: ``np.float32(float(x))``; a value beyond float32's
range becomes +-inf, silently, as there), that a 1-D array is one row, and the errors:
``UnsupportedMediaType`` for what is not a numeric matrix, ``InvalidInput`` for the wrong feature
count ("expected N features, got M") or no rows.
"""

from __future__ import annotations

import numpy as np

from rtbserve.errors import InvalidInput, UnsupportedMediaType

_F32 = np.dtype(np.float32)
NUMERIC_KINDS = "fiub"  # float, signed int, unsigned int, bool


def check_numeric_dtype(dtype: np.dtype, what: str) -> None:
    """Raise ``UnsupportedMediaType`` unless ``dtype`` holds plain numbers; ``what`` names the
    payload in the message (e.g. ``"the .npy array"``)."""
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in NUMERIC_KINDS:
        raise UnsupportedMediaType(
            f"{what} has dtype {dtype}; expected numbers (float, int, uint or bool)"
        )


def to_float32(values: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy of numeric ``values`` (any shape), owned and writeable.

    float32 and narrower types convert exactly; float64 rounds once; 64-bit integers go through
    float64 first, as their decimal text would.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if values.dtype.kind == "f" and values.dtype.itemsize <= 4:
            return np.array(values, dtype=_F32, order="C")  # allocates
        if values.dtype.kind in "iu" and values.dtype.itemsize == 8:
            values = values.astype(np.float64)  # allocates
        return np.ascontiguousarray(values.astype(_F32))  # allocates


def rows_to_float32(values: np.ndarray, n_features: int, what: str) -> np.ndarray:
    """``values`` (numeric, 1-D for one row or 2-D (rows, features)) as the predictors' matrix.

    Raises ``UnsupportedMediaType`` for a non-numeric dtype or another number of dimensions,
    ``InvalidInput`` for a feature count other than ``n_features`` or zero rows.
    """
    check_numeric_dtype(values.dtype, what)
    if values.ndim == 1:
        values = values.reshape(1, -1)
    elif values.ndim != 2:
        raise UnsupportedMediaType(
            f"{what} has shape {values.shape}; expected one row ({n_features},) or a matrix "
            f"(rows, {n_features})"
        )
    if values.shape[1] != n_features:
        raise InvalidInput(f"expected {n_features} features, got {values.shape[1]}")
    if values.shape[0] == 0:
        raise InvalidInput(f"{what} has no rows")
    return to_float32(values)
