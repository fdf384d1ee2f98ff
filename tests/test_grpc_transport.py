"""The gRPC transport over real sockets: grpcio stubs, raw byte calls and tritonclient.

Servers run on 127.0.0.1 port 0 on their own uvloop loop in a background thread
(``grpc_testutil.GrpcServerThread``); teardown fails the test if anything reached that loop's
exception handler. Scores must equal the model's own ``predict`` exactly (float32). Requests that
must queue behind a busy kernel use ``GatedModel``, whose big batches wait for the test to open a
gate, so deadline misses and out-of-order answers are deterministic.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
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
from tritonclient.grpc import service_pb2 as triton_service_pb2
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

import rtbserve
from rtbserve._proto import PRIVATE_POOL, grpc_service_pb2, grpc_service_pb2_grpc
from rtbserve._proto.predictor_pb2 import PredictRequest, PredictResponse
from rtbserve._proto.predictor_pb2_grpc import PredictorStub
from rtbserve.config import BatchingSettings, FailOpenSettings
from rtbserve.metrics import WorkerMetrics, render

KSERVE_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
)
BIG_ROWS = 600  # > the batcher's inline limit: runs in the executor, where GatedModel waits


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return demo_model(str(tmp_path_factory.mktemp("grpc-cache")))


@pytest.fixture
def serve() -> Iterator[Callable[..., GrpcServerThread]]:
    """``serve(models, **kw)`` starts a server; each is stopped and checked at teardown."""
    started: list[GrpcServerThread] = []

    def start(models: list[tuple[Any, Any]], **kw: Any) -> GrpcServerThread:
        server = GrpcServerThread(models, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        assert not server.loop_errors, f"exceptions reached the event loop: {server.loop_errors}"


@pytest.fixture(scope="module")
def server(model: Any) -> Iterator[GrpcServerThread]:
    """One server for the read-only tests: rtb-filter (default), a label-output copy and one
    with a tiny queue."""
    srv = GrpcServerThread(
        [
            (settings("rtb-filter"), model),
            (settings("rtb-label", output="label"), model),
            (settings("rtb-tiny-queue", batching=BatchingSettings(max_queue_rows=8)), model),
        ]
    ).start()
    yield srv
    srv.stop()
    assert not srv.loop_errors, f"exceptions reached the event loop: {srv.loop_errors}"


@pytest.fixture(scope="module")
def channel(server: GrpcServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> PredictorStub:
    return PredictorStub(channel)


@pytest.fixture(scope="module")
def kserve(channel: grpc.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def triton_client(server: GrpcServerThread) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.target)
    yield client
    client.close()


def request(rows: np.ndarray, **kw: Any) -> PredictRequest:
    return PredictRequest(rows=np.ascontiguousarray(rows, dtype=np.float32).ravel(), **kw)


def scores_of(response: PredictResponse) -> np.ndarray:
    return np.array(response.scores, dtype=np.float32)


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def error_code_of(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("rtb-error-code")


# --------------------------------------------------------------------------- generated code


def _message_protos(
    protos: Any, prefix: str, out: dict[str, descriptor_pb2.DescriptorProto]
) -> dict[str, descriptor_pb2.DescriptorProto]:
    for message in protos:
        name = f"{prefix}.{message.name}"
        out[name] = message
        _message_protos(message.nested_type, name, out)
    return out


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[int, tuple[Any, ...]]:
    oneofs = [o.name for o in message.oneof_decl]
    return {
        f.number: (
            f.name,
            f.type,
            f.label,
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
        )
        for f in message.field
    }


def test_kserve_proto_is_wire_compatible_with_tritonclient() -> None:
    ours, theirs = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    grpc_service_pb2.DESCRIPTOR.CopyToProto(ours)
    triton_service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    our_messages = _message_protos(ours.message_type, ".inference", {})
    their_messages = _message_protos(theirs.message_type, ".inference", {})
    assert len(our_messages) >= 20
    for name, message in our_messages.items():
        assert name in their_messages, f"{name} is not in tritonclient's service"
        assert _fields(message) == _fields(their_messages[name]), name
        assert message.options.map_entry == their_messages[name].options.map_entry, name

    (service,) = ours.service
    their_service = {s.name: s for s in theirs.service}[service.name]
    assert service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    assert [m.name for m in service.method] == list(KSERVE_METHODS)
    for method in service.method:
        other = their_methods[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert not method.client_streaming and not other.client_streaming
        assert not method.server_streaming and not other.server_streaming


def test_kserve_messages_live_in_the_private_pool() -> None:
    # tritonclient's copy of package `inference` is in the default pool of this very process
    assert grpc_service_pb2.DESCRIPTOR.pool is PRIVATE_POOL
    req = grpc_service_pb2.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"ab"])
    req.inputs.add(name="input-0", datatype="FP32", shape=[1, 2])
    req.parameters["timeout"].int64_param = 5
    theirs = triton_service_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert theirs.inputs[0].shape == [1, 2] and theirs.parameters["timeout"].int64_param == 5
    assert grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString()) == req


# --------------------------------------------------------------------------- Predict (unary)


@pytest.mark.parametrize("n_rows", [1, 100])
def test_predict_scores_match_the_model(stub: PredictorStub, model: Any, n_rows: int) -> None:
    rows = demo_rows(n_rows, seed=n_rows)
    response = stub.Predict(request(rows, request_id=f"bid-{n_rows}"), timeout=WAIT_S)
    assert response.request_id == f"bid-{n_rows}"
    assert response.model == "rtb-filter"
    assert response.n_outputs == 1
    assert not response.fail_open
    assert not response.HasField("error")
    np.testing.assert_array_equal(scores_of(response), model.predict(rows))


def test_predict_names_the_model_and_checks_the_feature_count(
    stub: PredictorStub, model: Any
) -> None:
    rows = demo_rows(3, seed=5)
    response = stub.Predict(request(rows, model="rtb-label", n_features=N_FEATURES))
    assert response.model == "rtb-label"
    np.testing.assert_array_equal(scores_of(response), model.predict(rows, output="label"))


def test_concurrent_unary_calls_each_get_their_own_scores(stub: PredictorStub, model: Any) -> None:
    all_rows = demo_rows(64, seed=9)
    futures = [
        stub.Predict.future(request(all_rows[i : i + 1], request_id=str(i)), timeout=WAIT_S)
        for i in range(len(all_rows))
    ]
    expected = model.predict(all_rows)
    for i, future in enumerate(futures):
        response = future.result()
        assert response.request_id == str(i)
        np.testing.assert_array_equal(scores_of(response), expected[i : i + 1])


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "model_not_found", "unknown model 'nope'"),
        (
            {"n_features": N_FEATURES - 1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_input",
            f"expected {N_FEATURES} features, got {N_FEATURES - 1}",
        ),
        (
            {"n_values": N_FEATURES + 1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_input",
            f"expected a multiple of {N_FEATURES} values",
        ),
        (
            {"n_values": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_input",
            f"expected a multiple of {N_FEATURES} values",
        ),
        (
            {"model": "rtb-tiny-queue", "n_values": 9 * N_FEATURES},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "overloaded",
            "'rtb-tiny-queue' is overloaded",
        ),
    ],
)
def test_predict_errors_map_to_statuses(
    stub: PredictorStub, kwargs: dict[str, Any], status: grpc.StatusCode, code: str, message: str
) -> None:
    n_values = kwargs.pop("n_values", N_FEATURES)
    values = np.zeros(n_values, dtype=np.float32)
    err = rpc_error(lambda: stub.Predict(PredictRequest(rows=values, **kwargs), timeout=WAIT_S))
    assert err.code() == status
    assert message in err.details()
    assert error_code_of(err) == code
    assert stub.Predict(request(demo_rows(1)), timeout=WAIT_S).scores  # still serving


def test_unknown_model_lists_the_loaded_ones(stub: PredictorStub) -> None:
    err = rpc_error(lambda: stub.Predict(request(demo_rows(1), model="nope")))
    assert err.details() == "unknown model 'nope'; loaded: rtb-filter, rtb-label, rtb-tiny-queue"


@pytest.mark.parametrize(
    "payload",
    [
        request(demo_rows(2), request_id="x").SerializeToString()[:-7],  # truncated
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
        b"\x0a\x02\xc3\x28",  # field 1 (model) holding invalid UTF-8
        bytes(range(256)) * 4,
    ],
    ids=["truncated", "endless-varint", "bad-utf8", "noise"],
)
def test_garbage_bytes_get_invalid_argument(
    channel: grpc.Channel, stub: PredictorStub, payload: bytes
) -> None:
    raw = channel.unary_unary("/rtbserve.v1.Predictor/Predict")  # bytes in, bytes out
    err = rpc_error(lambda: raw(payload, timeout=WAIT_S))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid rtbserve.v1.PredictRequest" in err.details()
    assert stub.Predict(request(demo_rows(1)), timeout=WAIT_S).scores  # still serving


class BrokenModel:
    """Raises an unexpected (non-rtbserve) error from every kernel call."""

    def __init__(self, model: Any) -> None:
        self.n_features, self.n_outputs, self.backend = model.n_features, 1, "broken"

    def predict(self, rows: np.ndarray, output: str = "probability") -> np.ndarray:
        raise RuntimeError("secret detail")


def test_unexpected_errors_are_internal_with_one_logged_traceback(
    serve: Callable[..., GrpcServerThread], model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve([(settings("broken"), BrokenModel(model))])
    with grpc.insecure_channel(srv.target) as ch:
        stub = PredictorStub(ch)
        err = rpc_error(lambda: stub.Predict(request(demo_rows(1)), timeout=WAIT_S))
        assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "internal error")
        (answer,) = stub.PredictStream(iter([request(demo_rows(1), request_id="s")]))
        assert answer.request_id == "s"
        assert (answer.error.code, answer.error.message) == (13, "internal error")
    logged = [r for r in caplog.records if r.name == "rtbserve.grpc" and r.exc_info]
    assert len(logged) == 2  # one per failed call or message, with the traceback
    assert all("secret detail" in str(r.exc_info[1]) for r in logged)


# --------------------------------------------------------------------------- readiness, health


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S).status


def test_health_reports_serving_for_server_services_and_models(channel: grpc.Channel) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "rtbserve.v1.Predictor", "inference.GRPCInferenceService", "rtb-label"):
        assert _health(channel, service) == serving, service
    err = rpc_error(lambda: _health(channel, "no-such-service"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_not_ready_is_unavailable_until_marked_ready(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    srv = serve([(settings("rtb-filter"), model)], is_ready=False)
    with grpc.insecure_channel(srv.target) as ch:
        stub, kserve = PredictorStub(ch), grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        err = rpc_error(lambda: stub.Predict(request(demo_rows(1)), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == "models are still loading"
        assert error_code_of(err) == "model_not_ready"
        assert _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(ch, "rtb-filter") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert kserve.ServerLive(grpc_service_pb2.ServerLiveRequest()).live
        assert not kserve.ServerReady(grpc_service_pb2.ServerReadyRequest()).ready
        assert not kserve.ModelReady(grpc_service_pb2.ModelReadyRequest(name="rtb-filter")).ready

        srv.call(lambda: srv.dataplane.mark_ready())
        srv.call(lambda: srv.server.set_serving(True))
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert _health(ch, "rtb-filter") == health_pb2.HealthCheckResponse.SERVING
        assert kserve.ServerReady(grpc_service_pb2.ServerReadyRequest()).ready
        assert stub.Predict(request(demo_rows(1)), timeout=WAIT_S).scores
        # as the worker calls it: not awaited, applied before the next call is served
        srv.call(lambda: [srv.server.set_serving(False)])
        assert _health(ch, "rtb-filter") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {
        "rtbserve.v1.Predictor",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    infer = db.FindFileContainingSymbol("inference.GRPCInferenceService")
    assert infer.name == "kserve/grpc_service.proto"
    predict = db.FindFileContainingSymbol("rtbserve.v1.PredictRequest")
    assert predict.name == "rtbserve/v1/predictor.proto"


def test_stop_turns_health_not_serving_and_drains(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    srv = serve([(settings("rtb-filter"), model)])
    with grpc.insecure_channel(srv.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # the watch never ends by itself: stop cancels it after the grace period
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 0.2})
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(WAIT_S)
        assert not stopper.is_alive()


def test_workers_share_the_port_and_a_bind_failure_raises(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    first = serve([(settings("rtb-filter"), model)])
    port = first.server.port
    second = serve([(settings("rtb-filter"), model)], port=port)  # SO_REUSEPORT
    assert second.server.port == port
    with grpc.insecure_channel(first.target) as ch:
        assert PredictorStub(ch).Predict(request(demo_rows(1)), timeout=WAIT_S).scores
    with pytest.raises(OSError, match=f"cannot bind gRPC to 127.0.0.1:{port}"):
        serve([(settings("rtb-filter"), model)], port=port, options=[("grpc.so_reuseport", 0)])


# --------------------------------------------------------------------------- deadlines


@pytest.fixture
def gated_server(serve: Callable[..., GrpcServerThread], model: Any) -> Any:
    """A server with 'gated' (no fail-open) and 'gated-open' (fail-open score 1.0) models."""
    gated, gated_open = GatedModel(model), GatedModel(model)
    srv = serve(
        [
            (settings("rtb-filter"), model),
            (settings("gated"), gated),
            (settings("gated-open", fail_open=FailOpenSettings(score=1.0)), gated_open),
        ]
    )
    yield srv, gated, gated_open
    gated.gate.set()
    gated_open.gate.set()


def test_deadline_missed_while_queued(gated_server: Any, model: Any) -> None:
    srv, gated, gated_open = gated_server
    with grpc.insecure_channel(srv.target) as ch:
        stub, kserve = PredictorStub(ch), grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        plain, fail_open = watch_submits(srv, "gated"), watch_submits(srv, "gated-open")
        big = [
            stub.Predict.future(request(demo_rows(BIG_ROWS), model=name), timeout=WAIT_S)
            for name in ("gated", "gated-open")
        ]
        assert gated.entered.wait(WAIT_S) and gated_open.entered.wait(WAIT_S)
        plain.get(timeout=WAIT_S), fail_open.get(timeout=WAIT_S)  # the big ones

        # queued behind the busy kernels with a 1 ms budget
        rows = demo_rows(2, seed=3)
        late = stub.Predict.future(request(rows, model="gated", deadline_ms=1), timeout=WAIT_S)
        late_open = stub.Predict.future(
            request(rows, model="gated-open", deadline_ms=1, request_id="open"), timeout=WAIT_S
        )
        infer = grpc_service_pb2.ModelInferRequest(
            model_name="gated-open", id="oip", raw_input_contents=[rows.tobytes()]
        )
        infer.inputs.add(name="input-0", datatype="FP32", shape=[2, N_FEATURES])
        infer.parameters["timeout"].int64_param = 1000  # microseconds
        late_infer = kserve.ModelInfer.future(infer, timeout=WAIT_S)
        deadlines = [plain.get(timeout=WAIT_S)] + [fail_open.get(timeout=WAIT_S) for _ in "ab"]
        let_pass(max(deadlines))
        gated.gate.set()
        gated_open.gate.set()

        for future in big:
            assert len(future.result().scores) == BIG_ROWS
        err = rpc_error(late.result)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_code_of(err) == "deadline_exceeded"
        response = late_open.result()
        assert response.fail_open and response.request_id == "open"
        np.testing.assert_array_equal(scores_of(response), [1.0, 1.0])
        answer = late_infer.result()
        assert answer.id == "oip" and answer.parameters["fail_open"].bool_param
        np.testing.assert_array_equal(
            np.frombuffer(answer.raw_output_contents[0], np.float32), [1.0, 1.0]
        )
        # the same model scores normally when nothing is in the way
        response = stub.Predict(request(rows, model="gated-open", deadline_ms=int(WAIT_S * 1000)))
        assert not response.fail_open
        np.testing.assert_array_equal(scores_of(response), model.predict(rows))


def test_grpc_deadline_becomes_the_batcher_deadline(gated_server: Any) -> None:
    srv, gated, _ = gated_server
    with grpc.insecure_channel(srv.target) as ch:
        stub = PredictorStub(ch)
        seen = watch_submits(srv, "gated")
        big = stub.Predict.future(request(demo_rows(BIG_ROWS), model="gated"), timeout=WAIT_S)
        assert gated.entered.wait(WAIT_S)
        seen.get(timeout=WAIT_S)  # the big one
        timeout_s = 0.25
        sent = time.monotonic()
        late = stub.Predict.future(request(demo_rows(1), model="gated"), timeout=timeout_s)
        deadline = seen.get(timeout=WAIT_S)
        # grpc converts the deadline between clocks: allow it a millisecond of slack
        assert sent < deadline <= time.monotonic() + timeout_s + 1e-3
        err = rpc_error(late.result)  # the client's own deadline fires while the kernel is busy
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.gate.set()
        assert len(big.result().scores) == BIG_ROWS


# --------------------------------------------------------------------------- PredictStream


class Requests:
    """A request iterator for a stream: yields what is ``put``, ends on ``close``."""

    _END = object()

    def __init__(self, items: list[Any] = ()) -> None:  # type: ignore[assignment]
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for item in items:
            self.put(item)

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get()) is not self._END:
            yield item


def test_stream_answers_out_of_order_matched_by_id(gated_server: Any, model: Any) -> None:
    srv, gated, _ = gated_server
    rows = demo_rows(300, seed=11)
    requests = Requests([request(demo_rows(BIG_ROWS), model="gated", request_id="slow")])
    for i in range(len(rows)):
        requests.put(request(rows[i], request_id=f"r{i}"))
    requests.close()
    with grpc.insecure_channel(srv.target) as ch:
        answers = PredictorStub(ch).PredictStream(iter(requests), timeout=WAIT_S)
        got = {}
        for _ in range(len(rows)):  # every small one overtakes the slow one
            response = next(answers)
            got[response.request_id] = scores_of(response)
        assert gated.entered.is_set() and "slow" not in got
        gated.gate.set()
        slow = next(answers)
        assert slow.request_id == "slow" and len(slow.scores) == BIG_ROWS
        assert list(answers) == []  # half-closed and all answered: the stream ends OK
        assert answers.code() == grpc.StatusCode.OK
    expected = model.predict(rows)
    assert sorted(got) == sorted(f"r{i}" for i in range(len(rows)))
    for i in range(len(rows)):
        np.testing.assert_array_equal(got[f"r{i}"], expected[i : i + 1])


def test_stream_answers_bad_messages_with_errors_and_goes_on(
    channel: grpc.Channel, model: Any
) -> None:
    rows = demo_rows(3, seed=4)
    sent = [
        request(rows[0], request_id="good-1"),
        request(rows[1][:-1], request_id="short", n_features=N_FEATURES - 1),
        request(rows[1], request_id="lost", model="nope"),
        request(rows[1][:-2], request_id="ragged"),
        request(rows[1], request_id="tiny-queue", model="rtb-tiny-queue"),
        request(rows[2], request_id="good-2", model="rtb-label"),
    ]
    payloads = [m.SerializeToString() for m in sent]
    payloads.insert(3, payloads[0][:-5])  # truncated: cannot even say its request_id
    raw = channel.stream_stream(
        "/rtbserve.v1.Predictor/PredictStream", response_deserializer=PredictResponse.FromString
    )
    answers = list(raw(iter(payloads), timeout=WAIT_S))
    assert len(answers) == len(payloads)
    by_id = {a.request_id: a for a in answers}
    assert by_id["short"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["short"].error.message == f"expected {N_FEATURES} features, got {N_FEATURES - 1}"
    assert by_id["lost"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_id["lost"].error.message.startswith("unknown model 'nope'; loaded: ")
    assert by_id["ragged"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid rtbserve.v1.PredictRequest" in by_id[""].error.message
    np.testing.assert_array_equal(scores_of(by_id["good-1"]), model.predict(rows[:1]))
    np.testing.assert_array_equal(scores_of(by_id["tiny-queue"]), model.predict(rows[1:2]))
    assert by_id["good-2"].model == "rtb-label"
    np.testing.assert_array_equal(
        scores_of(by_id["good-2"]), model.predict(rows[2:], output="label")
    )
    for good in ("good-1", "tiny-queue", "good-2"):
        assert not by_id[good].HasField("error")


def test_stream_half_close_waits_for_outstanding_answers(gated_server: Any) -> None:
    srv, gated, _ = gated_server
    requests = Requests([request(demo_rows(BIG_ROWS), model="gated", request_id="slow")])
    requests.close()  # half-close at once
    with grpc.insecure_channel(srv.target) as ch:
        answers = PredictorStub(ch).PredictStream(iter(requests), timeout=WAIT_S)
        assert gated.entered.wait(WAIT_S)
        gated.gate.set()
        assert [a.request_id for a in answers] == ["slow"]
        assert answers.code() == grpc.StatusCode.OK


def test_stream_client_cancel_drops_queued_work(gated_server: Any, model: Any) -> None:
    srv, gated, _ = gated_server
    requests = Requests([request(demo_rows(BIG_ROWS), model="gated", request_id="slow")])
    queued = watch_submits(srv, "gated")
    with grpc.insecure_channel(srv.target) as ch:
        stub = PredictorStub(ch)
        answers = stub.PredictStream(iter(requests), timeout=WAIT_S)
        assert gated.entered.wait(WAIT_S)
        for i in range(5):  # these wait behind the busy kernel
            requests.put(request(demo_rows(1, seed=i), model="gated", request_id=str(i)))
        for _ in range(6):
            queued.get(timeout=WAIT_S)
        assert srv.call(lambda: srv.server.open_streams) == 1
        answers.cancel()
        _wait_until(lambda: srv.call(lambda: srv.server.open_streams) == 0)
        gated.gate.set()
        # the next call's batch is formed after the cancelled rows left the queue
        rows = demo_rows(1, seed=99)
        response = stub.Predict(request(rows, model="gated"), timeout=WAIT_S)
        np.testing.assert_array_equal(scores_of(response), model.predict(rows))
        stats = srv.call(lambda: srv.dataplane.get("gated").batcher.stats)
        assert stats.rows == BIG_ROWS + 1  # the 5 cancelled rows were never scored
    requests.close()


def test_stream_backpressure_with_a_small_in_flight_limit(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    srv = serve([(settings("rtb-filter"), model)], max_stream_in_flight=2)
    rows = demo_rows(200, seed=21)
    requests = Requests([request(rows[i], request_id=str(i)) for i in range(len(rows))])
    requests.close()
    with grpc.insecure_channel(srv.target) as ch:
        answers = {a.request_id: a for a in PredictorStub(ch).PredictStream(iter(requests))}
    expected = model.predict(rows)
    assert len(answers) == len(rows)
    for i in range(len(rows)):
        np.testing.assert_array_equal(scores_of(answers[str(i)]), expected[i : i + 1])


def test_stop_ends_open_streams_with_unavailable(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    srv = serve([(settings("rtb-filter"), model)])
    requests = Requests([request(demo_rows(1), request_id="first")])
    with grpc.insecure_channel(srv.target) as ch:
        answers = PredictorStub(ch).PredictStream(iter(requests), timeout=WAIT_S)
        assert next(answers).request_id == "first"
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": WAIT_S / 2})
        stopper.start()
        with pytest.raises(grpc.RpcError) as info:
            next(answers)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "server is shutting down" in info.value.details()
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
    requests.close()


def _wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until true (bounded by WAIT_S): for server-side cleanup that has no
    event to wait on."""
    end = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


