"""The SageMaker codecs: JSON Lines, LIBSVM, RecordIO-protobuf, npy, Arrow/Parquet, selectable
outputs and the environment defaults. Pure functions, no sockets.

Binary formats are checked against payloads the SageMaker SDK wrote (``tests/data/sagemaker``,
see ``make_golden.py``) and against hand-built edge cases; the fast paths of the text formats
against their exact parsers with Hypothesis; selected labels against ``Model.predict``.
"""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtbserve.codecs import DECODERS, ENCODERS, decode_rows, encode_scores
from rtbserve.codecs.arrays import rows_to_float32
from rtbserve.codecs.arrow_codec import parse_arrow_stream_rows, parse_parquet_rows
from rtbserve.codecs.jsonlines_codec import _parse_lines, parse_jsonlines_rows, scores_to_jsonlines
from rtbserve.codecs.libsvm_codec import _parse_exact, parse_libsvm_rows
from rtbserve.codecs.npy_codec import parse_npy_rows, scores_to_npy
from rtbserve.codecs.recordio_codec import (
    MAGIC,
    Record,
    columns_to_recordio,
    parse_recordio_rows,
    records_to_frames,
    scores_to_recordio,
    split_records,
)
from rtbserve.codecs.sagemaker_env import InvocationsOptions, invocations_options_from_env
from rtbserve.codecs.selection import OutputSelection, model_kind, parse_inference_output
from rtbserve.errors import ConfigError, InvalidInput, UnsupportedMediaType

GOLDEN = Path(__file__).parent / "data" / "sagemaker"
NAN = float("nan")
INF = float("inf")


def assert_same_f32(actual: np.ndarray, expected) -> None:
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.dtype == np.float32 and actual.flags.c_contiguous and actual.flags.writeable
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)  # NaN == NaN here


def golden_rows() -> np.ndarray:
    doc = json.loads((GOLDEN / "expected.json").read_text())
    return np.array([[NAN if v is None else v for v in r] for r in doc["rows"]], np.float32)


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("content_type", "file"),
    [
        ("text/csv", "request.csv"),
        ("Text/CSV; charset=UTF-8; label_size=1", "request.csv"),
        ("text/libsvm", "request.libsvm"),
        ("text/x-libsvm; charset=utf-8", "request.libsvm"),
        ("application/json", "request.json"),
        ("application/jsonlines", "request.jsonl"),
        ("application/x-recordio-protobuf", "request.recordio"),
        ("application/x-recordio-protobuf", "request_f64.recordio"),
        ("application/x-recordio-protobuf", "request_sparse.recordio"),
        ("application/x-npy", "request.npy"),
        ("application/vnd.apache.arrow.stream", "request.arrow"),
        ("APPLICATION/X-PARQUET", "request.parquet"),
    ],
)
def test_every_golden_request_decodes_to_the_same_rows(content_type, file):
    assert_same_f32(decode_rows((GOLDEN / file).read_bytes(), content_type, 67), golden_rows())


def test_tables_cover_the_contract():
    assert set(DECODERS) == {
        "text/csv",
        "application/json",
        "application/jsonlines",
        "text/libsvm",
        "text/x-libsvm",
        "application/x-recordio-protobuf",
        "application/x-npy",
        "application/vnd.apache.arrow.stream",
        "application/x-parquet",
    }
    assert list(ENCODERS) == [
        "text/csv",
        "application/json",
        "application/jsonlines",
        "application/x-recordio-protobuf",
        "application/x-npy",
    ]


def test_csv_label_size_must_be_1():
    assert_same_f32(decode_rows(b"1,2", "text/csv; label_size=1", 2), [[1, 2]])
    with pytest.raises(UnsupportedMediaType, match="label_size '2'.*only label_size=1"):
        decode_rows(b"1,2", "text/csv; label_size=2", 2)


# ---------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([1, 2, 3], np.int8), [[1, 2, 3]]),
        (np.array([[True, False, True]]), [[1, 0, 1]]),
        (np.array([[2**53 + 1, 0, 1]], np.int64), [[np.float32(float(2**53 + 1)), 0, 1]]),
        (np.array([[2**64 - 1, 0, 1]], np.uint64), [[np.float32(float(2**64 - 1)), 0, 1]]),
        (np.array([[1e300, -1e300, 0.1]]), [[INF, -INF, np.float32(0.1)]]),
        (np.array([[1.5, NAN, -0.0]], np.float16), [[1.5, NAN, -0.0]]),
        (np.array([[1.5, NAN, 2]], ">f4"), [[1.5, NAN, 2]]),
    ],
)
def test_rows_to_float32(values, expected):
    assert_same_f32(rows_to_float32(values, 3, "x"), expected)


