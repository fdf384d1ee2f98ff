"""The gRPC server of one worker process: grpc.aio on the worker's own (uvloop) event loop.

It serves ``rtbserve.v1.Predictor``, the Open Inference Protocol's
``inference.GRPCInferenceService``, the standard health service (``grpc.health.v1.Health``) and
server reflection, all over the worker's ``DataPlane``, so gRPC requests coalesce in the same
micro-batchers as HTTP ones. Several workers bind the same port: grpc sets ``SO_REUSEPORT`` on
Linux (channel option ``grpc.so_reuseport``, kept at 1) and the kernel spreads connections.

Shutdown (``GrpcServer.stop``): health turns NOT_SERVING, open streams stop reading and finish
what they owe, the listener closes and in-flight calls get ``grace_s`` to finish before grpc
cancels them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

import rtbserve
from rtbserve._proto import grpc_service_pb2, predictor_pb2
from rtbserve.dataplane import DataPlane
from rtbserve.transports.grpc.kserve_service import SERVICE_NAME as KSERVE_SERVICE
from rtbserve.transports.grpc.kserve_service import InferenceService
from rtbserve.transports.grpc.predictor_service import MAX_STREAM_IN_FLIGHT, PredictorService
from rtbserve.transports.grpc.predictor_service import SERVICE_NAME as PREDICTOR_SERVICE

HEALTH_SERVICE = "grpc.health.v1.Health"
# bounded like the HTTP transport's max_body_bytes (ServerSettings); grpc's default is 4 MiB
DEFAULT_MAX_MESSAGE_BYTES = 6 * 1024 * 1024


class GrpcServer:
    """A started gRPC server. Not thread-safe: use it from the loop that started it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        dataplane: DataPlane,
        health: health_aio.HealthServicer,
        predictor: PredictorService,
        service_names: tuple[str, ...],
    ) -> None:
        self.server = server
        self.port = port
        self.service_names = service_names
        self._dataplane = dataplane
        self._health = health
        self._predictor = predictor
        self._health_update: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        """``PredictStream`` calls in progress."""
        return self._predictor.open_streams

    def set_serving(self, is_serving: bool) -> asyncio.Task[None]:
        """Health status SERVING or NOT_SERVING for the server (``""``), each service and each
        model name; ignored once ``stop`` has begun.

        Call it from the server's loop, awaited or not: the update is a task that runs before
        the loop serves the next call (updates apply in call order); await the returned task to
        know it is done.
        """
        status = health_pb2.HealthCheckResponse.SERVING
        if not is_serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        names = ("", *self.service_names, *self._dataplane.model_names)
        previous = self._health_update
        self._health_update = asyncio.get_running_loop().create_task(
            self._set_health(names, status, previous)
        )
        return self._health_update

    async def _set_health(
        self, names: tuple[str, ...], status: int, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await previous
        for name in names:
            await self._health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace_s`` seconds, then
        cancel the rest. Open ``PredictStream`` calls stop reading at once and end with
        UNAVAILABLE after writing the answers they owe."""
        await self._health.enter_graceful_shutdown()
        self._predictor.drain()
        await self.server.stop(grace_s)

    async def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """True once the server has stopped; False if ``timeout_s`` passed first."""
        return await self.server.wait_for_termination(timeout_s)


async def start_grpc_server(
    dataplane: DataPlane,
    host: str,
    port: int,
    *,
    server_name: str = "rtbserve",
    version: str = rtbserve.__version__,
    options: Sequence[tuple[str, Any]] = (),
    metrics: Any = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT,
) -> GrpcServer:
    """Bind ``host:port`` (0 picks a free port), start serving and return the server.

    Must run on the event loop that will serve (the worker's uvloop loop). Health starts as
    SERVING when ``dataplane.is_ready``, else NOT_SERVING; call ``set_serving`` when that
    changes.

    server_name, version: what ServerMetadata reports.
    options: extra grpc channel arguments; they override the defaults (``grpc.so_reuseport`` =
    1, message limits of ``max_message_bytes``).
    metrics: the worker's ``rtbserve.metrics.WorkerMetrics`` (default ``dataplane.metrics``;
    None counts nothing): every inference call and stream message is counted under the routes
    ``grpc_predict``, ``grpc_predict_stream`` and ``grpc_model_infer``.
    max_stream_in_flight: per ``PredictStream``, messages read but not yet answered before the
    server stops reading (backpressure).
    Raises ``OSError`` when the address cannot be bound.
    """
    if metrics is None:
        metrics = dataplane.metrics
    predictor = PredictorService(
        dataplane, metrics=metrics, max_stream_in_flight=max_stream_in_flight
    )
    inference = InferenceService(
        dataplane, server_name=server_name, version=version, metrics=metrics
    )
    health = health_aio.HealthServicer()
    # grpc keeps the first of duplicate channel arguments: merge so that ``options`` win
    merged = {
        "grpc.so_reuseport": 1,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        **dict(options),
    }
    server = grpc.aio.server(options=list(merged.items()))
    _add_service(server, PREDICTOR_SERVICE, predictor.method_handlers())
    _add_service(server, KSERVE_SERVICE, inference.method_handlers())
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service_names = (PREDICTOR_SERVICE, KSERVE_SERVICE)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME),
        server,
        pool=reflection_pool(),
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound_port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a failed bind this way
        await server.stop(None)
        raise OSError(f"cannot bind gRPC to {address}: {exc}") from exc
    await server.start()
    started = GrpcServer(server, bound_port, dataplane, health, predictor, service_names)
    await started.set_serving(dataplane.is_ready)
    return started


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """One descriptor pool holding every served service, for server reflection.

    The Open Inference Protocol's descriptors live in a private pool (see ``rtbserve._proto``);
    reflection answers from a single pool, so the served files are copied into a fresh one.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (predictor_pb2, grpc_service_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _add_service(
    server: grpc.aio.Server, name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    # registered methods skip grpc's per-call lookup by method path
    server.add_registered_method_handlers(name, handlers)