# --------------------------------------------------------------------------- metrics


def test_calls_and_stream_messages_are_counted(tmp_path: Path, model: Any) -> None:
    metrics = WorkerMetrics(tmp_path, 0)
    srv = GrpcServerThread([(settings("rtb-filter"), model)], metrics=metrics).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub, kserve = PredictorStub(ch), grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
            for _ in range(2):
                stub.Predict(request(demo_rows(1)), timeout=WAIT_S)
            rpc_error(lambda: stub.Predict(request(demo_rows(1), model="nope")))
            rpc_error(lambda: stub.Predict(request(demo_rows(1), n_features=3)))
            sent = [request(demo_rows(1)), request(demo_rows(2)), request(demo_rows(1), model="x")]
            assert len(list(stub.PredictStream(iter(sent), timeout=WAIT_S))) == 3
            infer = grpc_service_pb2.ModelInferRequest(raw_input_contents=[demo_rows(1).tobytes()])
            infer.inputs.add(name="input-0", datatype="FP32", shape=[1, N_FEATURES])
            kserve.ModelInfer(infer, timeout=WAIT_S)
    finally:
        srv.stop()
    text = render(tmp_path).decode()
    metrics.close()
    counts = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rtbserve_requests_total{")
    }
    expected = {
        ("rtb-filter", "grpc_predict", "OK"): 2,
        ("", "grpc_predict", "NOT_FOUND"): 1,
        ("rtb-filter", "grpc_predict", "INVALID_ARGUMENT"): 1,
        ("rtb-filter", "grpc_predict_stream", "OK"): 2,
        ("", "grpc_predict_stream", "NOT_FOUND"): 1,
        ("rtb-filter", "grpc_model_infer", "OK"): 1,
    }
    for (name, route, status), n in expected.items():
        key = f'rtbserve_requests_total{{model="{name}",route="{route}",status="{status}"}}'
        assert counts.get(key) == n, (key, text)