def test_rows_to_float32_refuses():
    with pytest.raises(UnsupportedMediaType, match="dtype complex128"):
        rows_to_float32(np.zeros((1, 3), complex), 3, "x")
    with pytest.raises(UnsupportedMediaType, match="dtype <U1"):
        rows_to_float32(np.array([["a", "b", "c"]]), 3, "x")
    with pytest.raises(UnsupportedMediaType, match=r"shape \(1, 1, 3\)"):
        rows_to_float32(np.zeros((1, 1, 3)), 3, "x")
    with pytest.raises(InvalidInput, match="expected 3 features, got 2"):
        rows_to_float32(np.zeros((4, 2)), 3, "x")
    with pytest.raises(InvalidInput, match="no rows"):
        rows_to_float32(np.zeros((0, 3)), 3, "x")


# ---------------------------------------------------------------- npy


def npy(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.5, NAN, 3], np.float32),  # 1-D: one row
        np.array([[1.5, NAN, 3], [4, 5, 6]], np.float64),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3)),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array([[True, False, True]]),
    ],
)
def test_npy_roundtrips(array):
    expected = np.atleast_2d(array).astype(np.float64).astype(np.float32)
    assert_same_f32(parse_npy_rows(npy(array), 3), expected)


def test_npy_refusals_allocate_nothing_and_name_the_problem():
    good = npy(np.zeros((2, 3), np.float32))
    with pytest.raises(UnsupportedMediaType, match="must start with"):
        parse_npy_rows(b"1,2,3", 3)
    with pytest.raises(UnsupportedMediaType, match="but 20 bytes follow"):
        parse_npy_rows(good[:-4], 3)
    huge = good.replace(b"(2, 3)", b"(10**12, 3)".replace(b"10**12", b"999999999999"))
    with pytest.raises(UnsupportedMediaType, match="declares shape"):
        parse_npy_rows(huge, 3)
    with pytest.raises(UnsupportedMediaType, match="negative shape"):
        parse_npy_rows(good.replace(b"(2, 3)", b"(-1,-6)"), 3)
    with pytest.raises(UnsupportedMediaType, match="not a valid .npy"):
        parse_npy_rows(good[:20], 3)
    objects = npy(np.array([[1, "a", None]], dtype=object), allow_pickle=True)
    with pytest.raises(UnsupportedMediaType, match="dtype object"):
        parse_npy_rows(objects, 3)
    with pytest.raises(UnsupportedMediaType, match="dtype complex64"):
        parse_npy_rows(npy(np.zeros((1, 3), np.complex64)), 3)
    with pytest.raises(UnsupportedMediaType, match=r"shape \(\)"):
        parse_npy_rows(npy(np.float32(1)), 3)
    with pytest.raises(InvalidInput, match="expected 3 features, got 4"):
        parse_npy_rows(npy(np.zeros((2, 4))), 3)
    with pytest.raises(InvalidInput, match="no rows"):
        parse_npy_rows(npy(np.zeros((0, 3))), 3)
    with pytest.raises(InvalidInput, match="empty body"):
        parse_npy_rows(b"", 3)


def test_npy_version_2_header_takes_numpys_reader():
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(6, dtype="<f8").reshape(2, 3), version=(2, 0))
    assert_same_f32(parse_npy_rows(buf.getvalue(), 3), [[0, 1, 2], [3, 4, 5]])


def test_scores_to_npy():
    scores = np.array([0.25, 1e-7], np.float32)
    np.testing.assert_array_equal(np.load(io.BytesIO(scores_to_npy(scores))), scores)
    multi = np.arange(6, dtype=np.float64).reshape(3, 2)
    back = np.load(io.BytesIO(scores_to_npy(multi)))
    assert back.dtype == np.float32 and back.shape == (3, 2)


