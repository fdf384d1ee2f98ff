"""What every client transport shares: the result type and the rows -> float32 matrix rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rtbserve.errors import InvalidInput

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


class Prediction(NamedTuple):
    """Scores and what the server said about them (``predict_with_info``)."""

    scores: np.ndarray
    """float32, shape (n,) or (n, K)."""
    is_fail_open: bool
    """True when the server answered with its configured default decision (``x-rtb-fail-open``)
    instead of scoring, e.g. because the deadline could not be met."""


def rows_to_matrix(rows: ArrayLike) -> np.ndarray:
    """Rows as a float32 C-contiguous (n, F) array; one flat row becomes (1, F).

    ``rows``: any array-like of numbers; ``None`` entries in lists become NaN. Raises
    ``InvalidInput`` for non-numbers, ragged rows, no rows, no features or more than two
    dimensions.
    """
    try:
        matrix = np.asarray(rows, dtype=np.float32)  # allocates unless already float32
    except (TypeError, ValueError) as exc:  # strings, ragged rows
        raise InvalidInput(f"rows must be numbers in an (n, F) shape: {exc}") from exc
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    elif matrix.ndim != 2:
        raise InvalidInput(f"expected one row or an (n, F) matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InvalidInput(f"expected at least one row of at least one feature, got {matrix.shape}")
    if not matrix.flags.c_contiguous:
        matrix = np.ascontiguousarray(matrix)  # allocates
    return matrix
