"""RecordIO-protobuf payloads (``application/x-recordio-protobuf``), SageMaker's binary format.

Framing (MXNet RecordIO, as ``sagemaker.amazon.common`` writes it): per record a little-endian
uint32 magic ``0xced7230a``, a uint32 whose low 29 bits are the payload length and top 3 bits a
continuation flag (0 whole record; 1 first, 2 middle, 3 last part of a record split where its
data held the magic, which the reader puts back between the parts), the payload, then zero
padding to a multiple of 4 bytes.

Payload: one ``aialgs.data.Record`` protobuf (the message below, as in the SDK's
``record.proto``; its descriptor is built here in code, parsed by the ``protobuf`` runtime).
A request record's ``features["values"]`` tensor is one row: dense (``values`` only, float32,
float64 or int32, as ``write_numpy_to_dense_tensor`` writes them) or sparse (``values`` at
column ``keys``, ``shape`` = [n_columns], as ``write_spmatrix_to_sparse_tensor`` writes them;
absent columns are missing, NaN). A dense tensor whose ``shape`` is [rows, columns] holds that
many rows. Labels and other fields are ignored.

A response holds one record per row with ``label["score"]`` a float32 tensor (one value, or K
for multiclass), as SageMaker's built-in algorithms answer; with selectable outputs, one
float32 tensor per selected key. Every row's record has the same layout, so responses are
written by filling a byte template with NumPy rather than serialising messages one by one.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from rtbserve.codecs.arrays import to_float32
from rtbserve.errors import InvalidInput, UnsupportedMediaType

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_F32 = np.dtype("<f4")


def _build_record_class() -> Any:
    """``aialgs.data.Record`` from a descriptor built in code, in a private pool (so it never
    clashes with the SDK's generated ``record_pb2`` in the same process)."""
    fd = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name="rtbserve/aialgs_record.proto", package="aialgs.data", syntax="proto2"
    )
    packed = descriptor_pb2.FieldOptions(packed=True)
    for name, value_type in (
        ("Float32Tensor", fd.TYPE_FLOAT),
        ("Float64Tensor", fd.TYPE_DOUBLE),
        ("Int32Tensor", fd.TYPE_INT32),
    ):
        m = f.message_type.add(name=name)
        m.field.add(name="values", number=1, label=fd.LABEL_REPEATED, type=value_type)
        m.field.add(name="keys", number=2, label=fd.LABEL_REPEATED, type=fd.TYPE_UINT64)
        m.field.add(name="shape", number=3, label=fd.LABEL_REPEATED, type=fd.TYPE_UINT64)
        for field in m.field:
            field.options.CopyFrom(packed)
    m = f.message_type.add(name="Bytes")
    m.field.add(name="value", number=1, label=fd.LABEL_REPEATED, type=fd.TYPE_BYTES)
    m.field.add(name="content_type", number=2, label=fd.LABEL_OPTIONAL, type=fd.TYPE_STRING)
    m = f.message_type.add(name="Value")
    m.oneof_decl.add(name="value")
    for name, number, type_name in (
        ("float32_tensor", 2, ".aialgs.data.Float32Tensor"),
        ("float64_tensor", 3, ".aialgs.data.Float64Tensor"),
        ("int32_tensor", 7, ".aialgs.data.Int32Tensor"),
        ("bytes", 9, ".aialgs.data.Bytes"),
    ):
        m.field.add(
            name=name,
            number=number,
            label=fd.LABEL_OPTIONAL,
            type=fd.TYPE_MESSAGE,
            type_name=type_name,
            oneof_index=0,
        )
    m = f.message_type.add(name="Record")
    for name, number in (("features", 1), ("label", 2)):
        entry_name = f"{name.capitalize()}Entry"
        entry = m.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, label=fd.LABEL_OPTIONAL, type=fd.TYPE_STRING)
        entry.field.add(
            name="value",
            number=2,
            label=fd.LABEL_OPTIONAL,
            type=fd.TYPE_MESSAGE,
            type_name=".aialgs.data.Value",
        )
        m.field.add(
            name=name,
            number=number,
            label=fd.LABEL_REPEATED,
            type=fd.TYPE_MESSAGE,
            type_name=f".aialgs.data.Record.{entry_name}",
        )
    for name, number in (("uid", 3), ("metadata", 4), ("configuration", 5)):
        m.field.add(name=name, number=number, label=fd.LABEL_OPTIONAL, type=fd.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("aialgs.data.Record"))


