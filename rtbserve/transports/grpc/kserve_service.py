"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) over gRPC.

Health (ServerLive, ServerReady, ModelReady), metadata (ServerMetadata, ModelMetadata) and
ModelInfer, which tritonclient, KServe and MLServer clients speak. A model takes one input, the
feature matrix with shape ``[rows, F]`` (``[F]`` is one row), sent either as
``raw_input_contents`` (little-endian bytes; what tritonclient sends) or as typed ``contents``;
any numeric datatype is converted to float32. It answers one output, ``output-0``: FP32 scores
(INT32 when the model's output setting is "label") of shape ``[rows]`` or ``[rows, K]``, always as
``raw_output_contents``. A fail-open answer carries the response parameter ``fail_open = true``.
The request parameter ``timeout`` (microseconds, what tritonclient's ``infer(timeout=...)`` sets)
and the gRPC deadline bound the request's time; the earlier wins.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import grpc
import numpy as np

from rtbserve._proto import grpc_service_pb2 as pb
from rtbserve.codecs.oip_codec import DATATYPES, OUTPUT_NAME
from rtbserve.dataplane import DataPlane, ServedModel
from rtbserve.errors import InvalidInput, ModelNotFound
from rtbserve.metrics import ROUTE_GRPC_MODEL_INFER
from rtbserve.transports.grpc.status import ERROR_CODE_KEY, record_outcome, status_for

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_VERSION = "1"
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_OK = grpc.StatusCode.OK
# datatype -> the InferTensorContents field carrying it (FP16 and BF16 travel raw only)
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_TIMEOUT_PARAMETER = "timeout"  # microseconds
_LIVE = pb.ServerLiveResponse(live=True)
_READY = pb.ServerReadyResponse(ready=True)
_NOT_READY = pb.ServerReadyResponse(ready=False)
_MODEL_READY = pb.ModelReadyResponse(ready=True)
_MODEL_NOT_READY = pb.ModelReadyResponse(ready=False)


class InferenceService:
    """The Open Inference Protocol handlers over one ``DataPlane`` (on the server's loop).

    metrics: the worker's ``rtbserve.metrics.WorkerMetrics``, or None to count nothing.
    """

    def __init__(
        self, dataplane: DataPlane, *, server_name: str, version: str, metrics: Any = None
    ) -> None:
        self._dataplane = dataplane
        self.metrics = metrics
        self._server_metadata = pb.ServerMetadataResponse(
            name=server_name, version=version, extensions=[]
        )

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def unary(handler: Any, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                handler,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )

        return {
            "ServerLive": unary(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(
                self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": unary(
                self.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelInfer": unary(self.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
        }

    # -- health and metadata ----------------------------------------------------------------

    async def ServerLive(  # noqa: N802 - gRPC method name
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return _LIVE

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return _READY if self._dataplane.is_ready else _NOT_READY

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        # an unknown name or version is "not ready", as the protocol's HTTP form answers
        if request.version not in ("", MODEL_VERSION):
            return _MODEL_NOT_READY
        ready = self._dataplane.is_model_ready(request.name)
        return _MODEL_READY if ready else _MODEL_NOT_READY

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            served = self._model(request.name, request.version)
            doc = served.metadata()
            tensor = pb.ModelMetadataResponse.TensorMetadata
            response = pb.ModelMetadataResponse(
                name=doc["name"],
                versions=doc["versions"],
                platform=doc["platform"],
                inputs=[tensor(**t) for t in doc["inputs"]],
                outputs=[tensor(**t) for t in doc["outputs"]],
            )
        except Exception as exc:
            status, message, code = status_for(exc)
            await context.abort(status, message, trailing_metadata=((ERROR_CODE_KEY, code),))
        return response

    # -- inference ------------------------------------------------------------------------------

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        served = None
        failed_open = False
        try:
            served = self._model(request.model_name, request.model_version)
            t0 = perf_counter()
            rows = self.decode(request, served)
            decode_s = perf_counter() - t0
            deadline_ms = None
            if request.parameters:
                deadline_ms = _timeout_ms(request.parameters)
            remaining_s = context.time_remaining()
            if remaining_s is not None and (deadline_ms is None or remaining_s * 1e3 < deadline_ms):
                deadline_ms = remaining_s * 1e3
            scores, failed_open = await self._dataplane.predict(served, rows, deadline_ms)
            t0 = perf_counter()
            response = _infer_response(request.id, served, scores, failed_open)
            if self.metrics is not None:
                handle = self.metrics.model(served.name)
                handle.observe_decode_s(decode_s)
                handle.observe_encode_s(perf_counter() - t0)
            status, code = _OK, ""
        except Exception as exc:
            status, message, code = status_for(exc)
        # metrics: the one place a ModelInfer call's outcome (status, model) is known
        record_outcome(self.metrics, ROUTE_GRPC_MODEL_INFER, served, status, code, failed_open)
        if status is _OK:
            return response
        await context.abort(status, message, trailing_metadata=((ERROR_CODE_KEY, code),))

    def decode(self, request: pb.ModelInferRequest, served: ServedModel) -> np.ndarray:
        """The request's one input as float32 rows (n, F); sheds before converting the data."""
        n_features = served.n_features
        inputs = request.inputs
        if len(inputs) != 1:
            raise InvalidInput(
                f"expected exactly 1 input (the feature matrix [rows, {n_features}]), "
                f"got {len(inputs)}"
            )
        for wanted in request.outputs:
            if wanted.name != OUTPUT_NAME:
                raise InvalidInput(f"unknown output {wanted.name!r}; this model has: {OUTPUT_NAME}")
        tensor = inputs[0]
        name = tensor.name
        datatype = tensor.datatype
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            hint = " (features are numbers: send FP32)" if datatype == "BYTES" else ""
            raise InvalidInput(
                f"input {name!r}: unsupported datatype {datatype!r}{hint}; "
                f"expected one of {', '.join(DATATYPES)}"
            )
        shape = tensor.shape
        if len(shape) == 2:
            n_rows, n_cols = shape
        elif len(shape) == 1:
            n_rows, n_cols = 1, shape[0]
        else:
            raise InvalidInput(
                f"input {name!r}: shape must be [rows, {n_features}] or [{n_features}], "
                f"got {list(shape)}"
            )
        if n_cols != n_features:
            raise InvalidInput(f"input {name!r}: expected {n_features} features, got {n_cols}")
        if n_rows < 1:
            raise InvalidInput(f"input {name!r}: expected at least 1 row, got shape {list(shape)}")
        self._dataplane.check_capacity(served, n_rows)
        count = n_rows * n_features
        raw = request.raw_input_contents
        if raw:
            if len(raw) != 1:
                raise InvalidInput(
                    f"expected 1 raw_input_contents entry (one per input), got {len(raw)}"
                )
            data = raw[0]
            if len(data) != count * dtype.itemsize:
                raise InvalidInput(
                    f"input {name!r}: shape {list(shape)} needs {count * dtype.itemsize} bytes "
                    f"of {datatype}, raw_input_contents has {len(data)}"
                )
            values = np.frombuffer(data, dtype=dtype)  # no copy (read-only view)
        else:
            field = _CONTENTS_FIELDS.get(datatype)
            if field is None:
                raise InvalidInput(f"input {name!r}: {datatype} data must be sent raw")
            contents = getattr(tensor.contents, field)
            if len(contents) != count:
                raise InvalidInput(
                    f"input {name!r}: shape {list(shape)} needs {count} values, "
                    f"contents.{field} has {len(contents)}"
                )
            values = np.array(contents, dtype=_F32)  # allocates; no Python floats
        rows = values.reshape(n_rows, n_features)
        if rows.dtype != _F32:
            rows = rows.astype(_F32)  # allocates
        return rows

    def _model(self, name: str, version: str) -> ServedModel:
        served = self._dataplane.get(name)
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(
                f"unknown version {version!r} of model {served.name!r}; versions: {MODEL_VERSION}"
            )
        return served


def _timeout_ms(parameters: Any) -> float | None:
    value = parameters.get(_TIMEOUT_PARAMETER)
    if value is None:
        return None
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param", "double_param"):
        raise InvalidInput(f"parameter 'timeout' must be a number of microseconds, got {kind}")
    timeout_us = getattr(value, kind)
    if not timeout_us > 0:
        raise InvalidInput(f"parameter 'timeout' must be positive microseconds, got {timeout_us}")
    return timeout_us / 1e3


def _infer_response(
    request_id: str, served: ServedModel, scores: np.ndarray, failed_open: bool
) -> pb.ModelInferResponse:
    is_label = served.settings.output == "label"
    out = np.ascontiguousarray(scores, dtype=_I32 if is_label else _F32)
    response = pb.ModelInferResponse(
        model_name=served.name,
        model_version=MODEL_VERSION,
        id=request_id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=OUTPUT_NAME, datatype="INT32" if is_label else "FP32", shape=out.shape
            )
        ],
        raw_output_contents=[out.tobytes()],  # allocates
    )
    if failed_open:
        response.parameters["fail_open"].bool_param = True
    return response