# --------------------------------------------------------------------------- Open Inference


def test_triton_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("rtb-filter")
    assert triton_client.is_model_ready("rtb-filter", model_version="1")
    assert not triton_client.is_model_ready("rtb-filter", model_version="2")
    assert not triton_client.is_model_ready("nope")
    meta = triton_client.get_server_metadata(as_json=True)
    assert meta["name"] == "rtbserve" and meta["version"] == rtbserve.__version__
    assert meta.get("extensions", []) == []
    model_meta = triton_client.get_model_metadata("rtb-filter", as_json=True)
    assert model_meta["name"] == "rtb-filter" and model_meta["versions"] == ["1"]
    assert model_meta["inputs"] == [
        {"name": "input-0", "datatype": "FP32", "shape": ["-1", str(N_FEATURES)]}
    ]
    assert model_meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": ["-1"]}]
    label_meta = triton_client.get_model_metadata("rtb-label", as_json=True)
    assert label_meta["outputs"][0]["datatype"] == "INT32"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton_client.get_model_metadata("nope")


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "INT32", "UINT8", "BOOL"])
def test_triton_infer_matches_the_model(
    triton_client: triton.InferenceServerClient, model: Any, datatype: str
) -> None:
    rows = demo_rows(20, seed=7)
    data = np.nan_to_num(rows * 10).astype(triton_to_np_dtype(datatype))
    infer_input = triton.InferInput("input-0", list(data.shape), datatype)
    infer_input.set_data_from_numpy(data)
    result = triton_client.infer(
        "rtb-filter",
        [infer_input],
        outputs=[triton.InferRequestedOutput("output-0")],
        request_id="req-9",
    )
    response = result.get_response()
    assert response.id == "req-9" and response.model_name == "rtb-filter"
    assert response.model_version == "1"
    scores = result.as_numpy("output-0")
    assert scores.dtype == np.float32 and scores.shape == (20,)
    np.testing.assert_array_equal(scores, model.predict(data.astype(np.float32)))