Record = _build_record_class()


# --------------------------------------------------------------------------- framing


def split_records(body: bytes) -> list[bytes]:
    """The payloads of a RecordIO body, in order; ``UnsupportedMediaType`` for bad framing."""
    records: list[bytes] = []
    parts: list[bytes] = []  # a multi-part record being joined
    pos = 0
    size = len(body)
    while pos < size:
        if size - pos < 8:
            raise UnsupportedMediaType(
                f"RecordIO: {size - pos} stray bytes at offset {pos}; a record header is 8 bytes"
            )
        magic, header = struct.unpack_from("<II", body, pos)
        if magic != MAGIC:
            raise UnsupportedMediaType(
                f"RecordIO: no record magic 0xced7230a at offset {pos} (found {magic:#010x}); "
                "is the body application/x-recordio-protobuf?"
            )
        length = header & _LENGTH_MASK
        flag = header >> 29
        start = pos + 8
        end = start + length
        if end > size:
            raise UnsupportedMediaType(
                f"RecordIO: the record at offset {pos} declares {length} bytes, "
                f"{size - start} remain"
            )
        payload = body[start:end]
        pos = end + (-length % 4)  # padding to 4 bytes
        if flag == 0 and not parts:
            records.append(payload)
        elif flag == 1 and not parts:
            parts.append(payload)
        elif flag in (2, 3) and parts:
            parts.append(payload)
            if flag == 3:
                records.append(_MAGIC_BYTES.join(parts))
                parts = []
        else:
            raise UnsupportedMediaType(
                f"RecordIO: continuation flag {flag} out of sequence at offset {pos}"
            )
    if parts:
        raise UnsupportedMediaType("RecordIO: the body ends inside a multi-part record")
    return records


def _frame(payloads: list[bytes]) -> bytes:
    out = []
    for p in payloads:
        out.append(struct.pack("<II", MAGIC, len(p)))
        out.append(p)
        out.append(b"\0" * (-len(p) % 4))
    return b"".join(out)


# --------------------------------------------------------------------------- requests


def _record_rows(record: Any, index: int, n_features: int) -> np.ndarray:
    """The rows one parsed record holds, as float32 (r, n_features)."""
    where = f"record {index}"
    if "values" not in record.features:
        # proto2 strings are not UTF-8-checked: the runtime hands back bytes for invalid ones
        names = (k if isinstance(k, str) else k.decode("utf-8", "replace") for k in record.features)
        keys = ", ".join(sorted(names)) or "none"
        raise UnsupportedMediaType(f'{where} has no features["values"] tensor (features: {keys})')
    value = record.features["values"]
    kind = value.WhichOneof("value")
    if kind is None or kind == "bytes":
        raise UnsupportedMediaType(
            f'{where}: features["values"] must be a float32, float64 or int32 tensor, got '
            f"{kind or 'nothing'}"
        )
    tensor = getattr(value, kind)
    dtype = {"float32_tensor": np.float32, "float64_tensor": np.float64}.get(kind, np.int32)
    values = np.array(tensor.values, dtype=dtype)  # allocates
    shape = list(tensor.shape)
    if len(tensor.keys) or (values.size == 0 and len(shape) == 1):  # sparse (maybe all missing)
        keys = np.array(tensor.keys, dtype=np.uint64)
        if keys.size != values.size:
            raise UnsupportedMediaType(
                f"{where}: sparse tensor with {keys.size} keys and {values.size} values"
            )
        if len(shape) > 1:
            raise UnsupportedMediaType(
                f"{where}: sparse tensor of shape {shape}; expected [n_columns] (one row)"
            )
        if shape and shape[0] != n_features:
            raise InvalidInput(f"expected {n_features} features, got {shape[0]} ({where})")
        if keys.size and int(keys.max()) >= n_features:
            raise InvalidInput(
                f"expected {n_features} features (columns 0-{n_features - 1}), got column "
                f"{int(keys.max())} ({where})"
            )
        if np.unique(keys).size != keys.size:
            raise UnsupportedMediaType(f"{where}: a column appears twice in the sparse tensor")
        row = np.full((1, n_features), np.nan, dtype=np.float32)
        row[0, keys.astype(np.intp)] = to_float32(values)
        return row
    if not shape:
        shape = [values.size]
    if len(shape) > 2 or int(np.prod(shape, dtype=np.float64)) != values.size:
        raise UnsupportedMediaType(
            f"{where}: dense tensor of shape {shape} with {values.size} values; expected "
            f"[{n_features}] or [rows, {n_features}]"
        )
    if shape[-1] != n_features:
        raise InvalidInput(f"expected {n_features} features, got {shape[-1]} ({where})")
    return to_float32(values).reshape(-1, n_features)


