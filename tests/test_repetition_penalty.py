"""The repetition penalty (`SamplingParams.repetition_penalty`): the math against Hugging Face's processor row
by row, then through the real services, where greedy output must equal `generate(repetition_penalty=...)`
and the coupled rule's seeded tokens must not depend on k."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import InvalidArgumentError
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.penalties import penalize_block
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.sampling_checks import coupled_outputs_for_each_k

PENALTY = 1.3
MAX_NEW_TOKENS = 24


def test_each_row_is_penalized_over_the_history_and_the_block_before_it() -> None:
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab) * 3  # [4, vocab]: positive and negative logits
    history, block = [3, 7, 7, 12, 49], [11, 20, 3]
    got = penalize_block(logits, history, block, SamplingParams(repetition_penalty=PENALTY))
    processor = RepetitionPenaltyLogitsProcessor(PENALTY)
    for i in range(4):
        ids = torch.tensor([[*history, *block[:i]]])
        torch.testing.assert_close(got[i : i + 1], processor(ids, logits[i : i + 1].clone()), rtol=0, atol=0)
    assert got[0, 11] == logits[0, 11] and got[1, 11] != logits[1, 11]  # block[0] counts from row 1 on
    torch.testing.assert_close(penalize_block(logits, history, block, SamplingParams()), logits)  # 1: off


def test_the_request_field_is_checked_and_round_trips() -> None:
    for value in (1.0, 0.8, PENALTY):
        assert (
            SamplingParams.from_pb(SamplingParams(repetition_penalty=value).to_pb()).repetition_penalty
            == value
        )
    assert not SamplingParams().to_pb().HasField("repetition_penalty")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgumentError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)


def test_greedy_with_a_penalty_equals_generate_with_it(pipeline: Pipeline, coordinator_address: str) -> None:
    prompts = PROMPTS[:6]
    expected = target_alone(pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS, repetition_penalty=PENALTY)
    plain = {}
    with CoordinatorClient(coordinator_address) as client:
        for k in (None, 0, 3):
            for prompt in prompts:
                request = build_request(
                    prompt, MAX_NEW_TOKENS, num_speculative_tokens=k, repetition_penalty=PENALTY
                )
                assert client.generate(request, 60).token_ids == expected[prompt], (k, prompt)
        for prompt in prompts:
            plain[prompt] = client.generate(build_request(prompt, MAX_NEW_TOKENS), 60).token_ids
    assert plain != expected  # the penalty changed some outputs: the test tests something


def test_coupled_seeded_tokens_with_a_penalty_do_not_depend_on_k(pipeline: Pipeline) -> None:
    """Under the coupled rule every token is the target's own seeded sample, so k = 0 (plain decoding through
    the target) and speculation give the same tokens only if each verify row applied the penalty over
    exactly the tokens before its position, as the plain step there did."""
    for seed in (1, 2):
        outputs = coupled_outputs_for_each_k(
            pipeline.coordinator_addr, PROMPTS[0], seed, (0, 2, 5, None), temperature=0.9,
            repetition_penalty=PENALTY,
        )  # fmt: skip
        assert all(output == outputs[0] for output in outputs), seed


def test_a_bad_penalty_is_invalid_argument(pipeline: Pipeline) -> None:
    import grpc

    request = build_request(PROMPTS[0], 4)
    request.sampling.repetition_penalty = -0.5
    with CoordinatorClient(pipeline.coordinator_addr) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(request, 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repetition_penalty" in caught.value.details()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_draft_penalizes_each_step_as_the_target_does_its_row(temperature: float) -> None:
    """The draft's tokens (greedy) and q (sampled) come from the penalized logits over its history and the
    tokens it drafted before, the rows the target's verify scores: exactness does not need it (the target
    decides), acceptance does."""
    from draft_service.drafter import DraftRequest, _Drafting
    from specpipe.sampling.processing import sampling_probs

    torch.manual_seed(1)
    params = SamplingParams(temperature=temperature, seed=3, repetition_penalty=PENALTY)
    history = [4, 9, 9, 17]
    drafting = _Drafting(DraftRequest("s", tuple(history), 3, params))
    steps = [torch.randn(1, 32) * 3 for _ in range(3)]  # [1, vocab] each
    for logits in steps:
        drafting.choose(logits)
    drafted = drafting.proposed
    expected = penalize_block(torch.cat(steps), history, drafted, params)  # [3, vocab]
    if temperature == 0.0:
        assert drafted == expected.argmax(dim=-1).tolist()
    else:
        torch.testing.assert_close(
            torch.stack(drafting.q_rows), sampling_probs(expected, params), rtol=0, atol=0
        )


def test_workers_that_drop_the_penalty_fail_the_round_with_failed_precondition() -> None:
    """A worker older than the penalty drops the field (a draft worker on the way to the target, or the
    target): the verdict then says no penalty was applied, and the coordinator refuses the round before
    committing it."""
    from specpipe.errors import FailedPreconditionError
    from specpipe.speculation.rounds import Verification
    from tests.rounds import refused_round

    sampling = SamplingParams(repetition_penalty=PENALTY)
    refused = refused_round(sampling, [5, 6], Verification(2, 7, 0))
    assert isinstance(refused, FailedPreconditionError) and "repetition_penalty" in str(refused)
