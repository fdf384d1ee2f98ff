"""``rtbserve.v1.Predictor``: feature rows in, scores out, as unary calls or on a bidi stream.

``Predict`` answers one ``PredictRequest`` per call; its time budget is the earlier of the gRPC
deadline and the message's ``deadline_ms``. ``PredictStream`` carries one message per bid request
on a long-lived stream, which saves gRPC's per-call work (call setup, metadata, status: about
two thirds of a unary call's server CPU). One stream, as a timeline (``|``: loop iterations)::

    reader task  | read m1 -> decode -> submit to the micro-batcher (a future, not a Task)
                 | read m2 -> decode fails -> error answer queued at once
                 | read m3 -> submit          (m1, m3 and other connections' rows: one batch)
    batcher      | flush: m1, m3 scored -> their futures' callbacks encode and queue the answers
    writer       | write m2's error, m1, m3   (the handler's own task: the only writer)
    client       | half-close -> reader ends -> writer finishes the outstanding answers -> OK

Answers may leave out of order; clients match them by ``request_id``. A bad message gets an
answer with ``error`` set and the stream goes on. A stream message's time budget is its
``deadline_ms`` alone (a stream's gRPC deadline bounds the whole stream); fail-open applies as
for unary calls (``DataPlane.fail_open``). At most ``max_stream_in_flight`` messages per stream
are read but not yet written; past that the reader stops reading, so a client that does not
read its answers is held back by HTTP/2 flow control instead of growing server memory. When the
client cancels, the queued rows are withdrawn from the micro-batcher. When the server drains
(``drain``), each stream stops reading, writes what it owes and ends with UNAVAILABLE, so the
client reconnects elsewhere and resends what was never answered.

Requests whose bytes are not a valid ``PredictRequest`` reach the handlers as ``Undecodable``
(see ``parse_predict_request``) so they get INVALID_ARGUMENT, not gRPC's generic failure.
Handlers answer pre-serialized bytes: the scores are appended as one packed field (see
``wire.py``) rather than converted value by value.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import partial
from time import perf_counter
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from rtbserve._proto.predictor_pb2 import Error, PredictRequest, PredictResponse
from rtbserve.dataplane import DataPlane, ServedModel
from rtbserve.errors import InvalidInput, RtbError
from rtbserve.metrics import ROUTE_GRPC_PREDICT, ROUTE_GRPC_PREDICT_STREAM
from rtbserve.transports.grpc.status import (
    ERROR_CODE_KEY,
    record_outcome,
    status_for,
    status_number,
)
from rtbserve.transports.grpc.wire import (
    RAW_VIEW_WORKS,
    packed_floats,
    parse_with_raw_view,
    raw_view_class,
)

SERVICE_NAME = "rtbserve.v1.Predictor"
MAX_STREAM_IN_FLIGHT = 1024
_F32 = np.dtype(np.float32)
_SCORES_FIELD = PredictResponse.DESCRIPTOR.fields_by_name["scores"].number
_OK = grpc.StatusCode.OK
_RAW_REQUEST = raw_view_class(PredictRequest, "rows")
_END = object()  # queued by the stream's reader when it stops
_EOF = grpc.aio.EOF
_DRAINING_MESSAGE = "server is shutting down; open a new stream (unanswered requests were not read)"


class Undecodable:
    """Stands in for a message whose bytes do not parse as a ``PredictRequest``."""

    __slots__ = ("reason", "n_bytes")
    request_id = ""
    model = ""

    def __init__(self, reason: str, n_bytes: int) -> None:
        self.reason = reason
        self.n_bytes = n_bytes


def parse_predict_request(data: bytes) -> PredictRequest | Undecodable:
    """gRPC request deserializer: the message, or ``Undecodable`` instead of raising.

    The message's ``rows`` are usually the packed values as ``bytes`` (see ``wire.py``'s raw
    view); ``decode_rows`` takes either form."""
    try:
        if RAW_VIEW_WORKS:
            return parse_with_raw_view(data, _RAW_REQUEST, PredictRequest, "rows", 4)
        return PredictRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(str(exc), len(data))


class PredictorService:
    """The ``rtbserve.v1.Predictor`` handlers over one ``DataPlane`` (on the server's loop).

    metrics: the worker's ``rtbserve.metrics.WorkerMetrics``, or None to count nothing.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        metrics: Any = None,
        max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT,
    ) -> None:
        if max_stream_in_flight < 1:
            raise ValueError(f"max_stream_in_flight must be >= 1, got {max_stream_in_flight}")
        self._dataplane = dataplane
        self.metrics = metrics
        self.max_stream_in_flight = max_stream_in_flight
        self._streams: set[_PredictStream] = set()
        self._is_draining = False

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        # responses leave the handlers already serialized (no response_serializer)
        return {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.Predict, request_deserializer=parse_predict_request
            ),
            "PredictStream": grpc.stream_stream_rpc_method_handler(
                self.PredictStream, request_deserializer=parse_predict_request
            ),
        }

    def model_for(self, request: PredictRequest | Undecodable) -> ServedModel:
        """The model the message asks for (its default when it names none)."""
        if request.__class__ is Undecodable:
            raise InvalidInput(
                f"message is not a valid {SERVICE_NAME.rsplit('.', 1)[0]}.PredictRequest "
                f"({request.n_bytes} bytes): {request.reason}"
            )
        return self._dataplane.get(request.model)

    def decode_rows(self, request: PredictRequest, served: ServedModel) -> np.ndarray:
        """The message's rows as float32 (n, F); sheds before converting them."""
        n_features = served.n_features
        if request.n_features and request.n_features != n_features:
            raise InvalidInput(f"expected {n_features} features, got {request.n_features}")
        values = request.rows
        is_raw = values.__class__ is bytes
        n_values = len(values) // 4 if is_raw else len(values)
        n_rows, extra = divmod(n_values, n_features)
        if extra or not n_rows:
            raise InvalidInput(
                f"expected a multiple of {n_features} values (rows x {n_features} features), "
                f"got {n_values}"
            )
        self._dataplane.check_capacity(served, n_rows)
        if is_raw:  # the wire bytes themselves, read-only: no copy
            return np.frombuffer(values, dtype=_F32).reshape(n_rows, n_features)
        return np.array(values, dtype=_F32).reshape(n_rows, n_features)  # allocates

    async def Predict(  # noqa: N802 - gRPC method name
        self, request: PredictRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> bytes:
        served = None
        failed_open = False
        try:
            served = self.model_for(request)
            t0 = perf_counter()
            rows = self.decode_rows(request, served)  # type: ignore[arg-type]
            decode_s = perf_counter() - t0
            deadline_ms = request.deadline_ms or None
            remaining_s = context.time_remaining()
            if remaining_s is not None and (deadline_ms is None or remaining_s * 1e3 < deadline_ms):
                deadline_ms = remaining_s * 1e3
            scores, failed_open = await self._dataplane.predict(served, rows, deadline_ms)
            t0 = perf_counter()
            response = encode_scores(request.request_id, served.name, scores, failed_open)
            if self.metrics is not None:
                handle = self.metrics.model(served.name)
                handle.observe_decode_s(decode_s)
                handle.observe_encode_s(perf_counter() - t0)
            status, code = _OK, ""
        except Exception as exc:
            status, message, code = status_for(exc)
        # metrics: the one place a Predict call's outcome (status, model) is known
        record_outcome(self.metrics, ROUTE_GRPC_PREDICT, served, status, code, failed_open)
        if status is _OK:
            return response
        await context.abort(status, message, trailing_metadata=((ERROR_CODE_KEY, code),))

    async def PredictStream(  # noqa: N802 - gRPC method name
        self,
        requests: AsyncIterator[PredictRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if self._is_draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING_MESSAGE)
        stream = _PredictStream(self, context)
        self._streams.add(stream)
        try:
            await stream.run()  # reads with context.read(), not ``requests``
        finally:
            self._streams.discard(stream)

    @property
    def open_streams(self) -> int:
        """``PredictStream`` calls in progress."""
        return len(self._streams)

    def drain(self) -> None:
        """Stop reading every open stream (and refuse new ones); each then writes what it owes
        and ends with UNAVAILABLE."""
        self._is_draining = True
        for stream in self._streams:
            stream.stop_reading()


def encode_scores(request_id: str, model: str, scores: np.ndarray, failed_open: bool) -> bytes:
    """The serialized ``PredictResponse`` for ``scores`` ((n,) or (n, K); any numeric dtype)."""
    head = PredictResponse(
        request_id=request_id,
        n_outputs=scores.shape[1] if scores.ndim == 2 else 1,
        fail_open=failed_open,
        model=model,
    )
    return head.SerializeToString() + packed_floats(_SCORES_FIELD, scores)  # allocates


class _PredictStream:
    """One ``PredictStream`` call: a reader task decodes and submits, the handler's task writes.

    Messages go to the micro-batcher with a callback (``submit_callback``), not as a Task or a
    future each: the batcher's flush calls it, and it encodes the answer and queues it for the
    writer. After the call ends (client cancel, drain) late answers are dropped.
    """

    __slots__ = (
        "_service",
        "_context",
        "_answers",
        "_waiter",
        "_is_done",
        "_in_flight",
        "_room",
        "_reader",
    )

    def __init__(self, service: PredictorService, context: grpc.aio.ServicerContext) -> None:
        self._service = service
        self._context = context
        # answers to write, in the order they became ready; the writer parks on ``_waiter``
        # (a bare future, cheaper than an asyncio.Queue) only when it runs out
        self._answers: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._is_done = False
        self._in_flight = 0  # messages read whose answer is not yet written
        self._room = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def run(self) -> None:
        answers = self._answers
        write = self._context.write
        limit = self._service.max_stream_in_flight
        room = self._room
        room.set()
        loop = asyncio.get_running_loop()
        reader = self._reader = loop.create_task(self._read())
        reader.add_done_callback(lambda _: self._put(_END))
        is_reading = True
        try:
            while is_reading or self._in_flight:
                if not answers:
                    waiter = self._waiter = loop.create_future()
                    await waiter
                    continue
                answer = answers.popleft()
                if answer is _END:
                    is_reading = False
                    continue
                await write(answer)  # the only writer on this stream
                self._in_flight -= 1
                if self._in_flight < limit and not room.is_set():
                    room.set()
        finally:
            reader.cancel()
            self._is_done = True
        if reader.cancelled():  # drained: tell the client to go elsewhere
            await self._context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING_MESSAGE)
        exc = reader.exception()
        if exc is not None:
            status, message, code = status_for(exc)
            await self._context.abort(status, message, trailing_metadata=((ERROR_CODE_KEY, code),))

    def _put(self, answer: Any) -> None:
        self._answers.append(answer)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _has_ended(self) -> bool:
        return self._is_done

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self) -> None:
        model_for = self._service.model_for
        decode_rows = self._service.decode_rows
        limit = self._service.max_stream_in_flight
        read = self._context.read  # cheaper than the request iterator's async generator
        while True:
            request = await read()
            if request is _EOF:
                return
            self._in_flight += 1
            request_id = request.request_id
            served = None
            try:
                served = model_for(request)
                rows = decode_rows(request, served)  # type: ignore[arg-type]
            except Exception as exc:
                self._fail(
                    request_id, request.model if served is None else served.name, served, exc
                )
            else:
                deadline_ms = request.deadline_ms  # type: ignore[union-attr]
                deadline = time.monotonic() + deadline_ms / 1e3 if deadline_ms else None
                on_scored = partial(self._scored, request_id, served, rows.shape[0])
                try:
                    served.batcher.submit_callback(rows, deadline, on_scored, self._has_ended)
                except Exception as exc:  # shed, or late on arrival: answered at once
                    self._scored(request_id, served, rows.shape[0], None, exc)
            if self._in_flight >= limit:
                self._room.clear()
                await self._room.wait()

    def _scored(
        self,
        request_id: str,
        served: ServedModel,
        n_rows: int,
        scores: np.ndarray | None,
        exc: BaseException | None,
    ) -> None:
        if self._is_done:
            return  # the call ended (cancelled or drained): nobody reads this answer
        failed_open = False
        if exc is not None:
            if not isinstance(exc, RtbError):
                self._fail(request_id, served.name, served, exc)
                return
            try:
                scores = self._service._dataplane.fail_open(served, n_rows, exc)
            except RtbError as error:
                self._fail(request_id, served.name, served, error)
                return
            failed_open = True
        try:
            response = encode_scores(request_id, served.name, scores, failed_open)  # type: ignore[arg-type]
        except Exception as error:  # a bug in scoring or encoding: this message fails, once
            self._fail(request_id, served.name, served, error)
            return
        self._deliver(response, served, _OK, "", failed_open)

    def _fail(
        self, request_id: str, model: str, served: ServedModel | None, exc: BaseException
    ) -> None:
        status, message, code = status_for(exc)
        error = Error(code=status_number(status), message=message)
        response = PredictResponse(request_id=request_id, model=model, error=error)
        self._deliver(response.SerializeToString(), served, status, code, False)

    def _deliver(
        self,
        response: bytes,
        served: ServedModel | None,
        status: grpc.StatusCode,
        code: str,
        failed_open: bool,
    ) -> None:
        # metrics: the one place a stream message's outcome (status, model) is known
        record_outcome(
            self._service.metrics, ROUTE_GRPC_PREDICT_STREAM, served, status, code, failed_open
        )
        self._put(response)