_DENSE_PREFIXES: dict[int, bytes] = {}


def _dense_rows(body: bytes, n_features: int) -> np.ndarray | None:
    """The rows of a body made only of framed dense float32 records of ``n_features`` values
    and nothing else (write_numpy_to_dense_tensor without labels), read as one 2-D view; None
    for any other body."""
    prefix = _dense_prefix(n_features)
    payload_len = len(prefix) + 4 * n_features
    head = struct.pack("<II", MAGIC, payload_len) + prefix
    width = 8 + payload_len + (-payload_len % 4)
    if len(body) % width or not body.startswith(head):
        return None
    records = np.frombuffer(body, dtype=np.uint8).reshape(-1, width)
    if not (records[:, : len(head)] == np.frombuffer(head, dtype=np.uint8)).all():
        return None
    values = records[:, len(head) : len(head) + 4 * n_features]
    return np.ascontiguousarray(values).view(_F32)  # allocates (one copy)


def _dense_prefix(n_features: int) -> bytes:
    prefix = _DENSE_PREFIXES.get(n_features)
    if prefix is None:
        prefix = _entry_prefix(b"\x0a", "values", n_features)
        if len(_DENSE_PREFIXES) < 64:
            _DENSE_PREFIXES[n_features] = prefix
    return prefix


def parse_recordio_rows(body: bytes, n_features: int) -> np.ndarray:
    """Parse a RecordIO-protobuf body into a float32 C-contiguous (rows, n_features) array.

    Raises ``InvalidInput("empty body")``, ``UnsupportedMediaType`` (bad framing, a payload
    that is not a Record, no numeric ``features["values"]`` tensor, an inconsistent tensor) or
    ``InvalidInput`` (wrong feature count, a sparse column out of range), naming the record
    (0-based). Thread-safe.
    """
    if not body:
        raise InvalidInput("empty body")
    rows = _dense_rows(body, n_features)
    if rows is not None:
        return rows
    payloads = split_records(body)
    if not payloads:
        raise InvalidInput("no records in the RecordIO body")
    rows = []
    # A dense float32 row as write_numpy_to_dense_tensor writes it starts with these bytes and
    # its values follow: read them in place, and parse only what comes after (labels).
    prefix = _dense_prefix(n_features)
    data_end = len(prefix) + 4 * n_features
    for i, payload in enumerate(payloads):
        if payload.startswith(prefix) and len(payload) >= data_end:
            rest = payload[data_end:]
            try:
                has_values = bool(rest) and "values" in Record.FromString(rest).features
            except (DecodeError, UnicodeDecodeError, ValueError):
                has_values = True  # let the full parse below say what is wrong
            if not has_values:
                values = np.frombuffer(payload, dtype=_F32, count=n_features, offset=len(prefix))
                rows.append(to_float32(values).reshape(1, n_features))
                continue
        try:
            rows.append(_record_rows(Record.FromString(payload), i, n_features))
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:  # the protobuf runtime's
            raise UnsupportedMediaType(
                f"record {i} is not an aialgs.data.Record protobuf: {exc}"
            ) from exc
    out = rows[0] if len(rows) == 1 else np.concatenate(rows)
    if out.shape[0] == 0:
        raise InvalidInput("no rows in the RecordIO body")
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- responses


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _entry_prefix(record_tag: bytes, key: str, n_values: int) -> bytes:
    """The bytes of ``features[key]`` (``record_tag`` 0x0a) or ``label[key]`` (0x12) =
    ``Float32Tensor(values=<n_values floats>)``, up to the floats.

    Every level is a length-delimited field (wire type 2): Record.features / Record.label
    (fields 1 / 2) hold a map entry of key (field 1) and Value (field 2); Value.float32_tensor is
    field 2; the tensor's packed ``values`` are field 1.
    """
    key_bytes = key.encode()
    data_len = 4 * n_values
    tensor_head = b"\x0a" + _varint(data_len)
    tensor_len = len(tensor_head) + data_len
    value_head = b"\x12" + _varint(tensor_len)
    value_len = len(value_head) + tensor_len
    entry_head = b"\x0a" + _varint(len(key_bytes)) + key_bytes + b"\x12" + _varint(value_len)
    entry_len = len(entry_head) + value_len
    return record_tag + _varint(entry_len) + entry_head + value_head + tensor_head


