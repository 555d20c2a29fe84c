"""The coupled acceptance rule: draft and target sample with the same noise (Gumbel-max coupling).

At absolute position t a noise vector E_t (one Exp(1) draw per vocabulary entry) is a pure function of
(seed, t). Any distribution r is sampled as the exponential race argmax_v r(v) / E_t(v), which is an exact
sample from r (the Gumbel-max trick in exponential form). The draft samples its token y_t from q with E_t;
the target computes its own sample x_t from p with the same E_t:

- accepted tokens: leading positions where y_t == x_t;
- recovered token: x_t at the first position where they differ;
- bonus token: x_t at the position after a fully accepted block.

So every emitted token is x_t, the target's own sample: the output is exactly distributed as p, and it is
the same token sequence whatever the draft proposed, whatever k was, and whether the draft was reachable at
all (plain decoding, k = 0, emits x_t too). That is what makes seeded sampling survive failover, adaptive
k and draft outages unchanged. The price: acceptance is P(argmax q/E == argmax p/E), at least
(1 - TV) / (1 + TV), below the Leviathan rule's 1 - TV. Greedy requests never use noise.

Torch only; no grpc or redis imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.randomness import RandomStream, keyed_uniform
from specpipe.sampling.rejection_sampler import VerificationResult


def coupled_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """E_t: [vocab_size] float64 Exp(1) draws, a pure function of (seed, position) (CPU generator)."""
    generator = torch.Generator().manual_seed(
        int(keyed_uniform(seed, position, RandomStream.COUPLED_NOISE) * 2**53)
    )
    uniform = torch.rand(vocab_size, generator=generator, dtype=torch.float64)  # [vocab_size] in [0, 1)
    return -torch.log1p(-uniform)  # Exp(1); log1p(-u) stays finite because u < 1


def coupled_sample(probs: torch.Tensor, seed: int, position: int) -> int:
    """The exponential race argmax_v probs(v) / E_t(v): an exact sample from probs.

    probs: [vocab_size], non-negative (need not be normalized); entries of 0 can never win.
    """
    if probs.dim() != 1 or probs.numel() == 0:
        raise InvalidArgumentError(f"probs must be a non-empty 1-D tensor, got shape {tuple(probs.shape)}")
    weights = probs.to(torch.float64)
    if not bool((weights > 0).any()):
        raise InvalidArgumentError("probs has no positive entry")
    race = weights / coupled_noise(seed, position, weights.numel())  # [vocab_size]
    return int(race.argmax())


def verify_coupled(
    target_probs: torch.Tensor,  # [k + 1, vocab_size]
    draft_token_ids: Sequence[int],  # [k]
    first_position: int,
    seed: int,
) -> VerificationResult:
    """Accepts draft tokens while they equal the target's coupled sample; then emits the target's sample."""
    k = len(draft_token_ids)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise InvalidArgumentError(
            f"target_probs must have shape [{k + 1}, vocab_size], got {tuple(target_probs.shape)}"
        )
    accepted: list[int] = []
    for i in range(k + 1):
        target_token = coupled_sample(target_probs[i], seed, first_position + i)
        if i < k and draft_token_ids[i] == target_token:
            accepted.append(target_token)
            continue
        return VerificationResult(
            num_accepted=i,
            next_token_id=target_token,
            recovered=i < k,
            output_token_ids=(*accepted, target_token),
        )
    raise AssertionError("unreachable: the loop returns at i == k")
