"""Checks that sampled output through the services keeps the target's distribution, shared by the tests of
each sampling field: the first token's frequencies (chi-square), and the coupled rule's seeded tokens for
every k."""

from __future__ import annotations

import asyncio
from collections import Counter

import torch
from scipy import stats

from specpipe.client import AsyncCoordinatorClient, CoordinatorClient, build_request


def first_tokens(address: str, prompt_ids: list[int], n: int, **fields: object) -> Counter[int]:
    """The first token of n requests with seeds 0..n-1 and a 2-token draft (so it goes through the draft and
    the acceptance rule), counted."""

    async def gather() -> list[int]:
        async with AsyncCoordinatorClient(address) as client:
            limit = asyncio.Semaphore(8)

            async def one(seed: int) -> int:
                async with limit:
                    request = build_request(prompt_ids, 2, seed=seed, num_speculative_tokens=2, **fields)
                    return (await client.generate(request, timeout_s=60)).token_ids[0]

            return list(await asyncio.gather(*(one(seed) for seed in range(n))))

    return Counter(asyncio.run(gather()))


def assert_distributed_as(counts: Counter[int], p: torch.Tensor) -> None:
    """Every sampled token in p's support, and the counts consistent with p (chi-square, p-value > 1e-3)."""
    support = [int(t) for t in torch.nonzero(p).flatten()]
    assert set(counts) <= set(support), "a token outside the target's support was sampled"
    n = sum(counts.values())
    observed = [counts.get(t, 0) for t in support]
    expected = [float(p[t]) * n for t in support]
    scale = n / sum(expected)  # float32 probabilities sum to 1 only up to rounding
    result = stats.chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > 1e-3, (observed, expected)


def coupled_outputs_for_each_k(
    address: str, prompt: str, seed: int, ks: tuple[int | None, ...], **fields: object
) -> list[list[int]]:
    """A seeded coupled-rule request's tokens for each k (None = adaptive): plain seeded sampling's own, so
    equal for every k exactly when each verify row and draft step processed the logits as plain decoding."""
    with CoordinatorClient(address) as client:
        return [
            client.generate(
                build_request(
                    prompt,
                    32,
                    seed=seed,
                    acceptance="coupled",
                    num_speculative_tokens=k,
                    **fields,
                ),
                60,
            ).token_ids
            for k in ks
        ]