def _response_layout(keys_widths: tuple[tuple[str, int], ...]) -> tuple[np.dtype, list[bytes]]:
    """The structured dtype of one framed response record (header, then per key the entry's
    prefix bytes and its float32 values, then padding) and the constant bytes of each prefix."""
    prefixes = [_entry_prefix(b"\x12", key, width) for key, width in keys_widths]
    payload_len = sum(
        len(p) + 4 * width for p, (_, width) in zip(prefixes, keys_widths, strict=True)
    )
    heads = [struct.pack("<II", MAGIC, payload_len) + prefixes[0], *prefixes[1:]]
    fields: list[tuple[str, Any]] = []
    for i, (head, (_, width)) in enumerate(zip(heads, keys_widths, strict=True)):
        fields.append((f"h{i}", f"V{len(head)}"))
        fields.append((f"v{i}", _F32, (width,)))
    padding = -payload_len % 4
    if padding:
        fields.append(("pad", f"V{padding}"))
    return np.dtype(fields), heads


_LAYOUTS: dict[tuple[tuple[str, int], ...], tuple[np.dtype, list[bytes]]] = {}


def columns_to_recordio(columns: list[tuple[str, np.ndarray]]) -> bytes:
    """One record per row, ``label[key]`` a float32 tensor of that row's values for each
    ``(key, values)`` in order; ``values`` is (n,) or (n, k), cast to float32. ``b""`` for no
    rows. Every record has the same layout: one structured array is filled, no per-row work."""
    arrays = []
    for _, values in columns:
        arr = np.asarray(values, dtype=_F32)
        arrays.append(arr.reshape(arr.shape[0], 1) if arr.ndim == 1 else arr)
    n = arrays[0].shape[0] if arrays else 0
    if n == 0:
        return b""
    keys_widths = tuple((key, arr.shape[1]) for (key, _), arr in zip(columns, arrays, strict=True))
    layout = _LAYOUTS.get(keys_widths)
    if layout is None:
        layout = _response_layout(keys_widths)
        if len(_LAYOUTS) < 64:
            _LAYOUTS[keys_widths] = layout
    dtype, heads = layout
    if n == 1:  # one bid request: concatenation beats filling a structured array
        parts = [
            part
            for pair in zip(heads, arrays, strict=True)
            for part in (pair[0], pair[1].tobytes())
        ]
        return b"".join(parts) + bytes(dtype.itemsize - sum(map(len, parts)))
    out = np.zeros(n, dtype=dtype)  # allocates; the padding stays zero
    for i, (head, arr) in enumerate(zip(heads, arrays, strict=True)):
        out[f"h{i}"] = np.void(head)
        out[f"v{i}"] = arr
    return out.tobytes()


def scores_to_recordio(scores: np.ndarray) -> bytes:
    """Encode scores as RecordIO-protobuf: per row a record with ``label["score"]``, a float32
    tensor of the row's value (K values for (n, K) multiclass scores)."""
    arr = np.asarray(scores, dtype=_F32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape == (1,):  # one bid request: two constants around four bytes
        return _ONE_SCORE_HEAD + arr.tobytes() + _ONE_SCORE_PAD
    return columns_to_recordio([("score", arr)])


_ONE_SCORE_DTYPE, (_ONE_SCORE_HEAD,) = _response_layout((("score", 1),))
_ONE_SCORE_PAD = bytes(_ONE_SCORE_DTYPE.itemsize - len(_ONE_SCORE_HEAD) - 4)


def records_to_frames(records: list[Any]) -> bytes:
    """Serialise parsed/built ``Record`` messages into a RecordIO body (tests, tools)."""
    return _frame([r.SerializeToString() for r in records])
