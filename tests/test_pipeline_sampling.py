"""Sampling through the running services: seeded reproducibility and the target's distribution."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe.client import AsyncCoordinatorClient, CoordinatorClient, build_request
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import sampling_probs
from tests.conftest import Pipeline

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


def target_first_token_probs(pipeline: Pipeline, sampling: SamplingParams) -> tuple[list[int], torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1:]
    return ids, sampling_probs(logits, sampling)[0]


async def first_tokens(address: str, prompt_ids: list[int], sampling: SamplingParams, n: int) -> list[int]:
    client = AsyncCoordinatorClient(address)
    limit = asyncio.Semaphore(8)

    async def one(seed: int) -> int:
        async with limit:
            request = build_request(
                prompt_ids, 2, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                seed=seed, num_speculative_tokens=2, acceptance=sampling.acceptance,
            )  # fmt: skip
            result = await client.generate(request, timeout_s=60)
            return result.token_ids[0]

    try:
        return list(await asyncio.gather(*(one(seed) for seed in range(n))))
    finally:
        await client.close()


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
    n = 600
    counts = Counter(asyncio.run(first_tokens(pipeline.coordinator_addr, prompt_ids, sampling, n)))
    assert set(counts) <= set(support), "a token outside the target's support was sampled"
    observed = [counts.get(t, 0) for t in support]
    expected = [float(p[t]) * n for t in support]
    scale = n / sum(expected)  # float32 probabilities sum to 1 only up to rounding
    result = stats.chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > 1e-3, (observed, expected)


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
    support = [int(t) for t in torch.nonzero(p).flatten()]
    n = 600
    counts = Counter(asyncio.run(first_tokens(pipeline.coordinator_addr, prompt_ids, sampling, n)))
    observed = [counts.get(t, 0) for t in support]
    expected = [float(p[t]) * n for t in support]
    scale = n / sum(expected)
    assert stats.chisquare(observed, [e * scale for e in expected]).pvalue > 1e-3