def test_triton_infer_one_row_and_labels(
    triton_client: triton.InferenceServerClient, model: Any
) -> None:
    row = demo_rows(1, seed=8)[0]
    one = triton.InferInput("input-0", [N_FEATURES], "FP32")
    one.set_data_from_numpy(row)
    scores = triton_client.infer("rtb-filter", [one]).as_numpy("output-0")
    np.testing.assert_array_equal(scores, model.predict(row[None]))
    labels = triton_client.infer("rtb-label", [one]).as_numpy("output-0")
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, model.predict(row[None], output="label"))


@pytest.mark.parametrize(
    ("shape", "datatype", "outputs", "match"),
    [
        ([2, N_FEATURES], "BYTES", None, "unsupported datatype 'BYTES'"),
        ([2, N_FEATURES - 1], "FP32", None, f"expected {N_FEATURES} features, got 66"),
        ([1, 2, N_FEATURES], "FP32", None, "shape must be"),
        ([2, N_FEATURES], "FP32", ["scores"], "unknown output 'scores'; this model has: output-0"),
    ],
)
def test_triton_infer_errors(
    triton_client: triton.InferenceServerClient,
    shape: list[int],
    datatype: str,
    outputs: list[str] | None,
    match: str,
) -> None:
    infer_input = triton.InferInput("input-0", shape, datatype)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        infer_input.set_data_from_numpy(np.array([b"1.0"] * n, dtype=np.object_).reshape(shape))
    else:
        infer_input.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
    requested = None if outputs is None else [triton.InferRequestedOutput(o) for o in outputs]
    with pytest.raises(InferenceServerException, match=match) as info:
        triton_client.infer("rtb-filter", [infer_input], outputs=requested)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_triton_unknown_model_is_not_found(triton_client: triton.InferenceServerClient) -> None:
    infer_input = triton.InferInput("input-0", [1, N_FEATURES], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, N_FEATURES), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
        triton_client.infer("nope", [infer_input])
    assert info.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("datatype", "field", "dtype"),
    [
        ("FP32", "fp32_contents", np.float32),
        ("FP64", "fp64_contents", np.float64),
        ("INT64", "int64_contents", np.int64),
        ("INT16", "int_contents", np.int16),
        ("UINT32", "uint_contents", np.uint32),
        ("BOOL", "bool_contents", np.bool_),
    ],
)
def test_model_infer_typed_contents(
    kserve: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    model: Any,
    datatype: str,
    field: str,
    dtype: Any,
) -> None:
    data = np.abs(np.nan_to_num(demo_rows(3, seed=2) * 10)).astype(dtype)
    req = grpc_service_pb2.ModelInferRequest(model_name="rtb-filter")
    tensor = req.inputs.add(name="features", datatype=datatype, shape=[3, N_FEATURES])
    getattr(tensor.contents, field).extend(data.ravel().tolist())
    response = kserve.ModelInfer(req, timeout=WAIT_S)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("output-0", "FP32", [3])
    scores = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(scores, model.predict(data.astype(np.float32)))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.inputs[0].contents.fp32_contents.pop(), "needs 134 values"),
        (lambda r: r.raw_input_contents.append(b"\0" * 7), "needs 536 bytes of FP32"),
        (lambda r: r.inputs.add(name="more", datatype="FP32", shape=[1]), "exactly 1 input"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "FP16 data must be sent raw"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 0), "expected at least 1 row"),
        (lambda r: setattr(r, "model_version", "3"), "unknown version '3' of model 'rtb-filter'"),
        (lambda r: setattr(r.parameters["timeout"], "string_param", "x"), "must be a number"),
    ],
)
def test_model_infer_rejects_malformed_requests(
    kserve: grpc_service_pb2_grpc.GRPCInferenceServiceStub, mutate: Any, match: str
) -> None:
    req = grpc_service_pb2.ModelInferRequest(model_name="rtb-filter")
    tensor = req.inputs.add(name="input-0", datatype="FP32", shape=[2, N_FEATURES])
    tensor.contents.fp32_contents.extend([0.5] * (2 * N_FEATURES))
    mutate(req)
    err = rpc_error(lambda: kserve.ModelInfer(req, timeout=WAIT_S))
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert match in err.details()


