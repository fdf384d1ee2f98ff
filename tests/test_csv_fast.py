"""CSV fast paths against the exact parser: the C extension and the pure-Python fast path.

The spec is ``_parse_csv_exact``: ``parse_csv_rows`` must return its matrix bit for bit (NaN
signs included) or raise its exception with its message, whichever path runs; the C
extension's ``parse_rows`` must return that matrix or None (pass), never anything else. Every
value is also checked against ``np.float32(float(token))``. Tokens come from float()'s grammar
(decimal forms, float32 and float64 rounding boundaries, Clinger fast-path edges, long
mantissas, huge exponents, nan/inf spellings) and from just outside it (hex, underscores,
``nan(1)``, ``1e``, non-ASCII digits, NUL bytes). ``scores_to_csv`` is checked against the
token-by-token writer it short-cuts.
"""

from __future__ import annotations

import decimal
import threading

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rtbserve.codecs import csv_codec
from rtbserve.codecs.csv_codec import (
    _float32_tokens,
    _parse_csv_exact,
    parse_csv_rows,
    scores_to_csv,
)
from rtbserve.errors import InvalidInput

try:
    from rtbserve.codecs import _csv_fast
except ImportError:  # installed without a C compiler
    _csv_fast = None

needs_extension = pytest.mark.skipif(
    _csv_fast is None, reason="rtbserve.codecs._csv_fast not built (no C compiler at install)"
)


def _parse_without_extension(body: bytes, n_features: int) -> np.ndarray:
    saved = csv_codec._parse_rows_c
    csv_codec._parse_rows_c = None
    try:
        return parse_csv_rows(body, n_features)
    finally:
        csv_codec._parse_rows_c = saved


PARSERS = [
    pytest.param(parse_csv_rows, id="c", marks=needs_extension),
    pytest.param(_parse_without_extension, id="python"),
]


def reference(body: bytes, n_features: int) -> np.ndarray:
    """parse_csv_rows's contract: the exact parser, after the two argument checks."""
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if not body.strip():
        raise InvalidInput("empty body")
    return _parse_csv_exact(body, n_features)


def outcome(parse, body: bytes, n_features: int):
    """("ok", float32 bits) or (exception type, message): comparable with ==."""
    try:
        rows = parse(body, n_features)
    except Exception as exc:
        return type(exc), str(exc)
    assert rows.dtype == np.float32
    assert rows.flags.c_contiguous
    assert rows.ndim == 2
    return "ok", rows.shape, rows.view(np.uint32).tolist()


def float32_of(token: str) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(float(token))


def bits(values) -> list:
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


# ---------------------------------------------------------------- tokens float() accepts

_SIGN = st.sampled_from(["", "+", "-"])
_SPACE = st.text(alphabet=" \t\r\x0b\x0c", max_size=2)
_DIGITS = st.text(alphabet="0123456789", max_size=30)


@st.composite
def decimal_tokens(draw) -> str:
    """Any [+-](digits[.[digits]] | .digits)[(e|E)[+-]digits], from short to very long."""
    whole, fraction = draw(_DIGITS), draw(_DIGITS)
    if not whole and not fraction:
        whole = draw(st.sampled_from("0123456789"))
    body = f"{whole}.{fraction}" if fraction else whole + draw(st.sampled_from(["", "."]))
    if draw(st.booleans()):
        exponent = draw(
            st.one_of(
                st.integers(-60, 60),
                st.integers(-400, 400),
                st.sampled_from([-(10**25), 10**25, 99999, -99999]),
            )
        )
        letter = draw(st.sampled_from("eE"))
        plus = draw(st.sampled_from(["", "+"])) if exponent >= 0 else ""
        zeros = "0" * draw(st.integers(0, 2))
        body += f"{letter}{plus}{'-' if exponent < 0 else ''}{zeros}{abs(exponent)}"
    return draw(_SIGN) + body


@st.composite
def special_tokens(draw) -> str:
    word = draw(st.sampled_from(["nan", "inf", "infinity"]))
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    return draw(_SIGN) + cased


