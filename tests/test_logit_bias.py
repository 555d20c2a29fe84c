"""Logit bias (`SamplingParams.logit_bias`): the math by hand, the request field, then through the real
services, where greedy output must equal Hugging Face's `generate(sequence_bias=...)` (single-token biases)
and the coupled rule's seeded tokens must not depend on k."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.logit_bias import bias_logits
from specpipe.sampling.params import MAX_LOGIT_BIAS_TOKENS, SamplingParams
from specpipe.speculation.rounds import Verification
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.rounds import refused_round
from tests.sampling_checks import assert_distributed_as, coupled_outputs_for_each_k, first_tokens

MAX_NEW_TOKENS = 24


def test_every_row_gets_the_bias_and_ids_past_the_vocabulary_are_left_out() -> None:
    logits = torch.zeros(3, 5)  # [3, 5]
    biased = bias_logits(logits, ((1, 2.5), (4, -100.0), (9, 7.0)))
    assert torch.equal(biased, torch.tensor([[0.0, 2.5, 0.0, 0.0, -100.0]] * 3))
    assert torch.equal(logits, torch.zeros(3, 5))  # a new tensor


def test_the_request_field_is_checked_and_round_trips() -> None:
    sampling = SamplingParams(logit_bias=((3, -100.0), (17, 2.5)))
    assert SamplingParams.from_pb(sampling.to_pb()).logit_bias == sampling.logit_bias
    assert sampling.to_dict()["logit_bias"] == {"3": -100.0, "17": 2.5}
    assert sampling.needs_applied_echo  # greedy too: a bias moves the argmax
    for bad in (((3, 100.5),), ((-1, 1.0),), ((3, float("nan")),)):
        with pytest.raises(InvalidArgumentError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(InvalidArgumentError, match="at most"):
        SamplingParams(logit_bias=tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS_TOKENS + 1)))


def test_workers_that_drop_the_bias_fail_the_round_with_failed_precondition() -> None:
    sampling = SamplingParams(logit_bias=((5, 3.0),))
    refused = refused_round(sampling, [5, 6], Verification(2, 7, 0, applied_sampling=None))
    assert isinstance(refused, FailedPreconditionError)


def biases_for(pipeline: Pipeline) -> dict[int, float]:
    """Ban the token the plain greedy outputs use most, and favour another: biases that change outputs."""
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        tokens = [
            t for p in PROMPTS[:4] for t in client.generate(build_request(p, MAX_NEW_TOKENS), 60).token_ids
        ]
    most = max(set(tokens), key=tokens.count)
    return {most: -100.0, (most + 1) % 200: 4.0}


def test_greedy_with_a_bias_equals_generate_with_it(pipeline: Pipeline, coordinator_address: str) -> None:
    prompts = PROMPTS[:4]
    bias = biases_for(pipeline)
    sequence_bias = {(token,): value for token, value in bias.items()}
    expected = target_alone(pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS, sequence_bias=sequence_bias)
    with CoordinatorClient(coordinator_address) as client:
        for k in (None, 0, 3):
            for prompt in prompts:
                request = build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=k, logit_bias=bias)
                assert client.generate(request, 60).token_ids == expected[prompt], (k, prompt)
        plain = {p: client.generate(build_request(p, MAX_NEW_TOKENS), 60).token_ids for p in prompts}
    assert plain != expected  # the bias changed some outputs: the test tests something
    banned = min(bias, key=bias.__getitem__)
    assert all(banned not in tokens for tokens in expected.values())


def test_coupled_seeded_tokens_with_a_bias_do_not_depend_on_k(pipeline: Pipeline) -> None:
    bias = biases_for(pipeline)
    for seed in (1, 2):
        outputs = coupled_outputs_for_each_k(
            pipeline.coordinator_addr, PROMPTS[0], seed, (0, 2, 5, None), temperature=0.9, logit_bias=bias
        )
        assert all(output == outputs[0] for output in outputs), seed


def test_a_bad_bias_or_an_unknown_token_is_invalid_argument(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for bias, field in (({5: 150.0}, "logit_bias"), ({10**6: 1.0}, "logit_bias ids")):
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(build_request(PROMPTS[0], 4, logit_bias=bias), 30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in caught.value.details()


def test_first_token_follows_the_biased_target_distribution(pipeline: Pipeline) -> None:
    """Through the draft and the Leviathan rule (q and p both biased): never the banned token, and the
    biased p's frequencies."""
    from specpipe.sampling.processing import sampling_probs
    from tests.test_pipeline_sampling import PROMPT

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1:]  # [1, vocab]
    ranked = logits[0].argsort(descending=True).tolist()
    bias = {ranked[0]: -100.0, ranked[7]: 3.0}  # ban the likeliest, lift one from outside the top 6
    sampling = SamplingParams(temperature=1.0, top_k=6, logit_bias=tuple(sorted(bias.items())))
    p = sampling_probs(bias_logits(logits, sampling.logit_bias), sampling)[0]
    assert p[ranked[0]] == 0 and p[ranked[7]] > 0
    counts = first_tokens(
        pipeline.coordinator_addr, prompt_ids, 400, temperature=1.0, top_k=6, logit_bias=bias
    )
    assert_distributed_as(counts, p)
