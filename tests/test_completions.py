"""GenerateRequest.n: n completions of a prompt, each exactly the single request with seed + i and a session
of its own, streamed interleaved by index. The fan-out by hand (ordering, failure), then through the
services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from coordinator.completions import completion_requests, interleaved_completions
from coordinator.request import GenerationChunk, GenerationRequest, RequestLimits
from specpipe.client import Completions, CoordinatorClient, build_request
from specpipe.errors import InvalidArgumentError, UnavailableError
from tests.conftest import Pipeline
from tests.prompts import PROMPTS

LIMITS = RequestLimits(max_new_tokens=64, max_speculative_tokens=8, default_speculative_tokens=None)


def test_completion_i_is_the_request_with_seed_plus_i_and_only_the_first_scores_the_prompt() -> None:
    pb = build_request("x", 4, temperature=1.0, seed=2**64 - 2, n=3, prompt_logprobs=2)
    singles = completion_requests(GenerationRequest.from_pb(pb, LIMITS))
    assert [single.sampling.seed for single in singles] == [2**64 - 2, 2**64 - 1, 0]
    assert [single.prompt_logprobs for single in singles] == [2, None, None]
    assert all(single.n == 1 for single in singles)
    bad_requests = (
        build_request("x", 4, n=0),
        build_request("x", 4, n=17),
        build_request("", 4, session_id="s", n=2),
    )
    for bad in bad_requests:
        with pytest.raises(InvalidArgumentError, match="n "):
            GenerationRequest.from_pb(bad, LIMITS)


def fake_generate(
    closed: list[tuple[int, bool]],
    fail_after: int | None = None,
    failure: BaseException | None = None,  # None: InvalidArgumentError("completion 1 failed")
) -> Callable[[GenerationRequest], AsyncIterator[GenerationChunk]]:
    """Three chunks per completion, the later completions slower; completion 1 fails where asked. `closed`
    gets each completion's seed as its generator ends (finished, failed or cancelled), and whether it
    yielded all three."""

    async def generate(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        seed = request.sampling.seed
        step = -1
        try:
            for step in range(3):
                if fail_after is not None and seed == 1 and step == fail_after:
                    raise failure or InvalidArgumentError("completion 1 failed")

                await asyncio.sleep(0.01 * (seed + 1))
                yield GenerationChunk(f"s{seed}", [step], str(step))
        finally:
            closed.append((seed, step == 2))

    return generate


def test_chunks_keep_their_order_within_each_completion_and_a_failure_cancels_the_rest() -> None:
    requests = completion_requests(GenerationRequest.from_pb(build_request("x", 4, n=3), LIMITS))

    closed: list[tuple[int, bool]] = []

    async def gather(fail_after: int | None, **failure: BaseException) -> list[GenerationChunk]:
        generate = fake_generate(closed, fail_after, **failure)
        chunks = interleaved_completions(generate, requests)
        return await asyncio.wait_for(_collect(chunks), timeout=10)  # a hang fails rather than waits

    chunks = asyncio.run(gather(None))
    for index in range(3):
        mine = [chunk for chunk in chunks if chunk.index == index]
        assert [chunk.token_ids for chunk in mine] == [[0], [1], [2]]
        assert {chunk.session_id for chunk in mine} == {f"s{index}"}
    closed.clear()
    with pytest.raises(InvalidArgumentError, match="completion 1 failed"):
        asyncio.run(gather(1))
    # Completion 2, still running at the failure, was cancelled (and closed) rather than waited for.
    assert sorted(seed for seed, _ in closed) == [0, 1, 2] and (2, False) in closed
    # A completion whose own call was cancelled (not by the fan-out) ends the call too, rather than hang it.
    with pytest.raises(UnavailableError, match="cancelled"):
        asyncio.run(gather(1, failure=asyncio.CancelledError()))


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [chunk async for chunk in chunks]


def test_each_completion_is_the_single_request_with_its_seed(coordinator_address: str) -> None:
    fields = {"temperature": 1.0, "seed": 7, "acceptance": "coupled"}
    with CoordinatorClient(coordinator_address) as client:
        completions = Completions()
        for chunk in client.stream(build_request(PROMPTS[0], 24, n=3, prompt_logprobs=1, **fields), 60):
            completions.add(chunk)
        results = completions.by_index()
        assert len(results) == 3 and len({result.session_id for result in results}) == 3
        singles = [
            client.generate(build_request(PROMPTS[0], 24, **{**fields, "seed": 7 + i}), 60) for i in range(3)
        ]
        assert [result.token_ids for result in results] == [single.token_ids for single in singles]
        assert len({tuple(result.token_ids) for result in results}) > 1  # the seeds differ
        assert results[0].prompt_logprobs and not results[1].prompt_logprobs
        for result in results:
            assert result.finish_reason and result.usage is not None
            assert result.usage.generated_tokens == len(result.token_ids)
            stored = client.get_session(result.session_id)  # each is a session of its own
            assert list(stored.token_ids)[-len(result.token_ids) :] == result.token_ids
            continued = client.generate(build_request(" and", 4, session_id=result.session_id), 60)
            assert continued.session_id == result.session_id and len(continued.token_ids) >= 1


def test_a_bad_n_is_invalid_argument(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        first = client.generate(build_request(PROMPTS[0], 2), 60)
        continued = build_request(" x", 2, session_id=first.session_id, n=2)
        for request in (build_request("x", 2, n=17), continued):
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(request, 30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "n " in caught.value.details()
