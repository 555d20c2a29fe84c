"""Where a specpipe round's time goes outside the models: loopback round trips of its building blocks.

Measured from the benchmark process with the same client classes the coordinator uses, on a warm session
whose history grows by one token per call (as in decoding):

- a draft Propose (k = 1) and a target Verify (k = 0) over their bidirectional streams: wall time minus the
  worker's own forward_ns, i.e. gRPC, (de)serialisation, the worker's event loop and model thread hand-off;
- a session commit (the Lua script of every round) to the Redis-protocol store;
- a bare gRPC unary call (health check) and a Redis PING, the floors of the two transports;
- (in-process) one dense draft distribution q through the drafter's packed form, protobuf and the
  verifier's decoding, which sampled requests without top-k/top-p pay per draft token.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.services import Services
from specpipe.rpc.worker_clients import DraftClient, TargetClient
from specpipe.sampling.params import SamplingParams
from specpipe.store.session_store import SessionStats, SessionStore

TIMEOUT_S = 60.0


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000.0, 4)


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return _median_ms(samples)


def _end_stream(stream: object) -> None:
    """Cancels a worker stream (the method's name has changed between versions of the clients)."""
    end = getattr(stream, "cancel", None) or getattr(stream, "close", None)
    if end is not None:
        end()


async def _rpc_overheads(services: Services, prompt: Sequence[int], repeats: int) -> dict[str, float]:
    draft, target = DraftClient(services.draft.address), TargetClient(services.target.address)
    session = f"probe-{uuid.uuid4().hex}"
    greedy = SamplingParams()
    draft_stream, target_stream = draft.open_stream(TIMEOUT_S), target.open_stream(TIMEOUT_S)
    draft_over: list[float] = []
    verify_over: list[float] = []
    draft_history, target_history = list(prompt), list(prompt)
    try:
        for i in range(repeats + 2):
            started = time.perf_counter()
            proposal = await draft_stream.propose(session, draft_history, 1, greedy, TIMEOUT_S)
            draft_wall = time.perf_counter() - started
            started = time.perf_counter()
            verdict = await target_stream.verify(session, target_history, [], (), greedy, TIMEOUT_S)
            verify_wall = time.perf_counter() - started
            draft_history.append(proposal.token_ids[0])
            target_history.append(verdict.next_token_id)
            if i >= 2:  # the first calls prefill the prompt
                draft_over.append(draft_wall - proposal.forward_ns / 1e9)
                verify_over.append(verify_wall - verdict.forward_ns / 1e9)
    finally:
        for stream in (draft_stream, target_stream):
            _end_stream(stream)
        for client in (draft, target):
            await client.release_session(session, timeout_s=5.0)
            await client.close()
    return {
        "propose_rpc_overhead_ms": _median_ms(draft_over),
        "verify_rpc_overhead_ms": _median_ms(verify_over),
    }


async def _commit_ms(url: str, prompt: Sequence[int], repeats: int) -> float:
    store = SessionStore.from_url(url, key_prefix="specpipe:bench-probe:")
    session = uuid.uuid4().hex
    samples: list[float] = []
    try:
        state = await store.create(session, list(prompt), len(prompt), SamplingParams().to_dict())
        version = state.version
        for i in range(repeats + 1):
            started = time.perf_counter()
            version = await store.commit_round(
                session, version, [1], SessionStats(generated_tokens=1, target_passes=1, rounds=1)
            )
            if i:
                samples.append(time.perf_counter() - started)
        await store.delete(session)
    finally:
        await store.close()
    return _median_ms(samples)


def _run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def dense_q_ms(vocab_size: int, repeats: int) -> float:
    """One dense draft distribution (sampling without top-k/top-p) through the path it takes each round:
    the drafter's compact form and packed protobuf, serialise, parse, the verifier's decoding and expansion
    to a tensor (the coordinator forwards the message as it came)."""
    import torch

    from draft_service.drafter import DraftProposal
    from specpipe.sampling.draft_sampling import compact_support, expand_distributions
    from specpipe.v1 import draft_pb2
    from target_service.verifier import distribution_values

    probs = torch.softmax(torch.randn(vocab_size), dim=-1)

    def once() -> None:
        proposal = DraftProposal([0], [compact_support(probs)], 0, 0)
        wire = proposal.to_pb().SerializeToString()
        parsed = draft_pb2.ProposeResponse.FromString(wire)
        rows = [(tuple(d.token_ids), distribution_values(d)) for d in parsed.draft_probs]
        expand_distributions(rows, vocab_size)

    return _timed(once, repeats)


def probe_round_trips(
    services: Services, prompt: Sequence[int], vocab_size: int, repeats: int = 100
) -> dict[str, float]:
    """Median milliseconds of each building block (see the module docstring)."""
    with grpc.insecure_channel(services.target.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        grpc_ms = _timed(lambda: stub.Check(check, timeout=TIMEOUT_S), repeats)
    client = redis.Redis.from_url(services.redis.url)
    try:
        ping_ms = _timed(client.ping, repeats)
    finally:
        client.close()
    result: dict[str, float] = {"grpc_unary_health_check_ms": grpc_ms, "redis_ping_ms": ping_ms}
    result.update(_run(_rpc_overheads(services, prompt, repeats)))  # type: ignore[arg-type]
    result["session_commit_ms"] = _run(_commit_ms(services.redis.url, prompt, repeats))  # type: ignore[assignment]
    result["dense_q_per_draft_token_ms"] = dense_q_ms(vocab_size, repeats)
    return result