@st.composite
def boundary_tokens(draw) -> str:
    """Decimal text at or next to a tie between two float32s or two float64s."""
    width = draw(st.sampled_from([32, 64]))
    kind = np.float32 if width == 32 else np.float64
    low = kind(draw(st.floats(width=width, allow_nan=False, allow_infinity=False)))
    with np.errstate(over="ignore"):
        high = np.nextafter(low, kind(np.inf))
    if not np.isfinite(high):
        return repr(float(low))
    with decimal.localcontext() as ctx:
        ctx.prec = 2000
        mid = (decimal.Decimal(float(low)) + decimal.Decimal(float(high))) / 2  # exact
        # Off the tie by less than float64 resolves, or by more: float64 rounds first.
        nudge = draw(st.sampled_from([0, 1, -1])) * draw(st.sampled_from([17, 20, 40]))
        if nudge:
            mid += abs(mid).scaleb(-abs(nudge)).copy_sign(decimal.Decimal(nudge))
    text = draw(st.sampled_from(["{:f}", "{:e}", "{}"])).format(mid)
    return text if text.startswith("-") else draw(_SIGN) + text


@st.composite
def clinger_edge_tokens(draw) -> str:
    """Mantissas around 2^53 and 19-20 digits, exponents around +-22: the fast path's edges."""
    mantissa = draw(
        st.one_of(
            st.integers(2**53 - 3, 2**53 + 3),
            st.integers(10**18 - 2, 10**20 + 2),
            st.integers(1, 2**64),
        )
    )
    exponent = draw(st.integers(-25, 25))
    return f"{draw(_SIGN)}{mantissa}e{exponent}"


VALID_TOKENS = st.one_of(
    decimal_tokens(),
    special_tokens(),
    boundary_tokens(),
    clinger_edge_tokens(),
    st.floats(allow_nan=False).map(repr),
    st.floats(width=32, allow_nan=False).map(lambda v: repr(float(v))),
    st.floats(allow_nan=False, allow_subnormal=True, max_value=1e-300, min_value=-1e-300).map(repr),
)


@settings(max_examples=1500, deadline=None)
@given(VALID_TOKENS)
@example("0.330000013")
@example("1e-46")  # below float32's smallest subnormal: 0
@example("3.4028235677973366e38")  # just above FLT_MAX: rounds down, not to inf
@example("3.4028235677973367e38")  # the tie above FLT_MAX: inf
@example("7.006492321624085e-46")  # half the smallest float32 subnormal: ties to 0
@example("9007199254740993")  # 2^53 + 1: no longer exact, needs strtod
@example("1" * 400)
@example("0." + "0" * 400 + "1e400")
@example("0e999999999999999999999")
@example("-0")
@example("1.")
@example(".5")
def test_token_is_float32_of_float(token):
    expected = bits([float32_of(token)])
    for parse in (parse_csv_rows, _parse_without_extension):
        assert parse(token.encode(), 1).view(np.uint32).ravel().tolist() == expected, parse


@needs_extension
@settings(max_examples=500, deadline=None)
@given(st.lists(VALID_TOKENS, min_size=1, max_size=8))
def test_extension_takes_every_row_of_valid_tokens(tokens):
    # A valid token the C parser passed on would be correct but slow: none may be.
    rows = _csv_fast.parse_rows(",".join(tokens).encode(), len(tokens))
    assert rows is not None
    assert rows.view(np.uint32).ravel().tolist() == bits([float32_of(t) for t in tokens])


# ---------------------------------------------------------------- whole valid bodies


@st.composite
def valid_bodies(draw) -> tuple[bytes, int]:
    n = draw(st.integers(1, 6))
    field = st.one_of(VALID_TOKENS, st.just("")) if n > 1 else VALID_TOKENS
    rows = draw(st.lists(st.lists(field, min_size=n, max_size=n), min_size=1, max_size=5))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    space = _SPACE if draw(st.booleans()) else st.just("")
    lines = [",".join(draw(space) + token + draw(space) for token in row) for row in rows]
    head = draw(st.text(alphabet=" \t\r\n\x0b\x0c", max_size=3))
    tail = draw(st.sampled_from(["", "\n", "\r\n", "\n\n", " \n\t"]))
    return (head + newline.join(lines) + tail).encode(), n


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=400, deadline=None)
@given(valid_bodies())
def test_valid_bodies_give_the_exact_matrix(parse, case):
    body, n = case
    expected = outcome(reference, body, n)
    assert expected[0] == "ok"
    assert outcome(parse, body, n) == expected


@needs_extension
@settings(max_examples=300, deadline=None)
@given(valid_bodies())
def test_extension_takes_every_valid_body(case):
    body, n = case
    rows = _csv_fast.parse_rows(body, n)
    assert rows is not None
    assert outcome(lambda b, k: rows, body, n) == outcome(reference, body, n)


