"""gRPC clients for rtbserve's ``rtbserve.v1.Predictor``: ``GrpcClient`` (threads) and
``AsyncGrpcClient`` (asyncio), each over one shared HTTP/2 channel.

Unary. ``predict(rows)`` sends one ``PredictRequest`` and returns the scores: float32 of shape
(n,), or (n, K) for K outputs; ``predict_with_info`` also says whether the server answered its
fail-open default decision. ``timeout_s`` is the gRPC deadline (the server sees it too);
``deadline_ms`` is the server-side budget field (whole milliseconds, rounded up).

Streams. ``stream()`` opens one ``PredictStream`` call: ``submit(rows)`` writes one message and
returns a future for its answer, matched by ``request_id`` (answers may arrive out of order;
ids are generated when not given and must be unique among the unanswered). ``close()``
half-closes and waits for the outstanding answers. When the stream breaks or the server drains,
every unanswered future fails with the stream's error (``ConnectionFailed`` when the server
shut down: resend on a new stream).

Errors. A failed call raises the ``rtbserve.errors`` class the server raised, with the server's
message; its code travels in the trailing metadata (``rtb-error-code``). Without it (a failed
message on a stream, a proxy's answer, the client's own deadline) the gRPC status picks the
class: INVALID_ARGUMENT -> InvalidInput, NOT_FOUND -> ModelNotFound, UNAVAILABLE ->
ConnectionFailed for the channel itself, ModelNotReady for a stream message, RESOURCE_EXHAUSTED ->
Overloaded, DEADLINE_EXCEEDED -> DeadlineExceeded, anything else -> RtbError. ``exc.status`` is
the gRPC status number.

Rows are serialized as one packed field (``np.ndarray.tobytes``), not value by value: a 64-row
request costs microseconds, not hundreds of them. Import cost: grpcio, protobuf and numpy.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from rtbserve._proto.predictor_pb2 import PredictRequest, PredictResponse
from rtbserve.client._common import Prediction, rows_to_matrix
from rtbserve.client._errors import ConnectionFailed, error_for_code
from rtbserve.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RtbError,
)
from rtbserve.transports.grpc.status import ERROR_CODE_KEY
from rtbserve.transports.grpc.wire import packed_floats

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["AsyncGrpcClient", "AsyncGrpcStream", "GrpcClient", "GrpcStream", "Prediction"]

DEFAULT_TARGET = "127.0.0.1:9000"
PREDICT_METHOD = "/rtbserve.v1.Predictor/Predict"
PREDICT_STREAM_METHOD = "/rtbserve.v1.Predictor/PredictStream"
_ROWS_FIELD = PredictRequest.DESCRIPTOR.fields_by_name["rows"].number
_F32 = np.dtype(np.float32)
_CLOSE = object()  # ends a stream's request iterator (half-close)
_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
# gRPC status -> error class, when the answer names no rtbserve error code
_CLASS_BY_STATUS: dict[grpc.StatusCode, type[RtbError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAVAILABLE: ModelNotReady,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


# --------------------------------------------------------------------------- payloads


def encode_request(
    rows: ArrayLike, model: str | None, request_id: str, deadline_ms: float | None
) -> bytes:
    """The serialized ``PredictRequest`` for ``rows`` (see ``rows_to_matrix``)."""
    matrix = rows_to_matrix(rows)
    if deadline_ms is not None and not deadline_ms > 0:
        raise ValueError(f"deadline_ms must be positive, got {deadline_ms}")
    head = PredictRequest(
        model=model or "",
        request_id=request_id,
        n_features=matrix.shape[1],
        deadline_ms=0 if deadline_ms is None else math.ceil(deadline_ms),
    )
    return head.SerializeToString() + packed_floats(_ROWS_FIELD, matrix)  # allocates


def response_to_prediction(response: PredictResponse) -> Prediction:
    """The scores of a successful answer (one copy out of the parsed message)."""
    scores = np.array(response.scores, dtype=_F32)
    if response.n_outputs > 1:
        scores = scores.reshape(-1, response.n_outputs)
    return Prediction(scores, response.fail_open)


def error_from_rpc(exc: grpc.RpcError) -> RtbError:
    """The ``RtbError`` a failed call stands for (see the module docstring)."""
    status = exc.code()  # type: ignore[attr-defined]
    message = exc.details() or status.name  # type: ignore[attr-defined]
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == ERROR_CODE_KEY:
            return error_for_code(value, message, status=status.value[0])
    if status is grpc.StatusCode.UNAVAILABLE:  # no rtbserve code: the channel, not the model
        error: RtbError = ConnectionFailed(message)
        error.status = status.value[0]  # type: ignore[attr-defined]
        return error
    return _error_for_status(status, message)


def _error_for_status(status: grpc.StatusCode, message: str) -> RtbError:
    error = _CLASS_BY_STATUS.get(status, RtbError)(message)
    error.status = status.value[0]  # type: ignore[attr-defined]
    return error


def _message_error(response: PredictResponse) -> RtbError:
    status = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
    return _error_for_status(status, response.error.message)


def _stream_ended(exc: BaseException | None) -> RtbError:
    if isinstance(exc, grpc.RpcError):
        return error_from_rpc(exc)
    if isinstance(exc, asyncio.CancelledError):
        return RtbError("the stream was cancelled before this request was answered")
    return ConnectionFailed("the stream ended before this request was answered")


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    # grpc keeps the first of duplicate channel arguments: merge so that ``options`` win
    merged = {
        "grpc.max_receive_message_length": 64 * 1024 * 1024,
        "grpc.max_send_message_length": 64 * 1024 * 1024,
        **dict(options),
    }
    return list(merged.items())


# --------------------------------------------------------------------------- threads


class GrpcClient:
    """A thread-safe client over one channel (``target``: ``host:port``).

    timeout_s: default gRPC deadline per unary call (None: no deadline). options: extra grpc
    channel arguments. The channel connects lazily; ``close()`` (or ``with``) closes it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target, options=_channel_options(options))
        self._predict = self._channel.unary_unary(
            PREDICT_METHOD, response_deserializer=PredictResponse.FromString
        )
        self._predict_stream = self._channel.stream_stream(
            PREDICT_STREAM_METHOD, response_deserializer=PredictResponse.FromString
        )

    def __repr__(self) -> str:
        return f"GrpcClient({self.target!r})"

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def predict(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> np.ndarray:
        """Score ``rows`` ((n, F) or one row of F; float32; NaN = missing) with ``model`` (None:
        the server's default). Returns float32 (n,) or (n, K). Raises the server's error."""
        return self.predict_with_info(
            rows, model=model, request_id=request_id, timeout_s=timeout_s, deadline_ms=deadline_ms
        ).scores

    def predict_with_info(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> Prediction:
        """``predict``, returning ``Prediction(scores, is_fail_open)``."""
        data = encode_request(rows, model, request_id, deadline_ms)
        try:
            response = self._predict(
                data, timeout=self.timeout_s if timeout_s is None else timeout_s
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return response_to_prediction(response)

    def stream(self, *, model: str | None = None, deadline_ms: float | None = None) -> GrpcStream:
        """Open a ``PredictStream`` call; ``model``, ``deadline_ms``: defaults for its messages."""
        return GrpcStream(self._predict_stream, model, deadline_ms)

    def close(self) -> None:
        """Close the channel; calls in progress fail. Idempotent."""
        self._channel.close()


class GrpcStream:
    """One ``PredictStream`` call: ``submit`` from any thread; a reader thread resolves the
    futures as answers arrive."""

    def __init__(self, call: Any, model: str | None, deadline_ms: float | None) -> None:
        self.model = model
        self.deadline_ms = deadline_ms
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: dict[str, Future[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._is_closing = False
        self._is_ended = False
        self._call = call(iter(self._requests.get, _CLOSE))
        self._reader = threading.Thread(target=self._read, name="rtbserve-grpc-stream", daemon=True)
        self._reader.start()

    def __enter__(self) -> GrpcStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        rows: ArrayLike,
        request_id: str | None = None,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
    ) -> Future[np.ndarray]:
        """Send one message; the future resolves to its scores (float32 (n,) or (n, K)) or
        fails with the server's error. ``request_id``: generated (``"#<n>"``) when None."""
        request_id = f"#{next(self._ids)}" if request_id is None else request_id
        data = encode_request(
            rows,
            self.model if model is None else model,
            request_id,
            self.deadline_ms if deadline_ms is None else deadline_ms,
        )
        future: Future[np.ndarray] = Future()
        future.set_running_or_notify_cancel()  # sent messages cannot be taken back
        with self._lock:
            if self._is_closing or self._is_ended:
                raise ConnectionFailed("the stream is closed")
            if request_id in self._waiting:
                raise ValueError(f"request_id {request_id!r} is already waiting for an answer")
            self._waiting[request_id] = future
        self._requests.put(data)
        return future

    def predict(
        self, rows: ArrayLike, request_id: str | None = None, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """``submit`` and wait up to ``timeout_s`` for the scores."""
        return self.submit(rows, request_id).result(timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Half-close, then wait up to ``timeout_s`` for the outstanding answers; cancels the
        call if they do not all arrive in time. Idempotent."""
        with self._lock:
            if not self._is_closing:
                self._is_closing = True
                self._requests.put(_CLOSE)
        self._reader.join(timeout_s)
        if self._reader.is_alive():
            self.cancel()
            self._reader.join()

    def cancel(self) -> None:
        """Abandon the stream: unanswered futures fail with a CANCELLED ``RtbError``."""
        self._call.cancel()

    def _read(self) -> None:
        ended: BaseException | None = None
        try:
            for response in self._call:
                with self._lock:
                    future = self._waiting.pop(response.request_id, None)
                if future is None:  # e.g. the answer to a message the server could not parse
                    continue
                if response.HasField("error"):
                    future.set_exception(_message_error(response))
                else:
                    future.set_result(response_to_prediction(response).scores)
        except grpc.RpcError as exc:
            ended = exc
        finally:
            with self._lock:
                self._is_ended = True
                waiting, self._waiting = self._waiting, {}
            self._requests.put(_CLOSE)  # frees grpc's thread blocked on the request iterator
            for future in waiting.values():
                future.set_exception(_stream_ended(ended))


# --------------------------------------------------------------------------- asyncio


class AsyncGrpcClient:
    """The asyncio client (grpc.aio) over one channel, made on first use inside the loop that
    will use it. Arguments as ``GrpcClient``'s; ``await close()`` (or ``async with``)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._options = _channel_options(options)
        self._channel: grpc.aio.Channel | None = None
        self._predict: Any = None
        self._predict_stream: Any = None

    def __repr__(self) -> str:
        return f"AsyncGrpcClient({self.target!r})"

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _open(self) -> None:
        channel = self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        self._predict = channel.unary_unary(
            PREDICT_METHOD, response_deserializer=PredictResponse.FromString
        )
        self._predict_stream = channel.stream_stream(
            PREDICT_STREAM_METHOD, response_deserializer=PredictResponse.FromString
        )

    async def predict(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> np.ndarray:
        """As ``GrpcClient.predict``."""
        prediction = await self.predict_with_info(
            rows, model=model, request_id=request_id, timeout_s=timeout_s, deadline_ms=deadline_ms
        )
        return prediction.scores

    async def predict_with_info(
        self,
        rows: ArrayLike,
        *,
        model: str | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        deadline_ms: float | None = None,
    ) -> Prediction:
        """``predict``, returning ``Prediction(scores, is_fail_open)``."""
        if self._channel is None:
            self._open()
        data = encode_request(rows, model, request_id, deadline_ms)
        try:
            response = await self._predict(
                data, timeout=self.timeout_s if timeout_s is None else timeout_s
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return response_to_prediction(response)

    def stream(
        self, *, model: str | None = None, deadline_ms: float | None = None
    ) -> AsyncGrpcStream:
        """Open a ``PredictStream`` call (inside the running loop)."""
        if self._channel is None:
            self._open()
        return AsyncGrpcStream(self._predict_stream, model, deadline_ms)

    async def close(self) -> None:
        """Close the channel; calls in progress fail. Idempotent."""
        if self._channel is not None:
            await self._channel.close()


class AsyncGrpcStream:
    """One ``PredictStream`` call on the running loop; a reader task resolves the futures."""

    def __init__(self, call: Any, model: str | None, deadline_ms: float | None) -> None:
        self.model = model
        self.deadline_ms = deadline_ms
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[np.ndarray]] = {}
        self._ids = itertools.count()
        self._is_closing = False
        self._is_ended = False
        self._call = call(self._outgoing())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def __aenter__(self) -> AsyncGrpcStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(
        self,
        rows: ArrayLike,
        request_id: str | None = None,
        *,
        model: str | None = None,
        deadline_ms: float | None = None,
    ) -> asyncio.Future[np.ndarray]:
        """Queue one message; the returned future resolves to its scores or fails with the
        server's error. ``request_id``: generated (``"#<n>"``) when None."""
        request_id = f"#{next(self._ids)}" if request_id is None else request_id
        data = encode_request(
            rows,
            self.model if model is None else model,
            request_id,
            self.deadline_ms if deadline_ms is None else deadline_ms,
        )
        if self._is_closing or self._is_ended:
            raise ConnectionFailed("the stream is closed")
        if request_id in self._waiting:
            raise ValueError(f"request_id {request_id!r} is already waiting for an answer")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._requests.put_nowait(data)
        return future

    async def predict(self, rows: ArrayLike, request_id: str | None = None) -> np.ndarray:
        """``submit`` and await the scores."""
        return await (await self.submit(rows, request_id))

    async def close(self) -> None:
        """Half-close and wait for the outstanding answers. Idempotent."""
        if not self._is_closing:
            self._is_closing = True
            self._requests.put_nowait(_CLOSE)
        await asyncio.shield(self._reader)

    def cancel(self) -> None:
        """Abandon the stream: unanswered futures fail with a CANCELLED ``RtbError``."""
        self._call.cancel()

    async def _outgoing(self) -> AsyncIterator[bytes]:
        while (data := await self._requests.get()) is not _CLOSE:
            yield data

    async def _read(self) -> None:
        ended: BaseException | None = None
        try:
            async for response in self._call:
                future = self._waiting.pop(response.request_id, None)
                if future is None or future.done():  # unparsable message, or caller gave up
                    continue
                if response.HasField("error"):
                    future.set_exception(_message_error(response))
                else:
                    future.set_result(response_to_prediction(response).scores)
        except grpc.RpcError as exc:
            ended = exc
        except asyncio.CancelledError as exc:
            ended = exc
            if not self._call.cancelled():  # this task was cancelled, not the call
                raise
        finally:
            self._is_ended = True
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(_stream_ended(ended))
