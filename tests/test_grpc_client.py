"""``rtbserve.client.grpc`` end to end: the sync and asyncio clients against a real server.

The wire helpers are checked against protobuf's own encoding; the clients against the server
(``grpc_testutil.GrpcServerThread``, 127.0.0.1 port 0, its own uvloop loop) and the model's own
``predict`` (exact float32). Error classes must come back as the server raised them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import uvloop
from grpc_testutil import (
    N_FEATURES,
    WAIT_S,
    GatedModel,
    GrpcServerThread,
    demo_model,
    demo_rows,
    let_pass,
    settings,
    watch_submits,
)
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from rtbserve._proto.predictor_pb2 import PredictRequest, PredictResponse
from rtbserve.client import AsyncGrpcClient, ConnectionFailed, GrpcClient
from rtbserve.client.grpc import encode_request
from rtbserve.config import BatchingSettings, FailOpenSettings
from rtbserve.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RtbError,
)
from rtbserve.transports.grpc.predictor_service import Undecodable, parse_predict_request
from rtbserve.transports.grpc.wire import packed_floats, varint

BIG_ROWS = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return demo_model(str(tmp_path_factory.mktemp("grpc-client-cache")))


@pytest.fixture(scope="module")
def gated(model: Any) -> Iterator[GatedModel]:
    g = GatedModel(model)
    yield g
    g.gate.set()


@pytest.fixture(scope="module")
def server(model: Any, gated: GatedModel) -> Iterator[GrpcServerThread]:
    srv = GrpcServerThread(
        [
            (settings("rtb-filter"), model),
            (settings("rtb-tiny-queue", batching=BatchingSettings(max_queue_rows=8)), model),
            (settings("gated-open", fail_open=FailOpenSettings(score=0.25)), gated),
        ]
    ).start()
    yield srv
    srv.stop()
    assert not srv.loop_errors, f"exceptions reached the event loop: {srv.loop_errors}"


@pytest.fixture(scope="module")
def client(server: GrpcServerThread) -> Iterator[GrpcClient]:
    with GrpcClient(server.target, timeout_s=WAIT_S) as c:
        yield c


# --------------------------------------------------------------------------- wire


@pytest.mark.parametrize("n_rows", [1, 2, 300])
def test_encode_request_equals_protobufs_encoding(n_rows: int) -> None:
    rows = demo_rows(n_rows, seed=n_rows)
    rows[0, :3] = [np.inf, -np.inf, -0.0]
    data = encode_request(rows, "m", "id-1", 2.5)
    parsed = PredictRequest.FromString(data)
    assert (parsed.model, parsed.request_id, parsed.n_features) == ("m", "id-1", N_FEATURES)
    assert parsed.deadline_ms == 3  # whole milliseconds, rounded up
    np.testing.assert_array_equal(np.array(parsed.rows, np.float32), rows.ravel())
    reference = PredictRequest(
        model="m", request_id="id-1", n_features=N_FEATURES, deadline_ms=3, rows=rows.ravel()
    )
    # the same message (the rows field comes last in ours, so compare canonical re-encodings)
    assert parsed.SerializeToString() == reference.SerializeToString()


def test_packed_floats_and_varints() -> None:
    assert packed_floats(2, np.array([], np.float32)) == b""
    assert [varint(v) for v in (0, 1, 127, 128, 300, 2**21)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x80\x01",
    ]
    scores = np.arange(6, dtype=np.int32).reshape(3, 2)  # labels and matrices flatten row-major
    head = PredictResponse(request_id="r", n_outputs=2).SerializeToString()
    parsed = PredictResponse.FromString(head + packed_floats(2, scores))
    assert list(parsed.scores) == [0, 1, 2, 3, 4, 5] and parsed.request_id == "r"


_FLOATS32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _unpacked(field_number: int, values: list[float]) -> bytes:
    return b"".join(varint(field_number << 3 | 5) + struct.pack("<f", v) for v in values)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_FLOATS32, max_size=40),
    request_id=st.text(max_size=8),
    model_name=st.text(max_size=8),
    n_features=st.integers(0, 2**32 - 1),
    split=st.integers(0, 40),
    encoding=st.sampled_from(["packed", "split", "unpacked", "mixed"]),
)
def test_the_raw_rows_view_parses_exactly_as_protobuf(
    values: list[float],
    request_id: str,
    model_name: str,
    n_features: int,
    split: int,
    encoding: str,
) -> None:
    # differential: parse_predict_request + decode_rows against upb's own PredictRequest
    head = PredictRequest(
        request_id=request_id, model=model_name, n_features=n_features
    ).SerializeToString()
    vals = np.array(values, dtype=np.float32)
    cut = min(split, len(values))
    if encoding == "packed":
        data = head + packed_floats(3, vals)
    elif encoding == "split":  # a packed field in two chunks: parsers concatenate them
        data = packed_floats(3, vals[:cut]) + head + packed_floats(3, vals[cut:])
    elif encoding == "unpacked":
        data = head + _unpacked(3, list(vals))
    else:
        data = packed_floats(3, vals[:cut]) + _unpacked(3, list(vals[cut:])) + head
    expected = PredictRequest.FromString(data)
    parsed = parse_predict_request(data)
    assert (parsed.request_id, parsed.model, parsed.n_features) == (
        expected.request_id,
        expected.model,
        expected.n_features,
    )
    got = parsed.rows
    got = np.frombuffer(got, np.float32) if isinstance(got, bytes) else np.array(got, np.float32)
    want = np.array(expected.rows, np.float32)
    assert got.tobytes() == want.tobytes()  # bit for bit: NaN payloads and -0.0 included


def test_the_raw_rows_view_reports_malformed_bytes() -> None:
    good = PredictRequest(request_id="r", rows=[1.0, 2.0]).SerializeToString()
    # truncated; a length past the end; garbage; packed floats of 5 bytes (not whole values)
    ragged = b"\x12\x01r\x1a\x05" + bytes(5)
    for bad in (good[:-3], b"\x1a\x10\x00", b"\xff\xff\xff", ragged):
        parsed = parse_predict_request(bad)
        assert isinstance(parsed, Undecodable) and parsed.n_bytes == len(bad)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "at least one row"),
        ([["a"] * N_FEATURES], "must be numbers"),
        (np.zeros((1, 2, 3)), "expected one row or an"),
    ],
)
def test_encode_request_rejects_what_is_not_a_matrix(rows: Any, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        encode_request(rows, None, "", None)


# --------------------------------------------------------------------------- sync client


def test_predict(client: GrpcClient, model: Any) -> None:
    rows = demo_rows(50, seed=1)
    np.testing.assert_array_equal(client.predict(rows), model.predict(rows))
    np.testing.assert_array_equal(client.predict(rows[0]), model.predict(rows[:1]))
    np.testing.assert_array_equal(
        client.predict(rows.tolist(), model="rtb-filter", request_id="x", deadline_ms=5000),
        model.predict(rows),
    )
    info = client.predict_with_info(rows[:2])
    assert not info.is_fail_open
    np.testing.assert_array_equal(info.scores, model.predict(rows[:2]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "nope"}, ModelNotFound, "unknown model 'nope'; loaded: gated-open, rtb-f"),
        ({"n_features": N_FEATURES + 1}, InvalidInput, f"expected {N_FEATURES} features, got 68"),
        ({"n_rows": 9, "model": "rtb-tiny-queue"}, Overloaded, "'rtb-tiny-queue' is overloaded"),
    ],
)
def test_predict_raises_the_servers_error(
    client: GrpcClient, kwargs: dict[str, Any], error: type[RtbError], match: str
) -> None:
    rows = np.zeros((kwargs.pop("n_rows", 1), kwargs.pop("n_features", N_FEATURES)))
    with pytest.raises(error, match=match) as info:
        client.predict(rows, **kwargs)
    assert type(info.value) is error
    assert info.value.status in (3, 5, 8)  # type: ignore[attr-defined]


def test_not_ready_raises_model_not_ready(model: Any) -> None:
    srv = GrpcServerThread([(settings("rtb-filter"), model)], is_ready=False).start()
    try:
        with GrpcClient(srv.target) as c, pytest.raises(ModelNotReady, match="still loading"):
            c.predict(demo_rows(1))
    finally:
        srv.stop()
    assert not srv.loop_errors


def test_unreachable_server_raises_connection_failed() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with GrpcClient(f"127.0.0.1:{port}", timeout_s=WAIT_S) as c, pytest.raises(ConnectionFailed):
        c.predict(demo_rows(1))


def test_fail_open_and_deadlines(
    client: GrpcClient, server: GrpcServerThread, gated: GatedModel
) -> None:
    gated.entered.clear()
    gated.gate.clear()
    queued = watch_submits(server, "gated-open")
    with GrpcClient(server.target) as other, ThreadPoolExecutor(1) as pool:
        stream = other.stream(model="gated-open")
        slow = stream.submit(demo_rows(BIG_ROWS))
        assert gated.entered.wait(WAIT_S)
        queued.get(timeout=WAIT_S)
        try:
            # queued behind the busy kernel: the client's own deadline fires first
            with pytest.raises(DeadlineExceeded):
                client.predict(demo_rows(1), model="gated-open", timeout_s=0.05)
            queued.get(timeout=WAIT_S)
            # a 1 ms server budget runs out in the queue: the model's default decision
            late = pool.submit(
                client.predict_with_info, demo_rows(2), model="gated-open", deadline_ms=1
            )
            let_pass(queued.get(timeout=WAIT_S))
        finally:
            gated.gate.set()
        assert slow.result(WAIT_S).shape == (BIG_ROWS,)
        info = late.result(WAIT_S)
        assert info.is_fail_open
        np.testing.assert_array_equal(info.scores, [0.25, 0.25])
        stream.close(WAIT_S)
    info = client.predict_with_info(demo_rows(1), model="gated-open", deadline_ms=5000)
    assert not info.is_fail_open


def test_stream_matches_answers_by_id(client: GrpcClient, model: Any) -> None:
    rows = demo_rows(200, seed=3)
    with client.stream() as stream:
        futures = [stream.submit(rows[i]) for i in range(len(rows))]
        named = stream.submit(rows[:3], request_id="three")
        expected = model.predict(rows)
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(WAIT_S), expected[i : i + 1])
        np.testing.assert_array_equal(named.result(WAIT_S), expected[:3])
        np.testing.assert_array_equal(stream.predict(rows[5], timeout_s=WAIT_S), expected[5:6])


def test_stream_errors_fail_only_their_message(client: GrpcClient, model: Any) -> None:
    rows = demo_rows(2, seed=4)
    with client.stream() as stream:
        lost = stream.submit(rows[0], model="nope")
        short = stream.submit(rows[:, :-1])
        good = stream.submit(rows[1])
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            lost.result(WAIT_S)
        with pytest.raises(InvalidInput, match=f"expected {N_FEATURES} features, got 66"):
            short.result(WAIT_S)
        np.testing.assert_array_equal(good.result(WAIT_S), model.predict(rows[1:]))
        pending = stream.submit(rows[0], request_id="dup")
        with pytest.raises(ValueError, match="already waiting"):
            stream.submit(rows[0], request_id="dup")
        pending.result(WAIT_S)
    with pytest.raises(ConnectionFailed, match="closed"):
        stream.submit(rows[0])


def test_stream_close_waits_for_outstanding_answers(
    server: GrpcServerThread, gated: GatedModel
) -> None:
    gated.entered.clear()
    gated.gate.clear()
    with GrpcClient(server.target) as c:
        stream = c.stream(model="gated-open")
        slow = stream.submit(demo_rows(BIG_ROWS))
        assert gated.entered.wait(WAIT_S)
        gated.gate.set()
        stream.close(WAIT_S)
        assert slow.done() and slow.result().shape == (BIG_ROWS,)


def test_stream_cancel_fails_the_unanswered(server: GrpcServerThread, gated: GatedModel) -> None:
    gated.entered.clear()
    gated.gate.clear()
    with GrpcClient(server.target) as c:
        stream = c.stream(model="gated-open")
        slow = stream.submit(demo_rows(BIG_ROWS))
        assert gated.entered.wait(WAIT_S)
        stream.cancel()
        with pytest.raises(RtbError, match="[Cc]ancel"):
            slow.result(WAIT_S)
        gated.gate.set()
        stream.close(WAIT_S)


def test_server_drain_fails_unanswered_stream_requests(model: Any) -> None:
    srv = GrpcServerThread([(settings("rtb-filter"), model)]).start()
    with GrpcClient(srv.target) as c:
        stream = c.stream()
        assert stream.predict(demo_rows(1), timeout_s=WAIT_S).shape == (1,)
        srv.stop(grace_s=WAIT_S / 2)
        with pytest.raises(ConnectionFailed):
            stream.submit(demo_rows(1)).result(WAIT_S)
        stream.close(WAIT_S)
    assert not srv.loop_errors


# --------------------------------------------------------------------------- asyncio client


def run_async(fn: Callable[[], Any]) -> Any:
    """Run a coroutine function on a fresh uvloop loop in this thread; fail on loop errors."""
    errors: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        return await asyncio.wait_for(fn(), WAIT_S)

    result = uvloop.run(main())
    assert not errors, f"exceptions reached the event loop: {errors}"
    return result


def test_async_predict_and_errors(server: GrpcServerThread, model: Any) -> None:
    rows = demo_rows(30, seed=6)

    async def main() -> None:
        async with AsyncGrpcClient(server.target, timeout_s=WAIT_S) as c:
            np.testing.assert_array_equal(await c.predict(rows), model.predict(rows))
            results = await asyncio.gather(*(c.predict(rows[i]) for i in range(len(rows))))
            np.testing.assert_array_equal(np.concatenate(results), model.predict(rows))
            info = await c.predict_with_info(rows[:1], deadline_ms=5000)
            assert not info.is_fail_open
            with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
                await c.predict(rows, model="nope")
            with pytest.raises(InvalidInput, match="expected 67 features, got 3"):
                await c.predict(rows[:, :3])

    run_async(main)


def test_async_stream(server: GrpcServerThread, model: Any) -> None:
    rows = demo_rows(150, seed=8)
    expected = model.predict(rows)

    async def main() -> None:
        async with AsyncGrpcClient(server.target) as c:
            async with c.stream() as stream:
                futures = [await stream.submit(rows[i]) for i in range(len(rows))]
                got = await asyncio.gather(*futures)
                np.testing.assert_array_equal(np.concatenate(got), expected)
                answers = await asyncio.gather(
                    *(stream.predict(rows[i], request_id=f"p{i}") for i in range(10))
                )
                np.testing.assert_array_equal(np.concatenate(answers), expected[:10])
                with pytest.raises(ModelNotFound):
                    await (await stream.submit(rows[0], model="nope"))
            with pytest.raises(ConnectionFailed, match="closed"):
                await stream.submit(rows[0])

    run_async(main)
