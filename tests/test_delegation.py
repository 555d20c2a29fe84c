"""Delegated speculation (DraftService.Speculate): the rounds run on the draft worker, which sends blocks to
the target directly. The outputs must be the ones the coordinator's own loop gives: greedy equal to the
target alone, seeded sampled tokens equal token for token (the schedule travels with the request), stop
strings honoured, bad requests refused, and a draft that dies mid-request leaves the coordinator to finish it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from specpipe.client import CoordinatorClient, build_request
from specpipe.launcher import stop_all
from specpipe.rpc.worker_clients import DraftClient, TargetClient
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.adaptive_k import HF_HEURISTIC_START, CostProfile
from specpipe.speculation.delegation import DelegatedRequest, DraftSchedule, SpeculationRound
from specpipe.speculation.limits import ModelLimits
from specpipe.v1 import common_pb2, coordinator_pb2, draft_pb2
from tests.conftest import Pipeline, ServiceProcess, start_coordinator, start_worker
from tests.prompts import PROMPTS
from tests.reference import target_alone

MAX_NEW_TOKENS = 24


def delegated_rounds(pipeline: Pipeline) -> int:
    async def query() -> int:
        client = DraftClient(pipeline.draft.address)
        try:
            return int((await client.stats()).delegated_rounds)
        finally:
            await client.close()

    return asyncio.run(query())


@pytest.mark.parametrize("k", [None, 3])
def test_delegated_greedy_equals_target_alone(pipeline: Pipeline, k: int | None) -> None:
    expected = target_alone(pipeline.pair.target_dir, PROMPTS, MAX_NEW_TOKENS)
    before = delegated_rounds(pipeline)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for prompt in PROMPTS:
            result = client.generate(
                build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=k), timeout_s=60
            )
            assert result.token_ids == expected[prompt], f"k={k} prompt={prompt!r}"
            assert result.usage is not None and result.usage.target_passes >= 1
            assert result.usage.generated_tokens == len(result.token_ids)
    # The rounds really ran on the draft worker: at least one per request.
    assert delegated_rounds(pipeline) - before >= len(PROMPTS)


@pytest.mark.parametrize(("acceptance", "k"), [("leviathan", 3), ("coupled", None)])
def test_delegated_seeded_sampling_gives_the_coordinators_tokens(
    pipeline: Pipeline, undelegated_coordinator: str, acceptance: str, k: int | None
) -> None:
    """Same seed, same tokens whether the rounds run on the coordinator or on the draft worker. (A fixed k
    for the Leviathan rule: the two coordinators measured their own cost profiles, so their adaptive
    schedules may differ; test_the_draft_follows_the_schedule_it_was_given covers the adaptive one.)"""
    for seed in (3, 11):
        request = build_request(
            PROMPTS[0], 40, temperature=0.8, top_p=0.95, seed=seed, acceptance=acceptance,
            num_speculative_tokens=k,
        )  # fmt: skip
        with CoordinatorClient(undelegated_coordinator) as client:
            local = client.generate(request, timeout_s=60)
        with CoordinatorClient(pipeline.coordinator_addr) as client:
            delegated = client.generate(request, timeout_s=60)
        assert delegated.token_ids == local.token_ids, (acceptance, seed)
        assert delegated.finish_reason == local.finish_reason


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("heuristic_k", [None, HF_HEURISTIC_START], ids=["cost", "hf-heuristic"])
def test_the_draft_follows_the_schedule_it_was_given(
    pipeline: Pipeline, temperature: float, heuristic_k: int | None
) -> None:
    """Replaying the adaptive policy (the cost model, or Hugging Face's +2/-1 rule) on the rounds that came
    back gives every round's k: the draft's loop (pipelined and chained) sizes blocks exactly as the
    coordinator's would, so a request can move between the two without changing its block boundaries."""
    costs = CostProfile(0.0006, 0.012, 0.0008, 0.001, 0.0018)
    limits = ModelLimits(256, 256, 100, frozenset())
    schedule = DraftSchedule(
        None,
        8,
        pipelining=True,
        chaining=True,
        costs=costs,
        accepted=1.0,
        rejected=2.0,
        heuristic_k=heuristic_k,
    )
    assert DraftSchedule.from_pb(schedule.to_pb()) == schedule
    history = [5, 17, 42, 8, 99, 3, 61, 20]
    request = DelegatedRequest(
        "schedule-replay", tuple(history), 60, SamplingParams(temperature=temperature, seed=4),
        pipeline.target.address, schedule, limits, 20.0,
    )  # fmt: skip

    async def rounds() -> list[SpeculationRound]:
        client = DraftClient(pipeline.draft.address)
        try:
            call = client.speculate(request, 60)
            received = []
            while (speculation_round := await call.next_round(30)) is not None:
                received.append(speculation_round)
            return received
        finally:
            await client.close()

    received = asyncio.run(rounds())
    policy = schedule.policy()
    remaining = 60
    ks = set()
    for speculation_round in received:
        k = limits.draft_length(policy.next_k(), remaining, len(history))
        assert len(speculation_round.draft_token_ids) == k
        policy.record(k, speculation_round.num_accepted)
        new_ids, _ = limits.round_tokens(
            speculation_round.draft_token_ids,
            speculation_round.num_accepted,
            speculation_round.next_token_id,
            remaining,
            len(history),
        )
        assert list(speculation_round.new_token_ids) == new_ids
        history.extend(new_ids)
        remaining -= len(new_ids)
        ks.add(k)
    assert remaining == 0 and received[-1].finish_reason == "length"
    assert len(ks) > 1  # the schedule really adapted


def test_delegated_request_stops_at_a_stop_string(pipeline: Pipeline, undelegated_coordinator: str) -> None:
    with CoordinatorClient(undelegated_coordinator) as client:
        full = client.generate(build_request(PROMPTS[1], 32), timeout_s=60)
        stop = full.text[len(full.text) // 2 :][:3]
        assert stop
        local = client.generate(build_request(PROMPTS[1], 32, stop=[stop]), timeout_s=60)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        delegated = client.generate(build_request(PROMPTS[1], 32, stop=[stop]), timeout_s=60)
        # Stopping the delegated call (usually during a verify) left the target's cache of the session warm
        # for the next turn: the stream was closed, not cancelled, once that verdict was in.
        time.sleep(1.0)
        assert target_holds(pipeline, delegated.session_id)
        # The session continues afterwards from exactly what was streamed.
        follow = client.generate(build_request("", 8, session_id=delegated.session_id), timeout_s=60)
    assert delegated.finish_reason == "stop" == local.finish_reason
    assert delegated.token_ids == local.token_ids and delegated.text == local.text
    assert len(follow.token_ids) == 8


def target_holds(pipeline: Pipeline, session_id: str) -> bool:
    async def query() -> bool:
        client = TargetClient(pipeline.target.address)
        try:
            return bool((await client.stats(session_id)).session_cached)
        finally:
            await client.close()

    return asyncio.run(query())


def test_speculate_refuses_bad_requests_with_invalid_argument(pipeline: Pipeline) -> None:
    async def main() -> None:
        client = DraftClient(pipeline.draft.address)
        good = draft_pb2.SpeculateRequest(
            session_id="bad-speculate", token_ids=[5, 6, 7], max_new_tokens=4,
            sampling=common_pb2.SamplingParams(), target_address=pipeline.target.address,
            schedule=draft_pb2.DraftSchedule(max_k=4), target_context=256, draft_context=256,
            vocab_size=100, worker_timeout_s=10,
        )  # fmt: skip
        broken = [draft_pb2.SpeculateRequest() for _ in range(3)]
        broken[0].CopyFrom(good)
        broken[0].ClearField("token_ids")
        broken[1].CopyFrom(good)
        broken[1].schedule.fixed_k = 9  # more than max_k
        broken[2].CopyFrom(good)
        broken[2].schedule.heuristic_k = 0  # the +2/-1 rule never drafts fewer than one
        try:
            for request in broken:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in client.stub.Speculate(request, timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # An unreachable target: UNAVAILABLE (the coordinator would continue the request itself).
            unreachable = draft_pb2.SpeculateRequest()
            unreachable.CopyFrom(good)
            unreachable.target_address = "127.0.0.1:1"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in client.stub.Speculate(unreachable, timeout=10):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await client.close()

    asyncio.run(main())


def test_a_draft_dying_mid_request_leaves_the_coordinator_to_finish_it(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Own draft and coordinator (the shared target serves both): the draft is killed after the first
    streamed chunk; the coordinator continues from its committed tokens by plain target decoding, and the
    greedy output is still the target's own."""
    max_new_tokens = 160  # many rounds: the kill lands while the draft is still running them
    expected = target_alone(pipeline.pair.target_dir, [PROMPTS[2]], max_new_tokens)[PROMPTS[2]]
    draft: ServiceProcess = start_worker("draft", pipeline.pair.draft_dir, tmp_path)
    coordinator = start_coordinator(draft.address, pipeline.target.address, pipeline.redis.url, tmp_path)
    try:
        draft.wait_serving(120)
        coordinator.wait_serving(120)
        tokens: list[int] = []
        finish = coordinator_pb2.FINISH_REASON_UNSPECIFIED
        with CoordinatorClient(coordinator.address) as client:
            for i, chunk in enumerate(
                client.stream(build_request(PROMPTS[2], max_new_tokens, num_speculative_tokens=2), 60)
            ):
                if i == 0:
                    assert draft.popen is not None
                    draft.popen.kill()
                    draft.popen.wait()
                tokens.extend(chunk.token_ids)
                finish = chunk.finish_reason or finish
        assert tokens == expected
        assert finish == coordinator_pb2.FINISH_REASON_LENGTH
        assert "delegated rounds on draft" in coordinator.log_tail(200)
    finally:
        stop_all([coordinator, draft])


def test_hf_heuristic_rule_through_the_services(pipeline: Pipeline, tmp_path: Path) -> None:
    """`--adaptive-k-rule hf-heuristic` (Hugging Face's +2/-1 schedule in place of the cost model, for the
    benchmark's comparison): greedy outputs are the target's own, and since that schedule depends on the
    tokens alone (no measured costs), seeded Leviathan-rule tokens with adaptive k are the same whether the
    rounds run on the draft worker or on the coordinator."""
    for name in ("delegated", "local"):
        (tmp_path / name).mkdir()
    coordinators = [
        start_coordinator(
            pipeline.draft.address,
            pipeline.target.address,
            pipeline.redis.url,
            tmp_path / name,
            extra=["--adaptive-k-rule", "hf-heuristic", *extra],
        )  # fmt: skip
        for name, extra in (("delegated", []), ("local", ["--no-delegation"]))
    ]
    try:
        for coordinator in coordinators:
            coordinator.wait_serving(120)
        expected = target_alone(pipeline.pair.target_dir, PROMPTS, MAX_NEW_TOKENS)
        with CoordinatorClient(coordinators[0].address) as client:
            for prompt in PROMPTS:
                result = client.generate(build_request(prompt, MAX_NEW_TOKENS), timeout_s=60)
                assert result.token_ids == expected[prompt], prompt
        sampled = build_request(PROMPTS[0], 40, temperature=0.8, seed=7)
        outputs = []
        for coordinator in coordinators:
            with CoordinatorClient(coordinator.address) as client:
                outputs.append(client.generate(sampled, timeout_s=60).token_ids)
        assert outputs[0] == outputs[1]
    finally:
        stop_all(coordinators)
