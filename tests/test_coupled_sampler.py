"""The coupled rule: exact distribution, draft-invariant output, acceptance bound, determinism."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy import stats

from specpipe.sampling.coupled import coupled_noise, coupled_sample, verify_coupled

VOCAB = 8


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_probs(generator: torch.Generator, rows: int = 1) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, VOCAB, generator=generator) * 1.5, dim=-1)  # [rows, VOCAB]


def test_noise_is_a_pure_function_of_seed_and_position() -> None:
    assert torch.equal(coupled_noise(3, 10, VOCAB), coupled_noise(3, 10, VOCAB))
    assert not torch.equal(coupled_noise(3, 10, VOCAB), coupled_noise(3, 11, VOCAB))
    assert not torch.equal(coupled_noise(3, 10, VOCAB), coupled_noise(4, 10, VOCAB))
    assert bool((coupled_noise(0, 0, 4096) > 0).all())


def test_coupled_sample_follows_the_distribution() -> None:
    p = random_probs(torch.Generator().manual_seed(0))[0]
    n = 20_000
    counts = Counter(coupled_sample(p, seed=7, position=t) for t in range(n))
    observed = [counts.get(v, 0) for v in range(VOCAB)]
    assert stats.chisquare(observed, (p.double() * n).tolist()).pvalue > 1e-3


def test_zero_probability_tokens_never_win() -> None:
    p = torch.tensor([0.0, 0.5, 0.0, 0.5])
    assert {coupled_sample(p, 1, t) for t in range(500)} <= {1, 3}


def test_output_is_the_target_sample_whatever_the_draft() -> None:
    """Any draft block, any k: the emitted tokens are the target's own coupled samples."""
    generator = torch.Generator().manual_seed(1)
    for trial in range(300):
        k = trial % 6
        p = random_probs(generator, k + 1)  # [k + 1, VOCAB]
        drafts = torch.randint(0, VOCAB, (k,), generator=generator).tolist()
        start = 100 + trial
        # Draft tokens equal to the target's samples for a random-length prefix, then arbitrary.
        agree = trial % (k + 1)
        truth = [coupled_sample(p[i], 9, start + i) for i in range(k + 1)]
        drafts[:agree] = truth[:agree]
        result = verify_coupled(p, drafts, start, seed=9)
        assert list(result.output_token_ids) == truth[: result.num_accepted + 1]
        assert result.num_accepted >= agree


def test_equal_distributions_accept_everything() -> None:
    generator = torch.Generator().manual_seed(2)
    p = random_probs(generator, 5)
    drafts = [coupled_sample(p[i], 4, 50 + i) for i in range(4)]  # the draft samples q = p with the noise
    result = verify_coupled(p, drafts, 50, seed=4)
    assert result.num_accepted == 4 and not result.recovered


def test_acceptance_meets_the_coupling_bound() -> None:
    """P(accept) >= (1 - TV) / (1 + TV) for Gumbel-max coupling without communication."""
    generator = torch.Generator().manual_seed(3)
    p, q = random_probs(generator)[0], random_probs(generator)[0]
    tv = 0.5 * float((p - q).abs().sum())
    n = 5000
    accepted = sum(
        verify_coupled(p.unsqueeze(0).repeat(2, 1), [coupled_sample(q, 11, t)], t, seed=11).num_accepted
        for t in range(n)
    )
    assert accepted / n >= (1 - tv) / (1 + tv) - 0.03, (accepted / n, tv)
    assert accepted / n <= 1 - tv + 0.03  # never above the optimal coupling