class _ScoresThatCannotBeEncoded:
    """A model whose scores are not numbers: encoding them fails with a non-rtbserve error."""

    n_features = N_FEATURES
    n_outputs = 1
    backend = "broken"

    def predict(self, rows: Any, **kw: Any) -> Any:
        return np.array(["not a score"] * len(rows), dtype=object)


def test_an_unexpected_encoding_failure_answers_internal_and_the_stream_ends(
    serve: Callable[..., GrpcServerThread], model: Any
) -> None:
    srv = serve(
        [(settings("broken"), _ScoresThatCannotBeEncoded()), (settings("rtb-filter"), model)]
    )
    rows = demo_rows(2, seed=8)
    requests = [
        request(rows[0], request_id="bad", model="broken"),
        request(rows[1], request_id="good", model="rtb-filter"),
    ]
    with grpc.insecure_channel(srv.target) as ch:
        stub = PredictorStub(ch)
        answers = {a.request_id: a for a in stub.PredictStream(iter(requests), timeout=WAIT_S)}
        assert answers["bad"].error.code == grpc.StatusCode.INTERNAL.value[0]
        np.testing.assert_array_equal(scores_of(answers["good"]), model.predict(rows[1:2]))
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(requests[0], timeout=WAIT_S)
        assert info.value.code() == grpc.StatusCode.INTERNAL
