"""Min-p sampling (`SamplingParams.min_p`): the filter against Hugging Face's warper bit for bit, the target's
echo of the sampling it applied, and the services, where the coupled rule's seeded tokens must not depend on
k and the first token must follow the target's min-p distribution."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import sampling_probs
from specpipe.speculation.rounds import Verification
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.rounds import refused_round
from tests.sampling_checks import assert_distributed_as, coupled_outputs_for_each_k, first_tokens
from tests.test_pipeline_sampling import PROMPT, request_fields, target_first_token_probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 0, 1.0, 0.05), (0.7, 0, 1.0, 0.2), (0.9, 20, 0.9, 0.1), (1.3, 0, 1.0, 1.0)],
)
def test_min_p_matches_transformers_bit_for_bit(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(3)) * 3.0  # [6, 97]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))  # after top-k and top-p, as generate orders them
    expected = torch.softmax(warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone()), dim=-1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = sampling_probs(logits, params)
    assert torch.equal(got, expected)
    assert (got > 0).sum() < (sampling_probs(logits, SamplingParams(temperature=temperature)) > 0).sum()


def test_min_p_by_hand_and_the_request_field() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, min_p=0.25))  # threshold 0.125
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    for value in (0.0, 0.05, 1.0):
        assert SamplingParams.from_pb(SamplingParams(min_p=value).to_pb()).min_p == pytest.approx(value)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match="min_p"):
            SamplingParams(min_p=bad)
    assert not SamplingParams(min_p=0.1).needs_applied_echo  # greedy ignores min_p
    assert SamplingParams(temperature=0.8, min_p=0.1).needs_applied_echo


def test_the_target_echoes_the_sampling_it_applied_only_where_needed() -> None:
    from target_service.verifier import Verdict

    # As a request's sampling arrives: from the wire, its floats float32 values.
    sampling = SamplingParams.from_pb(SamplingParams(temperature=0.8, min_p=0.1, seed=4).to_pb())
    echoed = Verdict(1, 2, False, 0, 0, applied_sampling=sampling).to_pb()
    assert echoed.HasField("applied_sampling") and SamplingParams.from_pb(echoed.applied_sampling) == sampling
    assert not Verdict(1, 2, False, 0, 0).to_pb().HasField("applied_sampling")


def test_workers_that_drop_min_p_fail_the_round_with_failed_precondition() -> None:
    """A worker older than min_p drops it (the target, or a draft worker passing the request on): the verdict
    then carries no echo, or one without min_p, and the coordinator refuses the round before committing it."""
    sampling = SamplingParams(temperature=0.8, min_p=0.1)
    for applied in (None, SamplingParams(temperature=0.8)):
        refused = refused_round(sampling, [5, 6], Verification(2, 7, 0, applied_sampling=applied))
        assert isinstance(refused, FailedPreconditionError) and "min_p" in str(refused)


def test_coupled_seeded_tokens_with_min_p_do_not_depend_on_k(coordinator_address: str) -> None:
    """Under the coupled rule every token is the target's own seeded sample, so k = 0 and speculation give
    the same tokens only if every verify row applied min-p, as the plain step did."""
    changed = False
    for seed in (1, 2):
        outputs = coupled_outputs_for_each_k(
            coordinator_address, PROMPTS[1], seed, (0, 3, None), temperature=1.2, min_p=0.15
        )
        assert all(output == outputs[0] for output in outputs), seed
        (unfiltered,) = coupled_outputs_for_each_k(
            coordinator_address, PROMPTS[1], seed, (None,), temperature=1.2
        )
        changed |= unfiltered != outputs[0]
    assert changed, "min-p changed no output: the test tests nothing"


def test_first_token_follows_the_targets_min_p_distribution(pipeline: Pipeline) -> None:
    """Through the draft and the Leviathan rule: never a token min-p removed, and p's frequencies."""
    sampling = SamplingParams(temperature=1.0, min_p=0.3)
    prompt_ids, p = target_first_token_probs(pipeline, sampling)
    assert 2 <= int((p > 0).sum()) <= 16, (
        "choose params with a small support so the chi-square test has power"
    )
    assert_distributed_as(
        first_tokens(pipeline.coordinator_addr, prompt_ids, 400, **request_fields(sampling)), p
    )


def test_a_bad_min_p_is_invalid_argument(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(build_request(PROMPT, 4, temperature=1.0, min_p=1.5), 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_p" in caught.value.details()