def test_demo_rows_with_empty_fields():
    lines = [
        b"1,0,,0.330000013,-0.965925813,,776,116.300003,",
        b",,0.0900000036,1e-7,-0,+inf,NaN,-nan,0",
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    expected = outcome(reference, body, 9)
    assert expected[0] == "ok"
    for parse in (parse_csv_rows, _parse_without_extension):
        assert outcome(parse, body, 9) == expected
    nan_signs = np.signbit(parse_csv_rows(body, 9)[1, 6:8]).tolist()
    assert nan_signs == [False, True]


# ---------------------------------------------------------------- malformed bodies

BAD_TOKENS = [
    "0x10", "0x1p3", "0X1P-2", "1_0", "1__0", "_1", "1_", "nan(1)", "nan()", "-nan(0x1)",
    "1e", "1E+", "1e-", "e5", "E5", ".", "+", "-", ".e1", "1.2.3", "1..2", "--1", "+-1",
    "1e5.5", "1e5e5", "inf5", "5inf", "infinit", "infinityy", "infin", "in", "i", "n",
    "na", "nanx", "snan", "nani", "1d5", "1f", "0b1", "1,5e",
    "\u0661", "\uff11", "1\u00a0", "\u00a01", "\u2212" + "1", "1\x00", "\x00", "\x001",
    "1\x1c", "\x1f1", "1 2", "1\t2", "1\r2", "1e 5", "- 1", "+ inf", "abc", "true", "null",
]  # fmt: skip


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("token", BAD_TOKENS)
@pytest.mark.parametrize("at", [0, 1, 2])
def test_bad_token_gives_the_exact_error(parse, token, at):
    fields = ["1", "2.5", ""]
    fields[at] = token
    body = ("0,0,0\n" + ",".join(fields) + "\n").encode()
    expected = outcome(reference, body, 3)
    assert outcome(parse, body, 3) == expected
    if _csv_fast is not None and expected[0] != "ok":
        assert _csv_fast.parse_rows(body, 3) is None


MALFORMED_BODIES = [
    (b"1,2,3\n\n4,5,6", 3),  # blank line
    (b"1,2,3\r\n \t\r\n4,5,6", 3),  # blank line of whitespace
    (b"1\n\n2", 1),
    (b"1\n \r\n2", 1),
    (b"1,2,3\n4,5\n", 3),  # ragged
    (b"1,2,3\n4,5,6,7", 3),
    (b"1,2\n3,4,5", 3),
    (b"1,2,3\r4,5,6", 3),  # stray \r as the row separator
    (b"1,2,3\n4,5,6", 2),  # wrong feature count
    (b"1,2,3\n4,5,6", 4),
    (b",,,", 3),
    (b"1", 67),
    (b"a,b,c\n1,2,3", 3),  # header
    (b"  \n\t ", 3),  # empty
    (b"", 1),
    (b"1,2,3", 0),  # n_features < 1
    (b"1,2,3", -5),
    (b"1,\xff,3", 3),
    (b"1,2,3\x00", 3),
    (b"\x001,2,3", 3),
    (b"1,2,3\n4,5,6\n7,8,9x", 3),
]


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize(("body", "n"), MALFORMED_BODIES)
def test_malformed_bodies_give_the_exact_error(parse, body, n):
    expected = outcome(reference, body, n)
    assert expected[0] != "ok"
    assert outcome(parse, body, n) == expected
    if _csv_fast is not None:
        assert _csv_fast.parse_rows(body, n) is None


_SOUP_TOKEN = st.one_of(
    VALID_TOKENS,
    st.sampled_from(BAD_TOKENS),
    st.text(alphabet="0123456789.eE+-_xXpP()nNaAiIfFtTyY \t\r\x0b\x0c\x00", max_size=8),
)


@st.composite
def soup_bodies(draw) -> tuple[bytes, int]:
    """Rows of valid and invalid tokens, of mixed widths, joined by any newline."""
    n = draw(st.integers(1, 4))
    rows = draw(
        st.lists(
            st.lists(st.one_of(_SOUP_TOKEN, st.just("")), min_size=1, max_size=5),
            min_size=1,
            max_size=4,
        )
    )
    newlines = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\n \n"])
    body = ",".join(rows[0])
    for row in rows[1:]:
        body += draw(newlines) + ",".join(row)
    return body.encode(), n


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=1000, deadline=None)
@given(soup_bodies())
def test_any_body_gives_the_exact_outcome(parse, case):
    body, n = case
    assert outcome(parse, body, n) == outcome(reference, body, n)


