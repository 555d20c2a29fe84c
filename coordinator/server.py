"""The coordinator process: pairs with its workers, then serves the public Coordinator API."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from coordinator.api_key import ApiKeyInterceptor
from coordinator.cluster import Cluster
from coordinator.config import CoordinatorConfig
from coordinator.cost_profile import measure_cost_profile
from coordinator.discovery.factory import make_discovery
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_api.server import HttpServer, OpenAIApi
from coordinator.replicas import Compatibility
from coordinator.request import RequestLimits
from coordinator.server_info import ServerInfo
from coordinator.servicer import CoordinatorServicer
from coordinator.sessions import SessionService
from coordinator.speculation import SpeculativeGenerator
from specpipe.errors import SpecpipeError
from specpipe.rpc.server import serve
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.tokenizer_files import tokenizer_from_files
from specpipe.speculation.adaptive_k import HF_HEURISTIC_START
from specpipe.speculation.limits import ModelLimits
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


async def wait_for_store(store: SessionStore, deadline: float) -> None:
    while True:
        try:
            await store.ping()
            return
        except SpecpipeError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"session store not ready: {exc}") from exc
            await asyncio.sleep(0.5)


def replica_compatibility(role: str, reference: WorkerModelInfo, context: int) -> Compatibility:
    """Whether a replica can join: the same token ids as the pair the coordinator started with, and at
    least the context the coordinator assumes for its role."""

    def check(info: WorkerModelInfo) -> str:
        if (
            info.tokenizer_fingerprint != reference.tokenizer_fingerprint
            or info.vocab_size != reference.vocab_size
        ):
            return (
                f"model {info.model_name!r} uses another tokenizer or vocabulary than the target "
                f"{reference.model_name!r} the coordinator paired with"
            )
        if role == "target" and tuple(info.eos_token_ids) != tuple(reference.eos_token_ids):
            return f"model {info.model_name!r} has other EOS tokens than {reference.model_name!r}"
        if info.max_context < context:
            return f"model {info.model_name!r} has a context of {info.max_context} tokens, below {context}"
        return ""

    return check


async def pair_workers(
    config: CoordinatorConfig, cluster: Cluster, store: SessionStore
) -> tuple[SpeculativeGenerator, tuple[str, str]]:
    """Waits for a draft and a target replica in rotation, checks they pair, and measures their costs; other
    replicas join rotation later only if they match this pair."""
    timeout = config.startup_timeout_s
    deadline = time.monotonic() + timeout
    draft, target = await asyncio.gather(
        cluster.drafts.wait_healthy(timeout), cluster.targets.wait_healthy(timeout)
    )
    assert draft.info is not None
    target_info = await target.client.model_info(True, timeout_s=30.0)  # with the tokenizer files
    draft_info = draft.info
    check_pairing(draft_info, target_info)
    await wait_for_store(store, deadline)
    tokenizer = tokenizer_from_files(target_info.tokenizer_files)
    limits = ModelLimits(
        target_context=target_info.max_context,
        draft_context=draft_info.max_context,
        vocab_size=target_info.vocab_size,
        eos_token_ids=frozenset(target_info.eos_token_ids),
    )
    cluster.targets.recheck(replica_compatibility("target", target_info, limits.target_context))
    cluster.drafts.recheck(replica_compatibility("draft", target_info, limits.draft_context))
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
        costs = await measure_cost_profile(
            draft.client,  # type: ignore[arg-type]
            target.client,  # type: ignore[arg-type]
            config.max_speculative_tokens,
            context,
        )
    owner = f"{socket.gethostname()}:{config.port}"
    generator = SpeculativeGenerator(
        cluster.drafts,
        cluster.targets,
        store,
        tokenizer,
        limits,
        config.worker_timeout_s,
        owner,
        max_speculative_tokens=config.max_speculative_tokens,
        costs=costs,
        pipelining=config.pipelining,
        chaining=config.chaining,
        delegation=config.delegation,
        heuristic_start=(
            HF_HEURISTIC_START
            if config.adaptive_k_rule == "hf-heuristic" and config.max_speculative_tokens > 0
            else None
        ),
        chat_template=config.chat_template,
    )
    # A model-free drafter (prompt lookup) reports the tokenizer directory as its model: name it instead.
    model_free = draft_info.drafter not in ("", "model")
    return generator, (target_info.model_name, draft_info.drafter if model_free else draft_info.model_name)


async def run_coordinator(config: CoordinatorConfig, stop_event: asyncio.Event | None = None) -> None:
    cluster = Cluster(config.cluster, make_discovery(config.cluster.discovery))
    store = SessionStore.from_url(
        config.redis_url,
        key_prefix=config.session_key_prefix,
        ttl_s=config.session_ttl_s,
        username=config.redis_username or None,
        password=config.redis_password or None,
        ssl_ca_certs=config.redis_ca_file or None,
    )
    metrics = CoordinatorMetrics()
    request_limits = RequestLimits(
        max_new_tokens=config.max_new_tokens_limit,
        max_speculative_tokens=config.max_speculative_tokens,
        default_speculative_tokens=None if config.adaptive_k else config.num_speculative_tokens,
    )
    servicer = CoordinatorServicer(
        request_limits, metrics, config.max_concurrent_requests, config.max_waiting_requests
    )

    async def warmup() -> None:
        cluster.start()
        generator, (target_model, draft_model) = await pair_workers(config, cluster, store)
        sessions = SessionService(
            store, generator.tokenizer, lambda: [*cluster.drafts.clients(), *cluster.targets.clients()]
        )
        info = ServerInfo(
            target_model,
            draft_model,
            generator.limits,
            request_limits,
            config.max_concurrent_requests,
            chat_template=generator.chat.available,
        )
        servicer.attach(generator, sessions, info)

    logger.info("API key: %s", "asked on both APIs" if config.api_key else "none (the APIs are open)")
    http = None
    if config.http_port >= 0:  # listening from the start: 503 until the workers are paired, as gRPC's
        api = OpenAIApi(
            servicer,
            config.served_model_name,
            config.api_key,
            config.tool_call_parser,
            config.reasoning_parser,
        )
        http = HttpServer(api, config.host, config.http_port, config.shutdown_grace_s)
    try:
        if http is not None:
            await http.start()  # a taken port ends the coordinator here, its clients closed below
        await serve(
            name="coordinator",
            host=config.host,
            port=config.port,
            register=lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
            service_names=[SERVICE_NAME],
            warmup=warmup,
            shutdown_grace_s=config.shutdown_grace_s,
            stop_event=stop_event,
            metrics=metrics.registry if config.metrics_port >= 0 else None,
            metrics_port=config.metrics_port,
            drains=[http.drain] if http is not None else [],
            interceptors=[ApiKeyInterceptor(config.api_key)] if config.api_key else [],
        )
    finally:
        if http is not None:
            await http.close()
        if servicer.attached:  # what the drained requests left behind, before the store and workers go
            await servicer.generator.settle_background(timeout_s=5.0)
        await cluster.close()
        try:
            await store.close()
        except SpecpipeError:
            pass
