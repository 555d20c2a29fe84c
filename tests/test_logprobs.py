"""Log-probabilities of generated tokens (`SamplingParams.logprobs`): the math by hand, then through the real
services, delegated and on the coordinator, greedy and sampled, against the target model scoring the output
in one forward pass of its own."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from specpipe.client import CoordinatorClient, GenerationResult, build_request
from specpipe.errors import InvalidArgumentError
from specpipe.sampling.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, token_logprobs
from specpipe.sampling.params import SamplingParams
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import one_pass_logprobs

TOLERANCE = 1e-4  # the workers score a token in a block over a KV cache, the reference in one pass


def test_hand_computed_logprobs_and_top_tokens() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -1e9], [2.0, 2.0, 2.0]])  # [2, 3]
    first, second = token_logprobs(logits, [1, 2], top=2)
    assert first.token_id == 1 and first.logprob == pytest.approx(math.log(0.75))
    assert [t for t, _ in first.top] == [1, 0] and first.top[1][1] == pytest.approx(math.log(0.25))
    assert second.logprob == pytest.approx(math.log(1 / 3)) and len(second.top) == 2
    assert token_logprobs(logits, [0, 0], top=0)[0].top == ()
    assert TokenLogprob.from_pb(first.to_pb()) == TokenLogprob(
        1,
        pytest.approx(math.log(0.75)),
        ((1, pytest.approx(math.log(0.75))), (0, pytest.approx(math.log(0.25)))),
    )
    with pytest.raises(ValueError):
        token_logprobs(logits, [1], top=0)


def test_the_request_field_is_checked_and_round_trips() -> None:
    for value in (None, 0, MAX_TOP_LOGPROBS):
        assert SamplingParams.from_pb(SamplingParams(logprobs=value).to_pb()).logprobs == value
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        SamplingParams(logprobs=MAX_TOP_LOGPROBS + 1)


@pytest.mark.parametrize(("temperature", "k"), [(0.0, None), (0.0, 0), (0.8, 3)])
def test_logprobs_are_the_targets_own_through_the_services(
    pipeline: Pipeline, coordinator_address: str, temperature: float, k: int | None
) -> None:
    prompt_ids = [11, 42, 7, 99, 3, 250, 18]
    request = build_request(
        prompt_ids, 24, temperature=temperature, seed=5, num_speculative_tokens=k, logprobs=3
    )
    with CoordinatorClient(coordinator_address) as client:
        chunks = list(client.stream(request, 60))
    result = GenerationResult()
    for chunk in chunks:
        assert len(chunk.logprobs) == len(chunk.token_ids)  # one per token in every chunk
        result.add(chunk)
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    # The generated tokens' entries of the one-pass scoring of prompt + output.
    scored = one_pass_logprobs(pipeline.pair.target_dir, [*prompt_ids, *result.token_ids])
    expected = scored[len(prompt_ids) - 1 :]
    for got, want in zip(result.logprobs, expected, strict=True):
        assert got.logprob == pytest.approx(want, abs=TOLERANCE)
        assert len(got.top_token_ids) == 3 and list(got.top_logprobs) == sorted(
            got.top_logprobs, reverse=True
        )
        if temperature == 0.0:  # greedy: the chosen token is the most likely one
            assert got.top_token_ids[0] == got.token_id
            assert got.top_logprobs[0] == pytest.approx(got.logprob, abs=1e-6)


def test_without_the_field_there_are_none_and_too_many_are_refused(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        assert client.generate(build_request(PROMPTS[0], 8), 60).logprobs == []
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request(PROMPTS[0], 8, logprobs=MAX_TOP_LOGPROBS + 1), 60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs" in caught.value.details()


def test_a_stop_string_cuts_the_logprobs_with_the_tokens(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        free = client.generate(build_request(PROMPTS[0], 24, logprobs=0), 60)
        stop = free.text[5:8]
        assert stop
        stopped = client.generate(build_request(PROMPTS[0], 24, logprobs=0, stop=[stop]), 60)
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
    assert [lp.token_id for lp in stopped.logprobs] == stopped.token_ids
    assert [lp.logprob for lp in stopped.logprobs] == [
        lp.logprob for lp in free.logprobs[: len(stopped.logprobs)]
    ]


def test_a_smaller_vocabulary_than_the_ask_gives_every_token() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    (only,) = token_logprobs(logits, [2], top=MAX_TOP_LOGPROBS)
    assert [token for token, _ in only.top] == [2, 1, 0]


def test_workers_that_return_no_logprobs_fail_the_round_with_failed_precondition() -> None:
    """A worker from before log-probs drops the field: the coordinator says so instead of streaming chunks
    without them (and before committing the round)."""
    from specpipe.errors import FailedPreconditionError
    from specpipe.speculation.rounds import Verification
    from tests.rounds import refused_round

    refused = refused_round(SamplingParams(logprobs=0), [5, 6], Verification(2, 7, 0))
    assert isinstance(refused, FailedPreconditionError) and "logprobs" in str(refused)
