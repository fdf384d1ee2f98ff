"""rtbserve.codecs: CSV/JSON payloads, score encoding, media types and Accept negotiation.

Pure functions, no sockets. The CSV fast path is checked against the exact per-token parser
(``_parse_csv_exact``) and both against ``np.float32(float(token))``.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rtbserve.codecs import (
    DECODERS,
    ENCODERS,
    decode_rows,
    encode_scores,
    negotiate,
    parse_csv_rows,
    parse_json_rows,
    parse_media_type,
    scores_to_csv,
    scores_to_json,
)
from rtbserve.codecs.csv_codec import _parse_csv_exact
from rtbserve.errors import InvalidInput, NotAcceptable, UnsupportedMediaType

NAN = float("nan")
INF = float("inf")
SUPPORTED = ("text/csv", "application/json")


def assert_same_f32(actual: np.ndarray, expected) -> None:
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.dtype == np.float32
    assert actual.flags.c_contiguous
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)  # NaN == NaN here, signs of inf checked


# ---------------------------------------------------------------- CSV: valid bodies


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"1,2,3", [[1, 2, 3]]),
        (b"1,2,3\n", [[1, 2, 3]]),
        (b"1,2,3\n4,5,6\n", [[1, 2, 3], [4, 5, 6]]),
        (b"1,2,3\r\n4,5,6\r\n", [[1, 2, 3], [4, 5, 6]]),
        (b"  \n 1, 2 ,3 \n\t4,5,6\n\n  ", [[1, 2, 3], [4, 5, 6]]),
        (b"1,,3", [[1, NAN, 3]]),
        (b",2,", [[NAN, 2, NAN]]),
        (b",,", [[NAN, NAN, NAN]]),
        (b"1, ,3", [[1, NAN, 3]]),
        (b"nan,NaN,-nan", [[NAN, NAN, NAN]]),
        (b"inf,-inf,+inf", [[INF, -INF, INF]]),
        (b"Infinity,-infinity,1e400", [[INF, -INF, INF]]),
        (b"1e-400,-0,.5", [[0.0, -0.0, 0.5]]),
        (b"0.1,1e5,-2.5E-3", [[0.1, 1e5, -2.5e-3]]),
        (b",,\n,,", [[NAN] * 3, [NAN] * 3]),
    ],
)
def test_csv_valid_bodies(body, expected):
    assert_same_f32(parse_csv_rows(body, 3), expected)
    assert_same_f32(_parse_csv_exact(body, 3), expected)


def test_csv_single_feature_rows():
    assert_same_f32(parse_csv_rows(b"1\n2\n\n", 1), [[1], [2]])
    with pytest.raises(UnsupportedMediaType, match="^line 2, column 1: blank line"):
        parse_csv_rows(b"1\n\n2", 1)  # a blank line is not an empty field, even for one feature


def test_csv_values_are_float32_of_the_float64_parse():
    # 0.1 and a value between two float32s: rounding goes through float64, as float() does.
    tokens = ["0.1", "16777217", "3.4028235e38", "3.4028236e38", "1.4e-45", "0.7e-45"]
    body = ",".join(tokens).encode()
    with np.errstate(over="ignore"):
        expected = [[np.float32(float(t)) for t in tokens]]
    assert_same_f32(parse_csv_rows(body, len(tokens)), expected)


def test_csv_negative_zero_keeps_its_sign():
    out = parse_csv_rows(b"-0.0,0", 2)
    assert math.copysign(1, out[0, 0]) == -1
    assert math.copysign(1, out[0, 1]) == 1


def test_csv_error_lines_count_leading_blank_lines_of_the_body():
    with pytest.raises(UnsupportedMediaType, match=r"^line 3, column 2: 'x' is not a number"):
        parse_csv_rows(b"\n\n1,x,3\n", 3)


# ---------------------------------------------------------------- CSV: errors


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"1,2,3\n4,abc,6", r"^line 2, column 2: 'abc' is not a number$"),
        (b"1,2,3\n4,5,6\n7,8,9x", r"^line 3, column 3: '9x' is not a number$"),
        (b"1,2,1_0", r"^line 1, column 3: '1_0' is not a number$"),
        (b"1,2 5,3", r"^line 1, column 2: '2 5' is not a number$"),
        (b"1,0x10,3", r"^line 1, column 2: '0x10' is not a number$"),
        (b"1,nan(1),3", r"^line 1, column 2: 'nan\(1\)' is not a number$"),
        (b"a,b,c\n1,2,3", r"^line 1, column 1: 'a' is not a number; CSV bodies have no header"),
        (b"1,2,3\n\n4,5,6", r"^line 2, column 1: blank line inside the body"),
        (b"1,2,3\r\n  \r\n4,5,6", r"^line 2, column 1: blank line inside the body"),
        (b"1,2,3\n4,5\n", r"^line 2, column 3: ragged rows: line 2 has 2 fields, line 1 has 3$"),
        (b"1,2,3\n4,5,6,7", r"^line 2, column 4: ragged rows: line 2 has 4 fields, line 1 has 3"),
        (b"1,2,3\r4,5,6", r"^line 1, column 3: '3\\r4' is not a number$"),
        (b"1,\xff,3", "^line 1, column 2: '\ufffd' is not a number$"),
    ],
)
def test_csv_unparsable_bodies_are_unsupported_media_type(body, message):
    with pytest.raises(UnsupportedMediaType, match=message):
        parse_csv_rows(body, 3)


def test_csv_header_hint_only_when_the_whole_first_line_is_text():
    with pytest.raises(UnsupportedMediaType) as info:
        parse_csv_rows(b"1,b,3\n1,2,3", 3)
    assert "header" not in str(info.value)


def test_csv_long_bad_token_is_truncated_in_the_message():
    with pytest.raises(UnsupportedMediaType) as info:
        parse_csv_rows(b"1," + b"z" * 500 + b",3", 3)
    assert len(str(info.value)) < 100
    assert "..." in str(info.value)


@pytest.mark.parametrize(
    ("body", "n", "width"),
    [(b"1,2", 3, 2), (b"1,2,3,4\n5,6,7,8\n", 3, 4), (b",,,", 3, 4), (b"1", 67, 1)],
)
def test_csv_wrong_feature_count_is_invalid_input_not_415(body, n, width):
    with pytest.raises(InvalidInput, match=f"^expected {n} features, got {width}$") as info:
        parse_csv_rows(body, n)
    assert not isinstance(info.value, UnsupportedMediaType)


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\r\n\t"])
def test_csv_empty_body(body):
    with pytest.raises(InvalidInput, match="^empty body$"):
        parse_csv_rows(body, 3)


def test_csv_bad_token_reported_before_feature_count():
    with pytest.raises(UnsupportedMediaType, match="column 2"):
        parse_csv_rows(b"1,x", 3)


# ---------------------------------------------------------------- CSV: properties

f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 12)), elements=f32))
def test_csv_repr_text_of_random_rows_parses_exactly(matrix):
    body = "\n".join(",".join(repr(float(v)) for v in row) for row in matrix).encode()
    assert_same_f32(parse_csv_rows(body, matrix.shape[1]), matrix)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=30))
def test_csv_float64_text_rounds_like_np_float32_of_float(values):
    body = ",".join(repr(v) for v in values).encode()
    with np.errstate(over="ignore"):
        expected = [[np.float32(float(repr(v))) for v in values]]
    assert_same_f32(parse_csv_rows(body, len(values)), expected)


_TOKEN = st.one_of(
    st.sampled_from(["nan", "-inf", "Infinity", "1e400", "", " ", "1e", "in", "nanf", "+-1", "."]),
    st.text(alphabet="0123456789.eE+-nNaAiIfFtTyY \t_x", max_size=6),
)


@settings(max_examples=500, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.lists(_TOKEN, min_size=1, max_size=5), min_size=1, max_size=4),
            st.sampled_from(["\n", "\r\n"]),
        )
    )
)
def test_csv_fast_path_agrees_with_exact_parser(case):
    n, rows, newline = case
    body = newline.join(",".join(row) for row in rows).encode()
    if not body.strip():
        return

    def outcome(parse):
        try:
            return "ok", parse(body, n)
        except InvalidInput as exc:
            return type(exc).__name__, str(exc)

    fast, exact = outcome(parse_csv_rows), outcome(_parse_csv_exact)
    assert fast[0] == exact[0]
    if fast[0] == "ok":
        assert_same_f32(fast[1], exact[1])
    else:
        assert fast[1] == exact[1]


# ---------------------------------------------------------------- CSV: scores


def test_scores_to_csv_shortest_float32_text():
    scores = np.array([0.1, 1 / 3, 1e-7, 1.0, -0.0, NAN, INF, -INF], dtype=np.float32)
    assert scores_to_csv(scores) == b"0.1\n0.33333334\n1e-7\n1.0\n-0.0\nnan\ninf\n-inf\n"


def test_scores_to_csv_two_dimensional_and_edge_shapes():
    assert scores_to_csv(np.array([[0.1, 0.9], [0.5, 0.5]])) == b"0.1,0.9\n0.5,0.5\n"
    assert scores_to_csv(np.array([[0.1, NAN]])) == b"0.1,nan\n"
    assert scores_to_csv(np.float32(0.25)) == b"0.25\n"
    assert scores_to_csv(np.zeros(0, dtype=np.float32)) == b""
    with pytest.raises(ValueError, match="1-D or 2-D"):
        scores_to_csv(np.zeros((1, 1, 1)))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 50), elements=f32))
def test_scores_csv_round_trip_1d(scores):
    body = scores_to_csv(scores)
    assert body.count(b"\n") == scores.size and body.endswith(b"\n")
    assert_same_f32(parse_csv_rows(body, 1), scores.reshape(-1, 1))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 6)), elements=f32))
def test_scores_csv_round_trip_2d(scores):
    assert_same_f32(parse_csv_rows(scores_to_csv(scores), scores.shape[1]), scores)


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "body",
    [
        b"[[1, 2, 3], [4, null, 6]]",
        b'{"instances": [[1, 2, 3], [4, null, 6]]}',
        b'{"instances": [{"features": [1, 2, 3]}, {"features": [4, null, 6]}]}',
    ],
)
def test_json_row_forms(body):
    assert_same_f32(parse_json_rows(body, 3), [[1, 2, 3], [4, NAN, 6]])


@pytest.mark.parametrize(
    "body", [b"[1, 2.5, null]", b'{"features": [1, 2.5, null]}', b'{"instances": [1, 2.5, null]}']
)
def test_json_single_row_forms(body):
    assert_same_f32(parse_json_rows(body, 3), [[1, 2.5, NAN]])


def test_json_values_round_through_float64_and_big_ints():
    body = b"[[0.1, 16777217, 1e300, 100000000000000000000000000000]]"
    assert_same_f32(parse_json_rows(body, 4), [[np.float32(0.1), 16777216, INF, 1e29]])


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"[1, 2", UnsupportedMediaType, r"not valid JSON: .*line 1 column"),
        (b"1,2,3", UnsupportedMediaType, r"not valid JSON"),
        (b'{"rows": [[1, 2, 3]]}', UnsupportedMediaType, r"keys \['rows'\]; expected one of"),
        (b'"abc"', UnsupportedMediaType, r"JSON str is not a feature payload; expected one of"),
        (b'{"instances": 5}', UnsupportedMediaType, r'"instances" must be a list'),
        (b'{"instances": [{"x": 1}]}', UnsupportedMediaType, r'instance 0 has no "features"'),
        (b"[[1, 2, 3], 4]", UnsupportedMediaType, r"row 1 is a int, not a list"),
        (b'[[1, 2, 3], [4, "5", 6]]', UnsupportedMediaType, r'^row 1, index 1: "5" is not a num'),
        (b"[[1, true, 3]]", UnsupportedMediaType, r"^row 0, index 1: true is not a number"),
        (b"[[1, [2], 3]]", UnsupportedMediaType, r"^row 0, index 1: \[2\] is not a number"),
        (b"[[1, 2]]", InvalidInput, r"^expected 3 features, got 2$"),
        (b"[[1, 2, 3], [1, 2]]", InvalidInput, r"^expected 3 features, got 2 \(row 1\)$"),
        (b"[[1, 2, 3], [1, null]]", InvalidInput, r"^expected 3 features, got 2 \(row 1\)$"),
        (b"[]", InvalidInput, r"^no rows"),
        (b"  ", InvalidInput, r"^empty body$"),
    ],
)
def test_json_errors(body, error, message):
    with pytest.raises(error, match=message) as info:
        parse_json_rows(body, 3)
    if error is InvalidInput:
        assert not isinstance(info.value, UnsupportedMediaType)


def test_scores_to_json_forms():
    assert scores_to_json(np.array([0.1, 0.5])) == (
        b'{"predictions":[{"score":0.1},{"score":0.5}]}'
    )
    assert scores_to_json(np.array([[0.1, 0.9]])) == b'{"predictions":[{"scores":[0.1,0.9]}]}'
    assert orjson.loads(scores_to_json(np.array([NAN, INF, -INF, 1.0]))) == {
        "predictions": [{"score": None}, {"score": None}, {"score": None}, {"score": 1.0}]
    }
    assert scores_to_json(np.zeros(0)) == b'{"predictions":[]}'


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(width=32, allow_infinity=False))
)
def test_scores_json_round_trip_1d(scores):
    # JSON cannot spell inf, so encoding writes null (tested above); NaN survives as null.
    doc = orjson.loads(scores_to_json(scores))
    features = [[p["score"]] for p in doc["predictions"]]
    assert_same_f32(parse_json_rows(orjson.dumps(features), 1), scores.reshape(-1, 1))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 20), st.integers(1, 6)),
        elements=st.floats(width=32, allow_infinity=False),
    )
)
def test_scores_json_round_trip_2d(scores):
    doc = orjson.loads(scores_to_json(scores))
    rows = [p["scores"] for p in doc["predictions"]]
    body = orjson.dumps({"instances": [{"features": r} for r in rows]})
    assert_same_f32(parse_json_rows(body, scores.shape[1]), scores)


# ---------------------------------------------------------------- media types


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text/csv", ("text/csv", {})),
        ("Text/CSV; Charset=UTF-8", ("text/csv", {"charset": "UTF-8"})),
        (
            " text/csv ;charset=utf-8 ; label_size=1 ",
            ("text/csv", {"charset": "utf-8", "label_size": "1"}),
        ),
        ('text/csv; charset="utf-8"', ("text/csv", {"charset": "utf-8"})),
        ('application/json; x="a;b\\"c"; y=2', ("application/json", {"x": 'a;b"c', "y": "2"})),
        ("text/csv; flag", ("text/csv", {})),
    ],
)
def test_parse_media_type(value, expected):
    assert parse_media_type(value) == expected


@pytest.mark.parametrize("value", ["", "csv", "text/", "/csv", "text/csv/x", "text csv/x"])
def test_parse_media_type_malformed(value):
    with pytest.raises(UnsupportedMediaType, match="expected 'type/subtype'"):
        parse_media_type(value)


@pytest.mark.parametrize(
    ("accept", "default", "expected"),
    [
        (None, "text/csv", "text/csv"),
        ("", "application/json", "application/json"),
        ("*/*", "application/json", "application/json"),
        ("text/csv", "application/json", "text/csv"),
        ("TEXT/CSV; charset=utf-8", "application/json", "text/csv"),
        ("application/json, text/csv", "text/csv", "application/json"),
        ("text/csv, application/json;q=0.9", "application/json", "text/csv"),
        ("text/csv;q=0.5, application/json", "text/csv", "application/json"),
        ("text/csv;q=0, */*", "text/csv", "application/json"),
        ("application/*", "text/csv", "application/json"),
        ("text/*, application/json;q=0.1", "application/json", "text/csv"),
        ("image/png, */*;q=0.1", "text/csv", "text/csv"),
        ("*/*;q=0.2, application/json;q=0.5", "text/csv", "application/json"),
        ("text/*;q=0, text/csv", "application/json", "text/csv"),
        ("bogus, application/json;q=abc, text/csv", "application/json", "text/csv"),
        ("application/jsonlines, application/json", "text/csv", "application/json"),
    ],
)
def test_negotiate(accept, default, expected):
    assert negotiate(accept, SUPPORTED, default) == expected


@pytest.mark.parametrize(
    "accept", ["image/png", "text/csv;q=0, application/json;q=0", "*/*;q=0", "text/html, bogus"]
)
def test_negotiate_not_acceptable_lists_supported(accept):
    with pytest.raises(NotAcceptable, match="supported: text/csv, application/json$"):
        negotiate(accept, SUPPORTED, "text/csv")


# ---------------------------------------------------------------- registry


def test_registry_tables():
    assert set(SUPPORTED) <= set(ENCODERS) <= set(DECODERS)
    assert list(ENCODERS)[:2] == list(SUPPORTED)  # CSV first: the preferred answer


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"1,2,3", "text/csv"),
        (b"1,2,3", "TEXT/CSV; charset=UTF-8; label_size=1"),
        (b"1,2,3", "text/csv; charset=us-ascii"),
        (b"[1,2,3]", "application/json; charset=utf8"),
    ],
)
def test_decode_rows_dispatches(body, content_type):
    assert_same_f32(decode_rows(body, content_type, 3), [[1, 2, 3]])


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("image/png", r"unsupported content type 'image/png'; supported: text/csv, appl"),
        ("", r"missing content type; supported: text/csv, application/json"),
        ("text/csv; charset=utf-16", r"unsupported charset 'utf-16'; supported: utf-8"),
        ("garbage", r"expected 'type/subtype'"),
    ],
)
def test_decode_rows_rejects_content_types(content_type, message):
    with pytest.raises(UnsupportedMediaType, match=message):
        decode_rows(b"1,2,3", content_type, 3)


def test_encode_scores():
    scores = np.array([0.5, 0.25], dtype=np.float32)
    assert encode_scores(scores, "text/csv") == (b"0.5\n0.25\n", "text/csv")
    body, content_type = encode_scores(scores, "Application/JSON")
    assert content_type == "application/json"
    assert orjson.loads(body) == {"predictions": [{"score": 0.5}, {"score": 0.25}]}
    with pytest.raises(NotAcceptable, match="supported: text/csv, application/json, "):
        encode_scores(scores, "image/png")


def test_negotiated_type_encodes():
    media = negotiate("application/*", SUPPORTED, "text/csv")
    assert encode_scores(np.array([1.0]), media)[1] == media
