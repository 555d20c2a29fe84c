"""A pipelined proposal's first token guesses the target's bonus draw: with the flag it is drawn from q with
the target's uniform (stream TARGET_SAMPLE) and the proposals after it are the ones a fresh request makes."""

from __future__ import annotations

import pytest
import torch

from draft_service.drafter import DraftRequest, ModelDrafter
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import sampling_probs
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs
from tests.conftest import ModelPair


@pytest.fixture(scope="module")
def drafter(model_pair: ModelPair) -> ModelDrafter:
    runner = CausalLMRunner.load(model_pair.draft_dir, "cpu", "float32", max_cached_sessions=4)
    return ModelDrafter(runner, max_draft_tokens=8)


def test_guess_uses_the_target_uniform_and_later_tokens_are_plain_proposals(drafter: ModelDrafter) -> None:
    history = (5, 17, 42, 8, 99, 3)
    for seed in range(6):
        sampling = SamplingParams(temperature=0.9, seed=seed)
        guessed = drafter.propose(DraftRequest("g", history, 4, sampling, first_is_bonus_guess=True))
        with torch.inference_mode():
            logits = drafter.runner.forward("check", list(history), num_rows=1).logits
        q = sampling_probs(logits, sampling)[0]
        u = keyed_uniform(seed, len(history), RandomStream.TARGET_SAMPLE)
        assert guessed.token_ids[0] == sample_from_probs(q, u)
        fresh = drafter.propose(DraftRequest("f", (*history, guessed.token_ids[0]), 3, sampling))
        assert guessed.token_ids[1:] == fresh.token_ids
        assert guessed.draft_probs is not None and fresh.draft_probs is not None
        for (_, a), (_, b) in zip(guessed.draft_probs[1:], fresh.draft_probs, strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_guess_flag_changes_nothing_for_greedy(drafter: ModelDrafter) -> None:
    history = (5, 17, 42, 8, 99, 3)
    plain = drafter.propose(DraftRequest("a", history, 4, SamplingParams()))
    guessed = drafter.propose(DraftRequest("b", history, 4, SamplingParams(), first_is_bonus_guess=True))
    assert plain.token_ids == guessed.token_ids