# ---------------------------------------------------------------- LIBSVM


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"1 0:1.5 2:3", [[1.5, NAN, 3]]),
        (b"0:1.5 2:3", [[1.5, NAN, 3]]),  # no label
        (b"-1 2:3 0:1.5\n+1 1:0\n", [[1.5, NAN, 3], [NAN, 0, NAN]]),  # any order; explicit 0
        (b"1\t0:1\t1:2\r\n0 2:5\r\n", [[1, 2, NAN], [NAN, NAN, 5]]),
        (b"1 qid:3 0:1 1:2", [[1, 2, NAN]]),
        (b"1\n0 1:2", [[NAN, NAN, NAN], [NAN, 2, NAN]]),  # a label only: all missing
        (b"1 0:nan 1:inf 2:-inf", [[NAN, INF, -INF]]),
        (b"1 0:.5 1:1e400 2:-0", [[0.5, INF, -0.0]]),
        (b"1 00:+1 1:1E2 2:0.1", [[1, 100, np.float32(0.1)]]),
        (b"  1 0:1  \n\n", [[1, NAN, NAN]]),  # whitespace around the body
    ],
)
def test_libsvm_parses(body, expected):
    rows = parse_libsvm_rows(body, 3)
    assert_same_f32(rows, expected)
    assert np.signbit(rows).tolist() == np.signbit(np.asarray(expected, np.float32)).tolist()


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"1 0:1\n\n1 1:2", UnsupportedMediaType, "line 2: blank line"),
        (b"x 0:1", UnsupportedMediaType, "line 1, token 1: label 'x' is not a number"),
        (b"1 0:1 7", UnsupportedMediaType, "token 3: '7' is not index:value"),
        (b"1 -1:5", UnsupportedMediaType, "'-1:5' is not index:value"),
        (b"1 1.5:5", UnsupportedMediaType, "'1.5:5' is not index:value"),
        (b"1 1:2:3", UnsupportedMediaType, "'1:2:3' is not index:value"),
        (b"1 1:", UnsupportedMediaType, "'1:' has no numeric value"),
        (b"1 :1", UnsupportedMediaType, "':1' is not index:value"),
        (b"1 0:1\n1 1:abc", UnsupportedMediaType, "line 2, token 2: value 'abc' is not a number"),
        (b"1 0:1 0:2", UnsupportedMediaType, "index 0 appears twice"),
        (b"1 0:1_0", UnsupportedMediaType, "has no numeric value"),
        (b"1 0:1\n1 3:1", InvalidInput, r"expected 3 features \(indices 0-2\), got index 3 "),
        (b"", InvalidInput, "empty body"),
    ],
)
def test_libsvm_errors_name_line_and_token(body, error, message):
    with pytest.raises(error, match=message) as info:
        parse_libsvm_rows(body, 3)
    assert type(info.value) is error


_libsvm_value = st.one_of(
    st.floats(width=32, allow_nan=False).map(lambda v: repr(float(v))),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["nan", "inf", "-inf", ".5", "1e400", "-0", "0"]),
)


@st.composite
def libsvm_bodies(draw):
    n_features = draw(st.integers(1, 6))
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        cols = draw(st.lists(st.integers(0, n_features - 1), unique=True, max_size=n_features))
        tokens = [f"{c}:{draw(_libsvm_value)}" for c in cols]
        label = draw(st.sampled_from(["", "0 ", "1 ", "-1 ", "0.5 "]))
        lines.append(label + " ".join(tokens) if tokens or label else "1")
    return "\n".join(lines).encode(), n_features


@settings(max_examples=300, deadline=None)
@given(libsvm_bodies())
def test_libsvm_fast_path_equals_exact_parser(case):
    body, n_features = case
    rows = parse_libsvm_rows(body, n_features)
    exact = _parse_exact(body.strip().split(b"\n"), n_features)
    np.testing.assert_array_equal(rows, exact)
    assert (np.signbit(rows) == np.signbit(exact)).all()


