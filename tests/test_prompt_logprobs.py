"""Prompt log-probabilities (`GenerateRequest.prompt_logprobs`): the target's scoring pass against the target
model scoring the prompt in one forward pass of its own, in process, on the real target worker, and through
the services (delegated and on the coordinator, a new and a continued session)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.cluster_config import ClusterConfig
from coordinator.discovery.base import Endpoint
from coordinator.replicas import DOWN, HEALTHY, ReplicaSet
from coordinator.worker_links import TargetLink
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.launcher import free_port
from specpipe.rpc.worker_clients import TargetClient
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.logprobs import MAX_TOP_LOGPROBS
from specpipe.speculation.prompt_scores import PromptScores, PromptScoring
from specpipe.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_service.prompt_scoring import score_prompt
from tests.conftest import ModelPair, Pipeline, with_target_client
from tests.reference import one_pass_logprobs

TOLERANCE = 1e-4  # the worker scores in chunks over a KV cache, the reference in one pass
PROMPT_IDS = [11, 42, 7, 99, 3, 250, 18, 64, 5, 120, 33]


RUNNERS = {  # the target worker's forwards: transformers', the lean one, and static KV slots (as on a GPU)
    "transformers": {},
    "lean": {"lean_forward": True},
    "static-slots": {"lean_forward": True, "static_kv_slots": 2, "cuda_graphs": False},
}


@pytest.mark.parametrize("runner_kind", list(RUNNERS))
@pytest.mark.parametrize("rows_per_forward", [1, 3, 256])
def test_scoring_in_chunks_is_the_one_pass_scoring_and_leaves_the_prompt_cached(
    model_pair: ModelPair, rows_per_forward: int, runner_kind: str
) -> None:
    runner = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", max_cached_sessions=4, max_context=64, **RUNNERS[runner_kind]
    )
    expected = one_pass_logprobs(model_pair.target_dir, PROMPT_IDS)
    scores = score_prompt(runner, PromptScoring("s", tuple(PROMPT_IDS), 1, 2), rows_per_forward)
    assert [lp.token_id for lp in scores.logprobs] == PROMPT_IDS[1:]
    assert [lp.logprob for lp in scores.logprobs] == pytest.approx(expected, abs=TOLERANCE)
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in scores.logprobs)
    assert scores.cached_tokens == 0
    # The cache holds every token but the last, whose row the first verify computes with its block.
    assert runner.caches.get_or_create("s").token_ids == PROMPT_IDS[:-1]
    # A later turn scores from where its prompt starts, over the cached history.
    later = score_prompt(runner, PromptScoring("s", tuple(PROMPT_IDS), 6, 0), rows_per_forward)
    assert [lp.logprob for lp in later.logprobs] == pytest.approx(expected[5:], abs=TOLERANCE)
    assert later.cached_tokens == 5 and all(lp.top == () for lp in later.logprobs)


@pytest.mark.parametrize(
    ("first_position", "top", "match"),
    [
        (0, 0, "first_position"),
        (len(PROMPT_IDS), 0, "first_position"),
        (1, MAX_TOP_LOGPROBS + 1, "top_logprobs"),
    ],
)
def test_bad_scoring_requests_are_refused(
    model_pair: ModelPair, first_position: int, top: int, match: str
) -> None:
    runner = CausalLMRunner.load(model_pair.target_dir, "cpu", "float32", max_cached_sessions=4)
    with pytest.raises(InvalidArgumentError, match=match):
        score_prompt(runner, PromptScoring("s", tuple(PROMPT_IDS), first_position, top))
    with pytest.raises(InvalidArgumentError, match="token_ids"):
        score_prompt(runner, PromptScoring("s", (1, runner.vocab_size), 1, 0))


def test_the_target_worker_scores_and_its_first_verify_feeds_only_the_block(pipeline: Pipeline) -> None:
    async def test(client: TargetClient) -> None:
        scoring = PromptScoring("prompt-scored", tuple(PROMPT_IDS), 1, 1)
        scores = await client.score_prompt(scoring, 30)
        assert PromptScores.from_pb(scores.to_pb()) == scores
        expected = one_pass_logprobs(pipeline.pair.target_dir, PROMPT_IDS)
        assert [lp.logprob for lp in scores.logprobs] == pytest.approx(expected, abs=TOLERANCE)
        reply = await client.stub.Verify(
            target_pb2.VerifyRequest(
                session_id="prompt-scored",
                token_ids=PROMPT_IDS,
                draft_token_ids=[5, 6],
                sampling=common_pb2.SamplingParams(),
            ),
            timeout=30,
        )
        assert reply.cached_tokens == len(PROMPT_IDS) - 1  # only the last prompt token and the block were fed
        with pytest.raises(InvalidArgumentError, match="first_position"):
            await client.score_prompt(PromptScoring("prompt-scored", (1, 2), 2, 0), 30)
        await client.release_session("prompt-scored", 5)

    with_target_client(pipeline, test)


def test_a_target_without_the_rpc_fails_the_request_not_the_replica() -> None:
    """A target from before ScorePrompt answers UNIMPLEMENTED: FAILED_PRECONDITION for the request, and the
    replica stays in rotation (UNAVAILABLE would have taken a healthy replica out)."""

    async def main() -> None:
        server = grpc.aio.server()
        target_pb2_grpc.add_TargetServiceServicer_to_server(target_pb2_grpc.TargetServiceServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        replicas, link = target_link(f"127.0.0.1:{port}")
        try:
            with pytest.raises(FailedPreconditionError, match="prompt_logprobs"):
                await link.score_prompt((1, 2, 3), 1, 0)
            assert [r.state for r in replicas.replicas.values()] == [HEALTHY]
        finally:
            await link.close(completed=False)
            for replica in replicas.replicas.values():
                await replica.client.close()
            await server.stop(None)

    asyncio.run(main())


def target_link(*addresses: str, session_id: str = "s") -> tuple[ReplicaSet, TargetLink]:
    """A session's link to target replicas at these addresses, all in rotation (no health check)."""
    replicas = ReplicaSet("target", TargetClient, ClusterConfig.single("", ",".join(addresses)))
    replicas.update([Endpoint("target", address, "default") for address in addresses])
    for replica in replicas.replicas.values():
        replica.state = HEALTHY
    return replicas, TargetLink(replicas, session_id, lambda: None, 10.0)


