"""The coordinator process: pairs with its workers, then serves the public Coordinator API."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from coordinator.config import CoordinatorConfig
from coordinator.cost_profile import measure_cost_profile
from coordinator.request import RequestLimits
from coordinator.servicer import CoordinatorServicer
from coordinator.sessions import SessionService
from coordinator.speculation import ModelLimits, SpeculativeGenerator
from coordinator.worker_clients import DraftClient, TargetClient, WorkerClient
from specpipe.errors import SpecpipeError
from specpipe.rpc.server import serve
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.tokenizer_files import tokenizer_from_files
from specpipe.store.session_store import SessionStore
from specpipe.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


class IncompatibleWorkersError(RuntimeError):
    """The draft and target cannot be paired (different tokenizers or vocabularies)."""


def check_pairing(draft: WorkerModelInfo, target: WorkerModelInfo) -> None:
    """Refuses a pair whose token ids mean different things: q and p must index the same vocabulary."""
    if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        raise IncompatibleWorkersError(
            f"draft model {draft.model_name!r} and target model {target.model_name!r} "
            "use different tokenizers "
            f"(fingerprints {draft.tokenizer_fingerprint[:12]} vs {target.tokenizer_fingerprint[:12]})"
        )
    if draft.vocab_size != target.vocab_size:
        raise IncompatibleWorkersError(
            f"draft model {draft.model_name!r} has vocabulary size {draft.vocab_size} but target model "
            f"{target.model_name!r} has {target.vocab_size}"
        )


async def wait_for_info(
    client: WorkerClient, include_tokenizer_files: bool, deadline: float
) -> WorkerModelInfo:
    while True:
        try:
            return await client.model_info(include_tokenizer_files, timeout_s=5.0)
        except SpecpipeError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{client.role} worker at {client.address} not ready: {exc}") from exc
            await asyncio.sleep(0.5)


async def wait_for_store(store: SessionStore, deadline: float) -> None:
    while True:
        try:
            await store.ping()
            return
        except SpecpipeError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"session store not ready: {exc}") from exc
            await asyncio.sleep(0.5)


async def pair_workers(
    config: CoordinatorConfig, draft: DraftClient, target: TargetClient, store: SessionStore
) -> SpeculativeGenerator:
    deadline = time.monotonic() + config.startup_timeout_s
    draft_info, target_info = await asyncio.gather(
        wait_for_info(draft, False, deadline), wait_for_info(target, True, deadline)
    )
    check_pairing(draft_info, target_info)
    await wait_for_store(store, deadline)
    tokenizer = tokenizer_from_files(target_info.tokenizer_files)
    limits = ModelLimits(
        target_context=target_info.max_context,
        draft_context=draft_info.max_context,
        vocab_size=target_info.vocab_size,
        eos_token_ids=frozenset(target_info.eos_token_ids),
    )
    logger.info(
        "paired draft %s (%s) with target %s (%s)",
        draft_info.model_name,
        draft.address,
        target_info.model_name,
        target.address,
    )
    costs = None
    if config.max_speculative_tokens > 0:  # for adaptive k, and to decide where pipelining is free
        context = min(limits.target_context, limits.draft_context)
        costs = await measure_cost_profile(draft, target, config.max_speculative_tokens, context)
    owner = f"{socket.gethostname()}:{config.port}"
    return SpeculativeGenerator(
        draft,
        target,
        store,
        tokenizer,
        limits,
        config.worker_timeout_s,
        owner,
        max_speculative_tokens=config.max_speculative_tokens,
        costs=costs,
        pipelining=config.pipelining,
    )


async def run_coordinator(config: CoordinatorConfig, stop_event: asyncio.Event | None = None) -> None:
    draft = DraftClient(config.draft_addr)
    target = TargetClient(config.target_addr)
    store = SessionStore.from_url(
        config.redis_url,
        key_prefix=config.session_key_prefix,
        ttl_s=config.session_ttl_s,
        username=config.redis_username or None,
        password=config.redis_password or None,
        ssl_ca_certs=config.redis_ca_file or None,
    )
    servicer = CoordinatorServicer(
        RequestLimits(
            max_new_tokens=config.max_new_tokens_limit,
            max_speculative_tokens=config.max_speculative_tokens,
            default_speculative_tokens=None if config.adaptive_k else config.num_speculative_tokens,
        )
    )

    async def warmup() -> None:
        generator = await pair_workers(config, draft, target, store)
        servicer.attach(generator, SessionService(store, generator.tokenizer, (draft, target)))

    try:
        await serve(
            name="coordinator",
            host=config.host,
            port=config.port,
            register=lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
            service_names=[SERVICE_NAME],
            warmup=warmup,
            shutdown_grace_s=config.shutdown_grace_s,
            stop_event=stop_event,
        )
    finally:
        await asyncio.gather(draft.close(), target.close(), return_exceptions=True)
        try:
            await store.close()
        except SpecpipeError:
            pass
