"""gRPC server lifecycle shared by all services: health, warm-up, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from specpipe.metrics_server import serve_metrics
from specpipe.rpc.interceptor import ErrorMappingInterceptor

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # dense draft distributions for large vocabularies can be several MB


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


async def serve(
    *,
    name: str,
    host: str,
    port: int,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    warmup: Callable[[], Awaitable[None]] | None = None,
    shutdown_grace_s: float = 10.0,
    stop_event: asyncio.Event | None = None,
    drains: Sequence[Callable[[float], Awaitable[None]]] = (),
    metrics: CollectorRegistry | None = None,
    metrics_port: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Runs until SIGTERM/SIGINT (or stop_event): NOT_SERVING until warm-up finishes, then SERVING.

    On shutdown, health turns NOT_SERVING first so load balancers stop routing, then in-flight RPCs get
    `shutdown_grace_s` to finish; `drains` (other listeners' stop, given the grace) run alongside. A
    `metrics` registry is served at http://host:metrics_port/metrics from start to exit (port 0: a free one).
    """
    # `interceptors` first: they see a call before the error mapping does (the coordinator's API key).
    server = grpc.aio.server(
        interceptors=[*interceptors, ErrorMappingInterceptor()], options=server_options()
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    all_names = ["", *service_names]
    for service in all_names:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"{name}: cannot bind {host}:{port}")
    await server.start()
    logger.info("%s listening on %s:%d (warming up)", name, host, bound_port)

    metrics_server = serve_metrics(metrics, host, metrics_port, name) if metrics is not None else None
    try:
        stop = stop_event or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
                pass

        if warmup is not None:
            try:
                await warmup()
            except BaseException:
                await server.stop(0)
                raise
        for service in all_names:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("%s SERVING on %s:%d", name, host, bound_port)

        stop_task = asyncio.ensure_future(stop.wait())
        done_task = asyncio.ensure_future(server.wait_for_termination())
        await asyncio.wait({stop_task, done_task}, return_when=asyncio.FIRST_COMPLETED)
        logger.info("%s draining (grace %.1fs)", name, shutdown_grace_s)
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(server.stop(shutdown_grace_s), *(drain(shutdown_grace_s) for drain in drains))
        for task in (stop_task, done_task):
            task.cancel()
        logger.info("%s stopped", name)
    finally:
        if metrics_server is not None:
            metrics_server.close()