@needs_extension
@settings(max_examples=1000, deadline=None)
@given(st.one_of(soup_bodies(), st.tuples(st.binary(max_size=40), st.integers(1, 4))))
def test_extension_returns_the_exact_matrix_or_passes(case):
    body, n = case
    rows = _csv_fast.parse_rows(body, n)
    if rows is not None:
        assert outcome(lambda b, k: rows, body, n) == outcome(reference, body, n)


# ---------------------------------------------------------------- argument types, big bodies


@needs_extension
def test_extension_passes_on_arguments_it_does_not_know():
    assert _csv_fast.parse_rows(memoryview(b"1,2"), 2) is None
    assert _csv_fast.parse_rows("1,2", 2) is None
    assert _csv_fast.parse_rows(b"1,2", 2.0) is None
    assert _csv_fast.parse_rows(b"1,2", 2**70) is None
    assert _csv_fast.parse_rows(bytearray(b"1,2"), np.int64(2)).tolist() == [[1.0, 2.0]]
    with pytest.raises(TypeError, match="2 arguments"):
        _csv_fast.parse_rows(b"1,2")


def test_bytearray_body_parses_like_bytes():
    assert outcome(parse_csv_rows, bytearray(b"1,,3\n4,5,6"), 3) == outcome(
        reference, b"1,,3\n4,5,6", 3
    )


def _big_body(rows: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, 67)).astype(np.float32) * 1000
    values[rng.random(values.shape) < 0.1] = np.nan
    values[:, :20] = rng.integers(0, 2, (rows, 20))
    text = [",".join("" if np.isnan(v) else repr(float(v)) for v in row) for row in values]
    return ("\n".join(text) + "\n").encode()


def test_big_body_without_the_gil_gives_the_exact_matrix():
    body = _big_body(600)
    assert len(body) > 64 * 1024  # the C parser releases the GIL from 64 KiB
    expected = outcome(reference, body, 67)
    results = []

    def parse_in_thread():
        results.append(outcome(parse_csv_rows, body, 67))

    threads = [threading.Thread(target=parse_in_thread) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 3


def test_big_body_with_one_bad_field_at_the_end_gives_the_exact_error():
    body = _big_body(600)[:-2] + b"x\n"
    expected = outcome(reference, body, 67)
    assert expected[0] != "ok"
    assert outcome(parse_csv_rows, body, 67) == expected


# ---------------------------------------------------------------- scores_to_csv


def _scores_to_csv_by_tokens(scores) -> bytes:
    """The writer scores_to_csv short-cuts: one token per value, joined."""
    arr = np.ascontiguousarray(scores, dtype=np.float32)
    if arr.size == 0:
        return b""
    arr = arr.reshape(arr.shape[0], -1)
    tokens = _float32_tokens(arr.reshape(-1))
    k = arr.shape[1]
    return b"".join(b",".join(tokens[i : i + k]) + b"\n" for i in range(0, len(tokens), k))


_F32 = st.floats(width=32)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        hnp.arrays(np.float32, st.integers(0, 40), elements=_F32),
        hnp.arrays(np.float32, st.tuples(st.integers(0, 10), st.integers(1, 5)), elements=_F32),
        # float64 scores within float32's range (beyond it the cast warns, as it always has)
        hnp.arrays(np.float64, st.integers(1, 10), elements=st.floats(-3e38, 3e38) | _F32),
    )
)
def test_scores_to_csv_matches_the_token_writer(scores):
    assert scores_to_csv(scores) == _scores_to_csv_by_tokens(scores)


def test_scores_to_csv_other_layouts():
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert scores_to_csv(matrix[:, 1]) == _scores_to_csv_by_tokens(matrix[:, 1].copy())
    assert scores_to_csv(matrix.T) == _scores_to_csv_by_tokens(matrix.T.copy())
    assert scores_to_csv([0.5, float("nan")]) == b"0.5\nnan\n"
    assert scores_to_csv(np.float64(3e38)) == b"3e+38\n"  # orjson's spelling, kept
    assert scores_to_csv(np.zeros((0, 3), dtype=np.float32)) == b""
