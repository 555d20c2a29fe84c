"""The draft worker process: loads its drafter (a draft model, or prompt lookup), then serves DraftService
and grpc.health.v1."""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

from draft_service.controlled import ControlledAcceptance, ReferenceContinuations
from draft_service.delegated import TargetClients
from draft_service.drafter import Drafter, DraftRequest, ModelDrafter
from draft_service.prompt_lookup import PromptLookupDrafter, VocabularyInfo
from draft_service.servicer import DraftServicer
from specpipe.config import WorkerConfig
from specpipe.rpc.server import serve
from specpipe.rpc.worker_metrics import served_worker_metrics
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.params import SamplingParams
from specpipe.v1 import draft_pb2, draft_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


def load_drafter(config: WorkerConfig) -> tuple[Drafter, WorkerModelInfo]:
    """The configured drafter, warmed up, and the model info the coordinator pairs on."""
    if config.drafter == "prompt-lookup":
        vocabulary = VocabularyInfo.load(config.model_path, config.max_context)
        lookup = PromptLookupDrafter(vocabulary, config.max_draft_tokens, config.max_ngram, config.min_ngram)
        return lookup, vocabulary.info
    runner = CausalLMRunner.from_config(config)
    steer = None
    if config.controlled_acceptance is not None:
        references = ReferenceContinuations.from_file(config.reference_file)
        steer = ControlledAcceptance(references, config.controlled_acceptance, runner.vocab_size)
        logger.info(
            "controlled acceptance %.2f on greedy drafts: %d reference continuations from %s",
            config.controlled_acceptance, len(references.sequences), config.reference_file,
        )  # fmt: skip
    drafter = ModelDrafter(runner, config.max_draft_tokens, steer)
    # Warm-up: one short greedy and one sampled proposal, so the first request pays no lazy initialisation.
    session_id = f"warmup-{uuid.uuid4().hex}"
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
        drafter.propose(DraftRequest(session_id, (0,), min(2, config.max_draft_tokens), sampling))
    runner.caches.release(session_id)
    return drafter, WorkerModelInfo.from_runner(runner, "draft", drafter.name)


async def run_draft_worker(config: WorkerConfig, stop_event: asyncio.Event | None = None) -> None:
    targets = TargetClients()  # channels to the targets of delegated requests
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model") as model_thread:
        servicer = DraftServicer(model_thread, targets, config.max_batch_sessions, config.max_batch_tokens)
        metrics = served_worker_metrics("draft", servicer, config.metrics_port)

        async def warmup() -> None:
            loop = asyncio.get_running_loop()
            drafter, info = await loop.run_in_executor(model_thread, load_drafter, config)
            if metrics is not None and isinstance(drafter, ModelDrafter):  # prompt lookup runs no model
                drafter.runner.forward_observer = metrics.observe_forward
            servicer.attach(drafter, info)

        await serve(
            name="draft",
            host=config.host,
            port=config.port,
            register=lambda server: draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server),
            service_names=[SERVICE_NAME],
            warmup=warmup,
            shutdown_grace_s=config.shutdown_grace_s,
            stop_event=stop_event,
            metrics=metrics.registry if metrics is not None else None,
            metrics_port=config.metrics_port,
        )
    await targets.close()
