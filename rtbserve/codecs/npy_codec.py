"""NumPy ``.npy`` payloads (``application/x-npy``) <-> float32 feature matrices and scores.

A request is one array as ``np.save`` writes it: 1-D is one row, 2-D is (rows, features), any
numeric dtype (see ``rtbserve.codecs.arrays``), C or Fortran order. The header is parsed with
NumPy's own reader (never pickle) and checked against the body's length before any array
exists, so a header that claims more data than was sent allocates nothing; the data is then
viewed in place and copied once into the float32 matrix. A response is the scores as float32,
shape (n,) or (n, K), in a version 1.0 ``.npy``.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np

from rtbserve.codecs.arrays import check_numeric_dtype, rows_to_float32
from rtbserve.errors import InvalidInput, UnsupportedMediaType

_WHAT = "the .npy array"
_MAGIC = b"\x93NUMPY"
_F32 = np.dtype(np.float32)
# The header np.save writes for a plain little/big-endian or bool array; anything else (other
# spellings, structured dtypes, versions 2/3) goes through NumPy's own (slower) header reader.
_SIMPLE_HEADER = re.compile(
    rb"\{'descr': '([<>|][fiub][1248])', 'fortran_order': (True|False), "
    rb"'shape': \(((?:\d+, )*\d*|\d+,)\), \} *\n"
)
_DTYPES: dict[bytes, np.dtype] = {}


def parse_npy_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse an ``.npy`` body into a float32 C-contiguous array of shape (rows, n_features).

    Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType`` (not an ``.npy``; a header
    that does not match the data length; a non-numeric dtype; not 1-D/2-D) or ``InvalidInput``
    (wrong feature count; no rows). Thread-safe.
    """
    if not body:
        raise InvalidInput("empty body")
    if not body.startswith(_MAGIC):
        raise UnsupportedMediaType(
            "body is not a .npy file: it must start with the bytes \\x93NUMPY (np.save's format)"
        )
    simple = _parse_simple_header(body)
    if simple is not None:
        shape, fortran_order, dtype, offset = simple
    else:
        shape, fortran_order, dtype, offset = _parse_header(body)
    check_numeric_dtype(dtype, _WHAT)
    if any(d < 0 for d in shape):
        raise UnsupportedMediaType(f"the .npy header declares a negative shape {shape}")
    count = math.prod(shape)
    if len(body) - offset != count * dtype.itemsize:
        raise UnsupportedMediaType(
            f"the .npy header declares shape {shape} of {dtype} ({count * dtype.itemsize} "
            f"bytes of data), but {len(body) - offset} bytes follow it"
        )
    values = np.frombuffer(body, dtype=dtype, count=count, offset=offset)  # a view, no copy
    values = values.reshape(shape, order="F" if fortran_order else "C")
    return rows_to_float32(values, n_features, _WHAT)


def _parse_simple_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, data offset) of a version 1.0 header as np.save writes
    it, or None."""
    if body[6:8] != b"\x01\x00" or len(body) < 10:
        return None
    end = 10 + int.from_bytes(body[8:10], "little")
    match = _SIMPLE_HEADER.fullmatch(body, 10, end)
    if match is None:
        return None
    descr, fortran, dims = match.groups()
    dtype = _DTYPES.get(descr)
    if dtype is None:
        dtype = _DTYPES[descr] = np.dtype(descr.decode())
    shape = tuple(int(d) for d in dims.split(b",") if d.strip())
    return shape, fortran == b"True", dtype, end


def _parse_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    # NumPy's header reader runs the tokenizer and ast.literal_eval over untrusted text: its
    # failures are ValueError, SyntaxError, tokenize.TokenError, RecursionError, MemoryError...
    except Exception as exc:
        raise UnsupportedMediaType(f"body is not a valid .npy file: {exc}") from exc
    return shape, fortran_order, dtype, fp.tell()


def scores_to_npy(scores: np.ndarray) -> bytes:
    """Encode scores as a float32 ``.npy`` (version 1.0), shape (n,) or (n, K) as given."""
    arr = np.ascontiguousarray(scores, dtype=_F32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    shape = f"({arr.shape[0]},)" if arr.ndim == 1 else str(arr.shape)
    header = f"{{'descr': '{_F32.str}', 'fortran_order': False, 'shape': {shape}, }}"
    # the format pads magic + length + header + "\n" to a multiple of 64 bytes with spaces
    padded = header + " " * (-(10 + len(header) + 1) % 64) + "\n"
    return (
        _MAGIC + b"\x01\x00" + len(padded).to_bytes(2, "little") + padded.encode() + arr.tobytes()
    )
