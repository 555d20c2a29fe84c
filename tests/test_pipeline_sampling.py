"""Sampling through the running services: seeded reproducibility and the target's distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe.client import CoordinatorClient, build_request
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import sampling_probs
from tests.conftest import Pipeline
from tests.sampling_checks import assert_distributed_as, first_tokens

PROMPT = "def fibonacci(n):"


@pytest.mark.parametrize("k", [1, 4])
def test_seeded_request_is_reproducible(pipeline: Pipeline, k: int) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        runs = [
            client.generate(build_request(PROMPT, 32, temperature=0.8, top_p=0.95, seed=seed,
                                          num_speculative_tokens=k), timeout_s=60).token_ids
            for seed in (7, 7, 8)
        ]  # fmt: skip
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_an_unseeded_sampled_request_draws_its_own_seed(pipeline: Pipeline) -> None:
    from coordinator.request import GenerationRequest, RequestLimits

    limits = RequestLimits(max_new_tokens=64, max_speculative_tokens=8, default_speculative_tokens=None)
    unseeded = build_request(PROMPT, 16, temperature=1.0, seed=None)
    assert not unseeded.sampling.HasField("seed")
    seeds = {GenerationRequest.from_pb(unseeded, limits).sampling.seed for _ in range(4)}
    assert len(seeds) == 4  # drawn per request
    greedy = build_request(PROMPT, 16, seed=None)
    assert GenerationRequest.from_pb(greedy, limits).sampling.seed == 0  # nothing to key
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        outputs = {tuple(client.generate(unseeded, timeout_s=60).token_ids) for _ in range(4)}
    assert len(outputs) > 1  # as vLLM's and OpenAI's sampling without a seed; a seed repeats (above)


def request_fields(sampling: SamplingParams) -> dict[str, object]:
    """build_request's fields for a SamplingParams of temperature, top-k, top-p, min-p and the rule."""
    return {
        "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
        "min_p": sampling.min_p, "acceptance": sampling.acceptance,
    }  # fmt: skip


def target_first_token_probs(pipeline: Pipeline, sampling: SamplingParams) -> tuple[list[int], torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1:]
    return ids, sampling_probs(logits, sampling)[0]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=1.0, top_k=6),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8),
    ],
    ids=["top-k", "top-p", "temperature-top-k-top-p"],
)
def test_first_token_follows_the_target_distribution(pipeline: Pipeline, sampling: SamplingParams) -> None:
    """The first generated token goes through the draft + accept/reject path; it must be distributed as p."""
    prompt_ids, p = target_first_token_probs(pipeline, sampling)
    support = [int(t) for t in torch.nonzero(p).flatten()]
    assert 2 <= len(support) <= 16, "choose params with a small support so the chi-square test has power"
    counts = first_tokens(pipeline.coordinator_addr, prompt_ids, 600, **request_fields(sampling))
    assert_distributed_as(counts, p)


def test_coupled_rule_gives_the_same_tokens_for_any_k(pipeline: Pipeline) -> None:
    """Under the coupled rule a seeded request yields plain seeded sampling's tokens, whatever k."""
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for seed in range(4):
            runs = {
                k: client.generate(
                    build_request(
                        PROMPT,
                        32,
                        temperature=0.9,
                        top_p=0.95,
                        seed=seed,
                        num_speculative_tokens=k,
                        acceptance="coupled",
                    ),
                    timeout_s=60,
                )  # fmt: skip
                for k in (0, 1, 3, 8, None)
            }
            assert len({tuple(r.token_ids) for r in runs.values()}) == 1, seed
            assert runs[3].usage is not None and runs[3].usage.accepted_tokens > 0


def test_coupled_first_token_follows_the_target_distribution(pipeline: Pipeline) -> None:
    sampling = SamplingParams(temperature=1.0, top_k=6, acceptance="coupled")
    prompt_ids, p = target_first_token_probs(pipeline, sampling)
    assert_distributed_as(
        first_tokens(pipeline.coordinator_addr, prompt_ids, 600, **request_fields(sampling)), p
    )