# ---------------------------------------------------------------- JSON Lines


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[1,2,3]", [[1, 2, 3]]),
        (b"[1,2,3]\n[4,null,6]\n", [[1, 2, 3], [4, NAN, 6]]),
        (b'[1,2,3]\r\n{"features":[4,5,6]}\r\n', [[1, 2, 3], [4, 5, 6]]),
        (b'{"instances":[[1,2,3]]}\n{"instances":[4,5,6]}', [[1, 2, 3], [4, 5, 6]]),
        (b"[[1,2,3]]\n [4,5,6] ", [[1, 2, 3], [4, 5, 6]]),
    ],
)
def test_jsonlines_parses_every_one_row_form(body, expected):
    assert_same_f32(parse_jsonlines_rows(body, 3), expected)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"[1,2,3]\n\n[4,5,6]", UnsupportedMediaType, "line 2: blank line"),
        (b"[1,2,3]\n[4,5", UnsupportedMediaType, "line 2 is not valid JSON"),
        (b"[1,2,3]\n[[1,2,3],[4,5,6]]", UnsupportedMediaType, "line 2: holds 2 rows"),
        (b"[1,2,3]\n[1,true,3]", UnsupportedMediaType, "line 2: row 0, index 1: true is not"),
        (b'[1,2,3]\n{"x":1}', UnsupportedMediaType, "line 2: unrecognised JSON object"),
        (b"[1,2,3]\n[1,2]", InvalidInput, "line 2: expected 3 features, got 2"),
        (b"[1,2],[3\n4,5,6]", UnsupportedMediaType, "line 1 is not valid JSON"),
        (b" \n ", InvalidInput, "empty body"),
    ],
)
def test_jsonlines_errors_name_the_line(body, error, message):
    with pytest.raises(error, match=message) as info:
        parse_jsonlines_rows(body, 3)
    assert type(info.value) is error


_json_value = st.one_of(
    st.none(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_json_value, min_size=3, max_size=3), min_size=1, max_size=6))
def test_jsonlines_fast_path_equals_per_line_path(rows):
    body = b"\n".join(orjson.dumps(r) for r in rows)
    np.testing.assert_array_equal(parse_jsonlines_rows(body, 3), _parse_lines(body, 3))


def test_scores_to_jsonlines_is_one_line_per_row():
    assert scores_to_jsonlines(np.array([0.5, NAN, 1e-7], np.float32)) == (
        b'{"score":0.5}\n{"score":null}\n{"score":1e-7}\n'
    )
    multi = np.array([[0.25, 0.75], [1, 0]], np.float32)
    assert scores_to_jsonlines(multi) == b'{"scores":[0.25,0.75]}\n{"scores":[1.0,0.0]}\n'
    assert scores_to_jsonlines(np.array([], np.float32)) == b""


@pytest.mark.parametrize(
    "body",
    [
        b'{"instances": [[1, "2", 3]]}',
        b'{"instances": [{"features": [1, "2", 3]}]}',
        b'{"features": [1, null, "3"]}',
        b'[[1, 2, "3"]]',
    ],
)
def test_json_strings_are_not_numbers_even_with_nulls_around(body):
    with pytest.raises(UnsupportedMediaType, match="is not a number or null"):
        decode_rows(body, "application/json", 3)


def test_json_nulls_take_the_vectorised_path_and_extra_keys_the_exact_one():
    assert_same_f32(
        decode_rows(b'{"instances": [[1, null, 3], [null, 5, 6]]}', "application/json", 3),
        [[1, NAN, 3], [NAN, 5, 6]],
    )
    body = b'{"instances": [[1, null, 3]], "id": "x"}'
    assert_same_f32(decode_rows(body, "application/json", 3), [[1, NAN, 3]])


# ---------------------------------------------------------------- RecordIO-protobuf


def frame(payload: bytes, flag: int = 0) -> bytes:
    head = struct.pack("<II", MAGIC, len(payload) | flag << 29)
    return head + payload + b"\0" * (-len(payload) % 4)


def dense_record(values, kind: str = "float32_tensor", shape=None, keys=None) -> bytes:
    record = Record()
    tensor = getattr(record.features["values"], kind)
    tensor.values.extend(values)
    if shape is not None:
        tensor.shape.extend(shape)
    if keys is not None:
        tensor.keys.extend(keys)
    return record.SerializeToString()


