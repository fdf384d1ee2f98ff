"""Protobuf wire helpers for the hot path: a packed ``repeated float`` field from a numpy array.

upb fills a ``repeated float`` from Python at ~60 ns a value even from a list (4x that from a numpy
array): a 64-row request of 67 features costs ~270 us before any bytes move. Serializing the
message without that field and appending the field's bytes costs one copy instead. Protobuf
parsers merge the fields of concatenated encodings, so ``msg.SerializeToString() +
packed_floats(n, values)`` is exactly ``msg`` with field ``n`` set to ``values`` (the field must
be unset in ``msg``).

Reading has the mirror problem: upb's repeated container has no buffer interface, so
``np.array(msg.rows)`` goes value by value (~2 us for one 67-feature row). A packed field is on the
wire exactly as a ``bytes`` field with the same number, so ``raw_view_class`` derives a twin message
type whose packed field is ``bytes``; parsing with it leaves the values as one ``bytes`` object
for ``np.frombuffer`` (no copy). The twin keeps only the last chunk of a field split in several,
and does not see unpacked values (kept as unknown fields): ``parse_with_raw_view`` detects both
(and any unknown field) and parses with the real type instead.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

_F32_LE = np.dtype("<f4")
_WIRE_TYPE_LEN = 2


def packed_floats(field_number: int, values: np.ndarray) -> bytes:
    """The encoding of ``repeated float`` field ``field_number`` holding ``values`` (any shape
    and numeric dtype, flattened row-major, converted to float32); empty for no values."""
    data = np.ascontiguousarray(values, dtype=_F32_LE).tobytes()  # allocates
    if not data:
        return b""
    return varint(field_number << 3 | _WIRE_TYPE_LEN) + varint(len(data)) + data


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FIELD = descriptor_pb2.FieldDescriptorProto
# np.frombuffer of little-endian wire bytes is the native float32 only on little-endian hosts
RAW_VIEW_WORKS = sys.byteorder == "little"


def raw_view_class(message_class: type[Message], field_name: str) -> type[Message]:
    """A twin of ``message_class`` in a private pool, with packed field ``field_name`` as bytes."""
    desc = message_class.DESCRIPTOR
    file_proto = descriptor_pb2.FileDescriptorProto(
        name=f"rtbserve_raw_view/{desc.full_name}.{field_name}.proto",
        package=f"rtbserve_raw_view.{desc.file.package}",
        syntax="proto3",
    )
    view = file_proto.message_type.add()
    desc.CopyToProto(view)
    for field in view.field:
        if field.type == _FIELD.TYPE_MESSAGE or field.type == _FIELD.TYPE_ENUM:
            raise ValueError(f"raw views support scalar fields only, {field.name} is not")
        if field.name == field_name:
            if field.label != _FIELD.LABEL_REPEATED:
                raise ValueError(f"{desc.full_name}.{field_name} is not a repeated field")
            field.type = _FIELD.TYPE_BYTES
            field.label = _FIELD.LABEL_OPTIONAL
            field.ClearField("options")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{file_proto.package}.{view.name}")
    )


def parse_with_raw_view(
    data: bytes,
    view_class: type[Message],
    message_class: type[Message],
    field_name: str,
    item_bytes: int,
) -> Any:
    """``data`` parsed with the raw view when that is exact (the field is then ``bytes`` of
    whole ``item_bytes``-byte values), else with ``message_class``. Raises ``DecodeError`` for
    bytes that are no such message."""
    view = view_class.FromString(data)
    packed = getattr(view, field_name)
    # exact when the field came in one packed chunk of whole values: then re-encoding the view
    # gives back every byte (a chunk it dropped would be missing) and nothing is unknown
    # (unpacked values are); a ragged chunk is corrupt, which the real type reports
    if (
        packed
        and not len(packed) % item_bytes
        and view.ByteSize() == len(data)
        and not len(UnknownFieldSet(view))
    ):
        return view
    return message_class.FromString(data)