def test_scoring_fails_over_to_a_live_replica(pipeline: Pipeline) -> None:
    """A session whose target replica is dead is scored on another, which then holds its prompt."""

    async def main() -> None:
        dead, live = f"127.0.0.1:{free_port()}", pipeline.target.address
        replicas, _ = target_link(dead, live)
        # A session the routing sends to the dead replica first.
        session_id = next(f"s{i}" for i in range(1000) if replicas.pick(f"s{i}").address == dead)
        link = TargetLink(replicas, session_id, lambda: None, 10.0)
        try:
            scores = await link.score_prompt(PROMPT_IDS, 1, 0)
            expected = one_pass_logprobs(pipeline.pair.target_dir, PROMPT_IDS)
            assert [lp.logprob for lp in scores.logprobs] == pytest.approx(expected, abs=TOLERANCE)
            assert replicas.replicas[dead].state == DOWN and link.replica is not None
            assert link.replica.address == live
            assert (await link.replica.client.stats(session_id)).session_cached
            await link.replica.client.release_session(session_id, 5)
        finally:
            await link.close(completed=False)
            for replica in replicas.replicas.values():
                await replica.client.close()

    asyncio.run(main())


def test_prompt_logprobs_through_the_services_new_and_continued_session(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    with CoordinatorClient(coordinator_address) as client:
        plain = client.generate(build_request(PROMPT_IDS, 12), 60)
        chunks = list(client.stream(build_request(PROMPT_IDS, 12, prompt_logprobs=3), 60))
        second_turn = [250, 18, 9]
        continued = list(
            client.stream(
                build_request(second_turn, 6, session_id=chunks[0].session_id, prompt_logprobs=0), 60
            )
        )
    # Only the first chunk carries them, and asking for them changes no generated token.
    assert all(not chunk.prompt_logprobs for chunk in chunks[1:])
    assert [t for chunk in chunks for t in chunk.token_ids] == plain.token_ids
    first = chunks[0].prompt_logprobs
    expected = one_pass_logprobs(pipeline.pair.target_dir, PROMPT_IDS)
    assert [lp.token_id for lp in first] == PROMPT_IDS[1:]
    assert [lp.logprob for lp in first] == pytest.approx(expected, abs=TOLERANCE)
    assert all(len(lp.top_token_ids) == 3 for lp in first)
    # The second turn's prompt tokens, each given the whole history before it (first turn included).
    history = [*PROMPT_IDS, *plain.token_ids, *second_turn]
    expected = one_pass_logprobs(pipeline.pair.target_dir, history)[-len(second_turn) :]
    scored = continued[0].prompt_logprobs
    assert [lp.token_id for lp in scored] == second_turn
    assert [lp.logprob for lp in scored] == pytest.approx(expected, abs=TOLERANCE)
    assert all(not lp.top_token_ids for lp in scored)


def test_no_prompt_this_turn_gives_none_and_too_many_are_refused(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        first = client.generate(build_request(PROMPT_IDS[:1], 4, prompt_logprobs=1), 60)
        assert first.prompt_logprobs == [] and len(first.token_ids) == 4  # one token: nothing before it
        resumed = client.generate(build_request([], 4, session_id=first.session_id, prompt_logprobs=1), 60)
        assert resumed.prompt_logprobs == [] and len(resumed.token_ids) == 4
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request(PROMPT_IDS, 4, prompt_logprobs=MAX_TOP_LOGPROBS + 1), 60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_logprobs" in caught.value.details()