def test_recordio_tensors():
    body = frame(dense_record([1, 2, 3], "int32_tensor")) + frame(
        dense_record([4, 5, 6, 7, 8, 9], "float64_tensor", shape=[2, 3])
    )
    assert_same_f32(parse_recordio_rows(body, 3), [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    sparse = frame(dense_record([2.5], keys=[1], shape=[3])) + frame(dense_record([], shape=[3]))
    assert_same_f32(parse_recordio_rows(sparse, 3), [[NAN, 2.5, NAN], [NAN, NAN, NAN]])


def test_recordio_multi_part_records_are_joined_with_the_magic():
    payload = dense_record([1, 2, 3])
    cut1, cut2 = 5, 9  # the writer drops the magic where it cuts; the reader puts it back
    magic = struct.pack("<I", MAGIC)
    joined = payload[:cut1] + magic + payload[cut1:cut2] + magic + payload[cut2:]
    parts = [joined[:cut1], joined[cut1 + 4 : cut2 + 4], joined[cut2 + 8 :]]
    assert split_records(frame(parts[0], 1) + frame(parts[1], 2) + frame(parts[2], 3)) == [joined]
    with pytest.raises(UnsupportedMediaType, match="continuation flag 2 out of sequence"):
        split_records(frame(parts[1], 2))
    with pytest.raises(UnsupportedMediaType, match="ends inside a multi-part record"):
        split_records(frame(parts[0], 1))


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"\x0a\x23\xd7\xce", UnsupportedMediaType, "4 stray bytes"),
        (b"abcdefgh", UnsupportedMediaType, "no record magic"),
        (frame(dense_record([1, 2, 3]))[:-8], UnsupportedMediaType, "declares 28 bytes, 20 remain"),
        (frame(b"\xff\xff\xff"), UnsupportedMediaType, "record 0 is not an aialgs.data.Record"),
        (frame(b""), UnsupportedMediaType, r'no features\["values"\] tensor'),
        (frame(dense_record([1, 2], shape=[3, 4])), UnsupportedMediaType, "dense tensor of shape"),
        (frame(dense_record([1, 2], keys=[1])), UnsupportedMediaType, "1 keys and 2 values"),
        (frame(dense_record([1, 2], keys=[1, 1])), UnsupportedMediaType, "appears twice"),
        (frame(dense_record([1, 2])), InvalidInput, "expected 3 features, got 2"),
        (frame(dense_record([1], keys=[5])), InvalidInput, r"columns 0-2\), got column 5"),
        (frame(dense_record([1], keys=[0], shape=[4])), InvalidInput, "expected 3 features, got 4"),
        (frame(dense_record([], shape=[0, 3])), InvalidInput, "no rows"),
        (b"", InvalidInput, "empty body"),
    ],
)
def test_recordio_errors(body, error, message):
    with pytest.raises(error, match=message) as info:
        parse_recordio_rows(body, 3)
    assert type(info.value) is error


def test_recordio_later_features_values_win_as_in_protobuf():
    first = dense_record([1, 2, 3])
    body = frame(first + dense_record([4, 5, 6]))  # concatenated messages merge
    assert_same_f32(parse_recordio_rows(body, 3), [[4, 5, 6]])
    labelled = Record()
    labelled.label["values"].float32_tensor.values.append(1)
    body = frame(first + labelled.SerializeToString()) * 2
    assert_same_f32(parse_recordio_rows(body, 3), [[1, 2, 3], [1, 2, 3]])


def test_recordio_bytes_tensor_is_refused():
    record = Record()
    record.features["values"].bytes.value.append(b"1,2,3")
    with pytest.raises(UnsupportedMediaType, match="got bytes"):
        parse_recordio_rows(frame(record.SerializeToString()), 3)


def read_labels(body: bytes) -> list[dict[str, list[float]]]:
    return [
        {k: list(v.float32_tensor.values) for k, v in Record.FromString(p).label.items()}
        for p in split_records(body)
    ]


def test_scores_to_recordio_matches_the_protobuf_runtime():
    scores = np.array([0.25, NAN, 1e-7], np.float32)
    body = scores_to_recordio(scores)
    expected = []
    for s in scores:
        record = Record()
        record.label["score"].float32_tensor.values.append(s)
        expected.append(record)
    assert body == records_to_frames(expected)  # byte for byte
    assert scores_to_recordio(scores[:1]) == records_to_frames(expected[:1])  # one-row path
    labels = read_labels(scores_to_recordio(np.array([[0.25, 0.75]], np.float64)))
    assert labels == [{"score": [0.25, 0.75]}]
    assert scores_to_recordio(np.array([], np.float32)) == b""


def test_columns_to_recordio_long_keys_and_many_values():
    values = np.arange(300, dtype=np.float32).reshape(2, 150)  # lengths need 2-byte varints
    body = columns_to_recordio([("k" * 200, values), ("one", np.array([1, 2]))])
    assert read_labels(body) == [
        {"k" * 200: values[0].tolist(), "one": [1.0]},
        {"k" * 200: values[1].tolist(), "one": [2.0]},
    ]


# ---------------------------------------------------------------- Arrow / Parquet


