"""min_tokens (`SamplingParams.min_tokens`): the tokens that would end the output are held back until it
holds that many. By hand, then through the real services: greedy equals Hugging Face's
`generate(min_new_tokens=...)` with the same end tokens, and a sampled request that ended with EOS runs past
it, whatever k."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe.client import CoordinatorClient, build_request
from specpipe.sampling.min_tokens import hold_back_ends
from specpipe.sampling.params import SamplingParams
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.test_end_of_generation import first_ending_in_eos, sampled

MIN_TOKENS = 12


def test_rows_before_the_minimum_hold_back_the_end_tokens() -> None:
    logits = torch.zeros(4, 6)  # [4, 6]: rows score positions 10..13
    sampling = SamplingParams(min_tokens=5, output_start=7, end_token_ids=(2, 5, 99))
    held = hold_back_ends(logits, 10, sampling)
    # The output holds 3, 4, 5, 6 tokens before rows 0..3: rows 0 and 1 may not end it.
    assert torch.isinf(held[:2, [2, 5]]).all() and torch.isfinite(held[2:]).all()
    assert torch.isfinite(held[:2, [0, 1, 3, 4]]).all()
    assert hold_back_ends(logits, 12, sampling) is logits  # past the minimum: nothing to do
    assert SamplingParams(min_tokens=3, end_token_ids=(2,)).needs_applied_echo
    assert not SamplingParams(min_tokens=3).needs_applied_echo  # ignore_eos, no stop ids: nothing held back
    assert "end_token_ids" not in sampling.to_dict()


def end_token_ids(pipeline: Pipeline) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir)
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def test_greedy_with_min_tokens_equals_generate_with_min_new_tokens(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    with CoordinatorClient(coordinator_address) as client:
        free = client.generate(build_request(PROMPTS[0], 24), 60)
        stop_id = free.token_ids[2]  # a stop token the free run reaches early
        early = client.generate(build_request(PROMPTS[0], 24, stop_token_ids=[stop_id]), 60)
        assert early.finish_reason == "stop" and len(early.token_ids) < MIN_TOKENS
        expected = target_alone(
            pipeline.pair.target_dir, [PROMPTS[0]], 24,
            min_new_tokens=MIN_TOKENS, eos_token_id=[*end_token_ids(pipeline), stop_id],
        )[PROMPTS[0]]  # fmt: skip
        assert len(expected) >= MIN_TOKENS and stop_id not in expected[: MIN_TOKENS - 1]
        for k in (None, 0, 3):
            request = build_request(
                PROMPTS[0], 24, stop_token_ids=[stop_id], min_tokens=MIN_TOKENS, num_speculative_tokens=k
            )
            assert client.generate(request, 60).token_ids == expected, k


def test_a_sampled_request_that_ended_at_eos_runs_past_it_whatever_k(coordinator_address: str) -> None:
    with CoordinatorClient(coordinator_address) as client:
        prompt, seed, ended = first_ending_in_eos(client)
        minimum = len(ended.token_ids) + 4
        outputs = []
        for k in (0, 3, None):
            request = sampled(prompt, seed, False, k)
            request.sampling.min_tokens = minimum
            result = client.generate(request, 60)
            assert len(result.token_ids) >= minimum, (k, result.finish_reason)
            outputs.append(result.token_ids)
    assert all(output == outputs[0] for output in outputs)
    # The tokens before the held-back EOS are the ones the free request gave.
    assert outputs[0][: len(ended.token_ids) - 1] == ended.token_ids[:-1]


def test_min_tokens_above_max_new_tokens_is_invalid_argument(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(build_request(PROMPTS[0], 4, min_tokens=5), 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_tokens" in caught.value.details()


def test_a_resumed_request_needs_room_only_for_what_min_tokens_still_holds(pipeline: Pipeline) -> None:
    """min_tokens counts the turn's output, a resumed request's included: 4 generated, 6 still held back."""
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        first = client.generate(build_request(PROMPTS[1], 4, ignore_eos=True), 60)
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request([], 5, session_id=first.session_id, min_tokens=10), 30)
        assert (
            caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_tokens" in caught.value.details()
        )
        resumed = client.generate(build_request([], 6, session_id=first.session_id, min_tokens=10), 60)
    assert len(resumed.token_ids) == 6


def test_stop_strings_are_held_back_too(coordinator_address: str) -> None:
    """As vLLM: a stop string completed before the output holds min_tokens tokens does not end it."""
    with CoordinatorClient(coordinator_address) as client:
        free = client.generate(build_request(PROMPTS[0], 32, ignore_eos=True), 60)
        stop = free.text[4:7]
        early = client.generate(build_request(PROMPTS[0], 32, ignore_eos=True, stop=[stop]), 60)
        assert early.finish_reason == "stop" and len(early.token_ids) < 8
        held = client.generate(
            build_request(PROMPTS[0], 32, ignore_eos=True, stop=[stop], min_tokens=len(early.token_ids) + 6),
            60,
        )
    assert held.token_ids == free.token_ids[: len(held.token_ids)]
    assert held.text.startswith(early.text + stop)  # the early stop string was sent as text
    assert len(held.token_ids) >= len(early.token_ids) + 6 or held.finish_reason == "length"
