"""Presence and frequency penalties (`SamplingParams.presence_penalty`, `frequency_penalty`): the math row by
row against a direct reference, then through the real services, where greedy output must equal a plain
decoding loop that applies them, a resumed request must count the same output, and the coupled rule's
seeded tokens must not depend on k."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.penalties import penalize_block
from specpipe.speculation.rounds import Verification
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.rounds import refused_round
from tests.sampling_checks import coupled_outputs_for_each_k

PRESENCE, FREQUENCY = 0.6, 0.9


def reference_row(
    logits: torch.Tensor, sequence: list[int], output_start: int, sampling: SamplingParams
) -> torch.Tensor:  # [vocab]
    """vLLM's order, written out: the repetition penalty over the whole sequence, then frequency and presence
    over the output."""
    row = logits.clone()
    for token in set(sequence):
        if sampling.repetition_penalty != 1.0:
            value = row[token]
            row[token] = (
                value * sampling.repetition_penalty if value < 0 else value / sampling.repetition_penalty
            )
    output = sequence[output_start:]
    for token in set(output):
        row[token] -= sampling.frequency_penalty * output.count(token)
        row[token] -= sampling.presence_penalty
    return row


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_each_row_is_penalized_over_the_output_and_the_block_before_it(repetition_penalty: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3  # [4, vocab]
    history, block = [3, 7, 7, 12, 49, 7], [11, 7, 3]
    sampling = SamplingParams(
        presence_penalty=PRESENCE,
        frequency_penalty=FREQUENCY,
        repetition_penalty=repetition_penalty,
        output_start=2,
    )
    got = penalize_block(logits, history, block, sampling)
    for i in range(4):
        expected = reference_row(logits[i], [*history, *block[:i]], 2, sampling)
        torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-6)
    # Token 3 is before the output (position 0): counted only once the window starts earlier.
    from_start = penalize_block(logits, history, block, dataclasses.replace(sampling, output_start=0))
    assert from_start[0, 3] < got[0, 3] and torch.equal(from_start[0, 11], got[0, 11])
    torch.testing.assert_close(penalize_block(logits, history, block, SamplingParams()), logits)  # off


def test_the_request_fields_are_checked_and_round_trip() -> None:
    sampling = SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0, output_start=9)
    again = SamplingParams.from_pb(sampling.to_pb())
    assert (again.presence_penalty, again.frequency_penalty, again.output_start) == (-1.5, 2.0, 9)
    assert not SamplingParams().to_pb().HasField("presence_penalty")
    assert SamplingParams(frequency_penalty=0.1).needs_applied_echo  # greedy too: the argmax moves
    assert "output_start" not in sampling.to_dict()  # per request, not a session's setting
    for name in ("presence_penalty", "frequency_penalty"):
        for bad in (-2.5, 2.01, float("inf")):
            with pytest.raises(InvalidArgumentError, match=name):
                SamplingParams(**{name: bad})


def test_the_draft_penalizes_each_step_as_the_target_does_its_row() -> None:
    from draft_service.drafter import DraftRequest, _Drafting

    torch.manual_seed(1)
    params = SamplingParams(presence_penalty=PRESENCE, frequency_penalty=FREQUENCY, output_start=2)
    history = [4, 9, 9, 17]
    drafting = _Drafting(DraftRequest("s", tuple(history), 3, params))
    steps = [torch.randn(1, 32) * 3 for _ in range(3)]  # [1, vocab] each
    for logits in steps:
        drafting.choose(logits)
    expected = penalize_block(torch.cat(steps), history, drafting.proposed, params)  # [3, vocab]
    assert drafting.proposed == expected.argmax(dim=-1).tolist()


def test_workers_that_drop_the_penalties_fail_the_round_with_failed_precondition() -> None:
    sampling = SamplingParams(presence_penalty=PRESENCE)  # greedy: the penalty still moves the argmax
    for applied in (None, SamplingParams()):
        refused = refused_round(sampling, [5, 6], Verification(2, 7, 0, applied_sampling=applied))
        assert isinstance(refused, FailedPreconditionError)


def reference_greedy(model_dir: Path, history: list[int], output_start: int, new_tokens: int) -> list[int]:
    """Plain greedy decoding, one full forward per token, with the penalties over history[output_start:] and
    what it generates."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(history)
    sampling = SamplingParams(presence_penalty=PRESENCE, frequency_penalty=FREQUENCY)
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()  # [vocab]
            ids.append(int(reference_row(logits, ids, output_start, sampling).argmax()))
    return ids[len(history) :]


def test_greedy_with_the_penalties_is_plain_decoding_with_them_also_on_a_later_turn_and_after_a_resume(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    prompt = [11, 42, 7, 99, 3, 64, 5]
    penalties = {"presence_penalty": PRESENCE, "frequency_penalty": FREQUENCY, "ignore_eos": True}
    with CoordinatorClient(coordinator_address) as client:
        plain = client.generate(build_request(prompt, 24, ignore_eos=True), 60).token_ids
        runs = {
            k: client.generate(build_request(prompt, 24, num_speculative_tokens=k, **penalties), 60)
            for k in (0, 3, None)
        }
        first = runs[None]
        # A later turn counts only its own output; a resumed request counts the output its turn began with.
        turn = [250, 18, 9]
        later = client.generate(build_request(turn, 12, session_id=first.session_id, **penalties), 60)
        resumed = client.generate(build_request([], 12, session_id=first.session_id, **penalties), 60)
    expected = reference_greedy(pipeline.pair.target_dir, prompt, len(prompt), 24)
    assert all(run.token_ids == expected for run in runs.values()), {k: r.token_ids for k, r in runs.items()}
    assert expected != plain  # the penalties changed the output: the test tests something
    history = [*prompt, *expected, *turn]
    both_parts = reference_greedy(pipeline.pair.target_dir, history, len(history), 24)
    assert later.token_ids == both_parts[:12] and resumed.token_ids == both_parts[12:]


def test_coupled_seeded_tokens_with_the_penalties_do_not_depend_on_k(pipeline: Pipeline) -> None:
    for seed in (1, 2):
        outputs = coupled_outputs_for_each_k(
            pipeline.coordinator_addr, PROMPTS[0], seed, (0, 2, 5, None),
            temperature=0.9, presence_penalty=PRESENCE, frequency_penalty=FREQUENCY,
        )  # fmt: skip
        assert all(output == outputs[0] for output in outputs), seed


def test_a_bad_penalty_is_invalid_argument(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(build_request(PROMPTS[0], 4, frequency_penalty=3.0), 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frequency_penalty" in caught.value.details()