def arrow_stream(*batches: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


MIXED = pa.table(
    {
        "f32": pa.array([1.5, None], pa.float32()),
        "i64": pa.array([2**53 + 1, None], pa.int64()),
        "u8": pa.array([7, 8], pa.uint8()),
        "b": pa.array([True, None]),
        "null": pa.array([None, None]),
        "f16": pa.array([np.float16(2.5), None], pa.float16()),
    }
)
MIXED_ROWS = [[1.5, np.float32(float(2**53 + 1)), 7, 1, NAN, 2.5], [NAN, NAN, 8, NAN, NAN, NAN]]


def test_arrow_and_parquet_numeric_columns_with_nulls():
    assert_same_f32(parse_arrow_stream_rows(arrow_stream(*MIXED.to_batches()), 6), MIXED_ROWS)
    assert_same_f32(parse_parquet_rows(parquet(MIXED), 6), MIXED_ROWS)
    batch = pa.record_batch({"a": [1.0, 2.0], "b": [3, 4]})
    assert_same_f32(
        parse_arrow_stream_rows(arrow_stream(batch, batch), 2), [[1, 3], [2, 4], [1, 3], [2, 4]]
    )


@pytest.mark.parametrize("parse", [parse_arrow_stream_rows, parse_parquet_rows])
def test_arrow_and_parquet_refusals(parse):
    def body(table: pa.Table) -> bytes:
        if parse is parse_parquet_rows:
            return parquet(table)
        return (
            arrow_stream(*table.to_batches())
            if table.num_rows
            else arrow_stream(
                pa.record_batch(
                    [pa.array([], t.type) for t in table.columns], names=table.column_names
                )
            )
        )

    with pytest.raises(UnsupportedMediaType, match=r"column 1 \('site'\) has type string"):
        parse(body(pa.table({"a": [1.0], "site": ["x"]})), 2)
    with pytest.raises(InvalidInput, match="expected 3 features, got 2"):
        parse(body(pa.table({"a": [1.0], "b": [2.0]})), 3)
    with pytest.raises(InvalidInput, match="no rows"):
        parse(body(pa.table({"a": pa.array([], pa.float64())})), 1)
    with pytest.raises(UnsupportedMediaType, match="not a valid"):
        parse(b"\xff" * 64, 1)
    with pytest.raises(InvalidInput, match="empty body"):
        parse(b"", 1)


# ---------------------------------------------------------------- selectable outputs


def test_parse_inference_output():
    assert parse_inference_output(" Predicted_Label , probability,,predicted_label,") == (
        "predicted_label",
        "probability",
    )
    with pytest.raises(ConfigError, match="unknown key 'probabilty'; valid keys: predicted_l"):
        parse_inference_output("predicted_label,probabilty")
    with pytest.raises(ConfigError, match="selects nothing"):
        parse_inference_output(" , ")


@pytest.mark.parametrize(
    ("objective", "n_outputs", "is_classifier", "kind"),
    [
        ("binary:logistic", 1, True, "binary"),
        ("binary", 1, True, "binary"),  # LightGBM
        ("binary:logitraw", 1, True, "margin"),
        ("binary:hinge", 1, True, "margin"),
        ("multi:softprob", 4, True, "multiclass"),
        ("multi:softmax", 4, True, "multiclass"),
        ("reg:logistic", 1, False, "regression"),
        ("reg:squarederror", 1, False, "regression"),
    ],
)
def test_model_kind(objective, n_outputs, is_classifier, kind):
    assert model_kind(objective, n_outputs, is_classifier) == kind


ALL_KEYS = "predicted_label,labels,probability,probabilities,raw_score,raw_scores,predicted_score"


def selection(keys: str, objective="binary:logistic", n_outputs=1, is_classifier=True, t=0.5):
    return OutputSelection(
        parse_inference_output(keys),
        objective=objective,
        n_outputs=n_outputs,
        is_classifier=is_classifier,
        threshold=t,
    )


def test_binary_selection_in_every_layout():
    sel = selection(ALL_KEYS)
    assert sel.invalid_keys == ("predicted_score",)
    p = np.array([0.75, 0.5, 0.25], np.float32)
    doc = orjson.loads(sel.to_json(p))
    assert doc["predictions"][0] == {
        "predicted_label": 1,
        "labels": [0, 1],
        "probability": 0.75,
        "probabilities": [0.25, 0.75],
        "raw_score": 0.75,
        "raw_scores": [0.25, 0.75],
        "predicted_score": None,
    }
    assert [r["predicted_label"] for r in doc["predictions"]] == [1, 1, 0]  # p >= threshold
    assert list(doc["predictions"][0]) == ALL_KEYS.split(",")  # the order given
    lines = sel.to_jsonlines(p).split(b"\n")
    assert lines[-1] == b"" and [orjson.loads(x) for x in lines[:-1]] == doc["predictions"]
    assert sel.to_csv(p).split(b"\n")[0] == (
        b'1,"[0, 1]",0.75,"[0.25, 0.75]",0.75,"[0.25, 0.75]",nan'
    )
    assert sel.to_csv(p).count(b"\n") == 3
    first = read_labels(sel.to_recordio(p))[0]
    assert first["probabilities"] == [0.25, 0.75] and first["labels"] == [0.0, 1.0]
    assert np.isnan(first["predicted_score"][0]) and first["predicted_label"] == [1.0]


def _csv_number(text: str) -> float | int | None:
    value = float(text)
    if np.isnan(value):
        return None
    return int(value) if text.lstrip("-").isdigit() else value


def reference_rows(sel: OutputSelection, p: np.ndarray) -> list[dict]:
    """Per row, the selected values computed one by one (binary model), JSON-style."""

    def text(v: np.float32) -> float:  # what its shortest float32 text reads back as
        return float(str(np.float32(v)))

    out = []
    for x in p.astype(np.float32):
        valid = not np.isnan(x)
        row = {
            "predicted_label": int(x >= sel.threshold),
            "labels": [0, 1],
            "probability": text(x) if valid else None,
            "probabilities": [text(np.float32(1) - x), text(x)] if valid else [None, None],
        }
        out.append({k: row[k] for k in sel.keys})
    return out


@settings(max_examples=20, deadline=None)
@given(
    st.integers(0, 9000),
    st.sampled_from(["predicted_label,probability", "labels,probabilities,predicted_label"]),
)
def test_selection_layouts_equal_a_row_by_row_reference(n, keys):
    p = np.random.default_rng(n).random(n).astype(np.float32)
    p[::97] = np.nan
    sel = selection(keys)
    expected = reference_rows(sel, p)
    assert orjson.loads(sel.to_json(p)) == {"predictions": expected}
    lines = sel.to_jsonlines(p).split(b"\n")
    assert lines[-1] == b"" and [orjson.loads(x) for x in lines[:-1]] == expected
    text = sel.to_csv(p).decode()
    assert text.count("\n") == n and (not n or text.endswith("\n"))
    for fields, row in zip(csv.reader(io.StringIO(text)), expected, strict=True):
        got = {}
        for key, field in zip(sel.keys, fields, strict=True):
            if key in ("labels", "probabilities"):
                got[key] = [_csv_number(v) for v in field.strip("[]").split(", ")]
            else:
                got[key] = _csv_number(field)
        assert got == row
    assert len(read_labels(sel.to_recordio(p))) == n


def test_selection_by_model_kind():
    m = np.array([2.0, -1.0, 0.0], np.float32)
    doc = orjson.loads(selection(ALL_KEYS, "binary:logitraw").to_json(m))["predictions"]
    assert [r["predicted_label"] for r in doc] == [1, 0, 1]  # m >= logit(0.5) = 0
    assert doc[0]["raw_score"] == 2.0 and doc[0]["raw_scores"] == [-1.0, 2.0]
    assert doc[0]["probability"] is None and doc[0]["probabilities"] is None
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    sel = selection(ALL_KEYS, "multi:softprob", n_outputs=3)
    doc = orjson.loads(sel.to_json(probs))["predictions"]
    assert doc[0]["predicted_label"] == 1 and doc[1]["predicted_label"] == 0
    assert doc[0]["labels"] == [0, 1, 2] and doc[0]["probability"] == 0.7
    assert doc[0]["probabilities"] == pytest.approx([0.1, 0.7, 0.2]) == doc[0]["raw_scores"]
    assert sel.to_csv(probs).split(b"\n")[1].startswith(b'0,"[0, 1, 2]",0.5,"[0.5, 0.2, 0.3]"')
    reg = selection("predicted_score,probability", "reg:squarederror", is_classifier=False)
    assert reg.to_csv(np.array([3.5, -1], np.float32)) == b"3.5,nan\n-1.0,nan\n"
    only_labels = selection("labels")
    assert only_labels.to_jsonlines(np.zeros(2, np.float32)) == b'{"labels":[0,1]}\n' * 2
    assert only_labels.to_csv(np.zeros(0, np.float32)) == b""


@pytest.mark.parametrize(
    "name",
    [
        "xgb_binary_logistic_json",
        "xgb_binary_logitraw_json",
        "xgb_multi_softprob_json",
        "xgb_multi_softmax_json",
        "lgb_binary",
    ],
)
def test_selected_label_is_exactly_model_predict_label(name, load, rng):
    model = load(name, "numba")
    sel = OutputSelection(
        ("predicted_label", "probability"),
        objective=model.objective,
        n_outputs=model.n_outputs,
        is_classifier=model.meta.output.is_classifier,
        threshold=model.threshold,
    )
    X = rng.normal(size=(2000, model.n_features)).astype(np.float32)  # noqa: N806
    X[rng.random(X.shape) < 0.2] = np.nan
    scores = model.predict(X)
    labels = [r["predicted_label"] for r in orjson.loads(sel.to_json(scores))["predictions"]]
    np.testing.assert_array_equal(np.array(labels), model.predict(X, output="label"))
    assert sum(labels) > 0  # not all class 0


# ---------------------------------------------------------------- environment


def test_options_from_env():
    encoders = tuple(ENCODERS)
    assert invocations_options_from_env(encoders, {}) == InvocationsOptions("text/csv", None)
    env = {
        "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": " Application/JSON; charset=utf-8 ",
        "SAGEMAKER_INFERENCE_OUTPUT": "predicted_label, probability",
    }
    assert invocations_options_from_env(encoders, env) == InvocationsOptions(
        "application/json", ("predicted_label", "probability")
    )
    blank = {"SAGEMAKER_INFERENCE_OUTPUT": "", "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": ""}
    assert invocations_options_from_env(encoders, blank) == InvocationsOptions()
    npy_default = {"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/x-npy"}
    assert invocations_options_from_env(encoders, npy_default).default_accept == "application/x-npy"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "image/png"}, "'image/png' is not a type"),
        ({"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "csv"}, "expected 'type/subtype'"),
        ({"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "*/*"}, r"'\*/\*' is not a type"),
        (
            {
                "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "application/x-npy",
                "SAGEMAKER_INFERENCE_OUTPUT": "probability",
            },
            "with SAGEMAKER_INFERENCE_OUTPUT set; supported: text/csv, application/json, ",
        ),
        ({"SAGEMAKER_INFERENCE_OUTPUT": "score"}, "unknown key 'score'"),
    ],
)
def test_bad_env_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        invocations_options_from_env(tuple(ENCODERS), env)


def test_encode_scores_for_every_accept():
    scores = np.array([0.5, 0.25], np.float32)
    for media, (body, content_type) in {m: encode_scores(scores, m) for m in ENCODERS}.items():
        assert content_type == media and body


# ---------------------------------------------------------------- fuzz

_GOLDEN_REQUESTS = {
    "text/csv": "request.csv",
    "text/libsvm": "request.libsvm",
    "application/json": "request.json",
    "application/jsonlines": "request.jsonl",
    "application/x-recordio-protobuf": "request_sparse.recordio",
    "application/x-npy": "request.npy",
    "application/vnd.apache.arrow.stream": "request.arrow",
    "application/x-parquet": "request.parquet",
}
_GOLDEN_BYTES = {ct: (GOLDEN / f).read_bytes() for ct, f in _GOLDEN_REQUESTS.items()}


@st.composite
def mutated_payloads(draw):
    content_type = draw(st.sampled_from(list(DECODERS)))
    base = _GOLDEN_BYTES.get(content_type, _GOLDEN_BYTES["text/libsvm"])
    how = draw(st.sampled_from(["random", "truncate", "splice", "overwrite", "repeat"]))
    if how == "random":
        return content_type, draw(st.binary(max_size=400))
    if how == "truncate":
        return content_type, base[: draw(st.integers(0, len(base)))]
    if how == "repeat":
        return content_type, base * draw(st.integers(2, 3))
    at = draw(st.integers(0, len(base)))
    junk = draw(st.binary(min_size=1, max_size=8))
    end = at if how == "splice" else at + len(junk)
    return content_type, base[:at] + junk + base[end:]


@settings(max_examples=1500, deadline=None)
@given(mutated_payloads())
def test_decoders_raise_only_rtbserve_errors_on_garbage(case):
    content_type, body = case
    try:
        rows = decode_rows(body, content_type, 67)
    except (InvalidInput, UnsupportedMediaType):
        return
    assert rows.dtype == np.float32 and rows.ndim == 2 and rows.shape[1] == 67
    assert rows.shape[0] >= 1 and rows.flags.c_contiguous and rows.flags.writeable
