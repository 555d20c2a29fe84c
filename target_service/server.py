"""The target worker process: loads the target model, then serves TargetService and grpc.health.v1."""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

from specpipe.config import WorkerConfig
from specpipe.rpc.direct_server import DirectStreamServer
from specpipe.rpc.server import serve
from specpipe.rpc.worker_metrics import served_worker_metrics
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.params import SamplingParams
from specpipe.v1 import target_pb2, target_pb2_grpc
from target_service.servicer import TargetServicer
from target_service.verifier import Verifier, VerifyBlock

logger = logging.getLogger(__name__)

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def load_verifier(config: WorkerConfig) -> Verifier:
    runner = CausalLMRunner.from_config(config)
    verifier = Verifier(runner)
    # Warm-up: a greedy and a sampled verification, so the first request pays no lazy initialisation.
    session_id = f"warmup-{uuid.uuid4().hex}"
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
        verifier.verify(VerifyBlock(session_id, (0,), (0, 0), None, sampling))
    runner.caches.release(session_id)
    return verifier


async def run_target_worker(config: WorkerConfig, stop_event: asyncio.Event | None = None) -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model") as model_thread:
        servicer = TargetServicer(model_thread, config.max_batch_sessions, config.max_batch_tokens)
        # VerifyStream without gRPC's threads, for the rounds of drafts and coordinators (direct_frames.py).
        direct: DirectStreamServer | None = None
        direct_port = 0
        if config.direct_stream_port >= 0:
            direct = listener = DirectStreamServer(
                "target", servicer.verify_stream_blocking, target_pb2.VerifyRequest.FromString
            )
            servicer.loop = asyncio.get_running_loop()
            direct_port = await listener.start(config.host, config.direct_stream_port)
            servicer.direct_streams = lambda: listener.streams_served
        metrics = served_worker_metrics("target", servicer, config.metrics_port)

        async def warmup() -> None:
            verifier = await asyncio.get_running_loop().run_in_executor(model_thread, load_verifier, config)
            info = WorkerModelInfo.from_runner(verifier.runner, "target", direct_stream_port=direct_port)
            if metrics is not None:
                verifier.runner.forward_observer = metrics.observe_forward
            if config.max_batch_sessions > 1 and not verifier.runner.packs_sessions:
                logger.warning(
                    "no packed forward for this model: batched blocks run one forward pass each (the lean "
                    "GPT-2 and Llama forwards pack sessions: --lean-forward)"
                )
            servicer.attach(verifier, info)

        try:
            await serve(
                name="target",
                host=config.host,
                port=config.port,
                register=lambda server: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server),
                service_names=[SERVICE_NAME],
                warmup=warmup,
                shutdown_grace_s=config.shutdown_grace_s,
                stop_event=stop_event,
                drains=[direct.stop] if direct is not None else [],
                metrics=metrics.registry if metrics is not None else None,
                metrics_port=config.metrics_port,
            )
        finally:
            if direct is not None:
                await direct.stop(0)  # already drained, unless serve failed
