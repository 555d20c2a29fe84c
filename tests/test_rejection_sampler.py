"""Verification of draft blocks, layered like vLLM's tests/v1/sample/test_rejection_sampler.py.

1. hand-computed greedy (and forced) cases;
2. seeded determinism;
3. statistical exactness: the output token is distributed as the target's p whatever the draft's q;
4. the module equals an obviously-correct slow reference (plain Python floats), token for token;
5. argument validation.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import torch

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.draft_sampling import sample_draft_token
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import sampling_probs
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs
from specpipe.sampling.rejection_sampler import (
    VerificationResult,
    rejection_sample,
    verify_draft,
    verify_greedy,
)

VOCAB_SIZE = 8
FIRST_POSITION = 11


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------- reference


def _reference_inverse_cdf(weights: Sequence[float], u: float) -> int:
    total = 0.0
    for w in weights:
        total += w
    threshold = u * total
    acc = 0.0
    for index, w in enumerate(weights):
        acc += w
        if acc > threshold:
            return index
    return max(index for index, w in enumerate(weights) if w > 0)


def reference_rejection_sample(
    target_probs: torch.Tensor,  # [k + 1, vocab_size]
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, vocab_size]
    first_position: int,
    seed: int,
) -> VerificationResult:
    """Leviathan et al. 2023, Algorithm 1, one token at a time over Python floats."""
    p: list[list[float]] = target_probs.tolist()
    q: list[list[float]] | None = None if draft_probs is None else draft_probs.tolist()
    vocab_size = len(p[0])
    accepted: list[int] = []
    for i, x in enumerate(draft_token_ids):
        position = first_position + i
        q_row = q[i] if q is not None else None
        if q_row is None or q_row[x] == 0.0:  # point-mass proposal
            q_row = [1.0 if j == x else 0.0 for j in range(vocab_size)]
        u = keyed_uniform(seed, position, RandomStream.ACCEPT)
        if u < min(1.0, p[i][x] / q_row[x]):
            accepted.append(x)
            continue
        residual = [max(0.0, p_j - q_j) for p_j, q_j in zip(p[i], q_row, strict=True)]
        if sum(residual) == 0.0:
            residual = p[i]
        token = _reference_inverse_cdf(residual, keyed_uniform(seed, position, RandomStream.TARGET_SAMPLE))
        return VerificationResult(len(accepted), token, True, (*accepted, token))
    k = len(draft_token_ids)
    token = _reference_inverse_cdf(p[k], keyed_uniform(seed, first_position + k, RandomStream.TARGET_SAMPLE))
    return VerificationResult(k, token, False, (*accepted, token))


# --------------------------------------------------------------------------------------------- helpers


def _forced_logits(argmaxes: Sequence[int], vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """Logits [len(argmaxes), vocab_size] whose row i has its unique maximum at argmaxes[i]."""
    logits = torch.linspace(-1.0, 1.0, vocab_size).repeat(len(argmaxes), 1)
    logits[torch.arange(len(argmaxes)), torch.tensor(list(argmaxes))] = 10.0
    return logits


def _random_probs(rows: int, generator: torch.Generator, params: SamplingParams) -> torch.Tensor:
    return sampling_probs(torch.randn(rows, VOCAB_SIZE, generator=generator) * 1.5, params)


def _chi_square_pvalue(observed: Sequence[int], expected: Sequence[float]) -> float:
    try:
        from scipy.stats import chisquare
    except ImportError:  # Wilson-Hilferty approximation of the chi-square survival function
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
        df = len(observed) - 1
        z = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chisquare(observed, expected).pvalue)


def _total_variation(a: Sequence[float], b: Sequence[float]) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b, strict=True))


def _assert_distributed_as(counts: Counter[int], p: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """counts (tokens drawn) must follow p [vocab_size]: chi-square on the support, nothing off it."""
    n = sum(counts.values())
    target = p.tolist()
    support = [t for t in range(len(target)) if target[t] > 0]
    assert all(target[t] > 0 for t in counts), f"sampled a token with p = 0: {counts}"
    total = sum(target[t] for t in support)
    expected = [target[t] / total * n for t in support]
    pvalue = _chi_square_pvalue([counts[t] for t in support], expected)
    assert pvalue > 1e-3, f"chi-square p-value {pvalue}: counts {dict(counts)} vs expected {expected}"
    empirical = [counts[t] / n for t in range(len(target))]
    tv = _total_variation(empirical, [x / total for x in target])
    assert tv < 0.04, f"total variation {tv} to p"
    if q is not None:
        tv_draft = _total_variation(q.tolist(), target)
        if tv_draft > 0.2:
            assert tv < tv_draft / 5, f"output is closer to q (TV {tv_draft}) than expected (TV {tv})"


def _run_rounds(
    target_probs: torch.Tensor,  # [k + 1, vocab_size]
    draft_probs: torch.Tensor | None,  # [k, vocab_size]
    rounds: int,
    seed_base: int,
    draft_tokens: Callable[[int], list[int]] | None = None,
) -> list[VerificationResult]:
    """Independent rounds (one seed each): draft tokens x_i ~ q_i via sample_draft_token, then verify."""
    k = target_probs.shape[0] - 1
    results = []
    for r in range(rounds):
        seed = seed_base + r
        if draft_tokens is not None:
            draft = draft_tokens(seed)
        else:
            assert draft_probs is not None
            draft = [sample_draft_token(draft_probs[i], FIRST_POSITION + i, seed, False) for i in range(k)]
        results.append(rejection_sample(target_probs, draft, draft_probs, FIRST_POSITION, seed))
    return results


def _acceptance_bound(rate: float, expected: float, n: int) -> None:
    sigma = math.sqrt(max(expected * (1 - expected), 1e-12) / n)
    assert abs(rate - expected) < 5 * sigma + 1e-9, f"acceptance rate {rate}, expected {expected}"


# ------------------------------------------------------------------------------ (1) hand-computed cases


def test_greedy_all_accepted_gives_bonus() -> None:
    result = verify_greedy(_forced_logits([3, 1, 4, 2]), [3, 1, 4])
    assert result == VerificationResult(3, 2, False, (3, 1, 4, 2))


def test_greedy_first_rejected() -> None:
    result = verify_greedy(_forced_logits([3, 1, 4, 2]), [0, 1, 4])
    assert result == VerificationResult(0, 3, True, (3,))


def test_greedy_middle_rejected() -> None:
    result = verify_greedy(_forced_logits([3, 1, 4, 2]), [3, 5, 4])
    assert result == VerificationResult(1, 1, True, (3, 1))


def test_greedy_last_rejected() -> None:
    result = verify_greedy(_forced_logits([3, 1, 4, 2]), [3, 1, 7])
    assert result == VerificationResult(2, 4, True, (3, 1, 4))


def test_greedy_no_draft_is_plain_decoding() -> None:
    assert verify_greedy(_forced_logits([6]), []) == VerificationResult(0, 6, False, (6,))


def test_greedy_on_processed_probs_and_dispatch() -> None:
    probs = sampling_probs(_forced_logits([3, 1, 4, 2]), SamplingParams())
    expected = VerificationResult(1, 1, True, (3, 1))
    assert verify_greedy(probs, [3, 0, 4]) == expected
    assert verify_draft(probs, [3, 0, 4], None, FIRST_POSITION, seed=5, is_greedy=True) == expected
    assert verify_draft(probs, (3, 0, 4), probs[:3], 0, seed=5, is_greedy=True) == expected


def test_greedy_tie_takes_first_maximum() -> None:
    logits = torch.tensor([[1.0, 5.0, 5.0], [2.0, 2.0, 0.0]])
    assert verify_greedy(logits, [2]) == VerificationResult(0, 1, True, (1,))
    assert verify_greedy(logits, [1]) == VerificationResult(1, 0, False, (1, 0))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_hot_rejection_sampling_reduces_to_greedy(seed: int) -> None:
    target = sampling_probs(_forced_logits([3, 1, 4, 2]), SamplingParams())
    for draft in ([3, 1, 4], [0, 1, 4], [3, 5, 4], [3, 1, 7]):
        draft_probs = torch.nn.functional.one_hot(torch.tensor(draft), VOCAB_SIZE).float()
        expected = verify_greedy(target, draft)
        assert rejection_sample(target, draft, draft_probs, FIRST_POSITION, seed) == expected
        assert rejection_sample(target, draft, None, FIRST_POSITION, seed) == expected


def test_forced_rejection_and_forced_acceptance() -> None:
    # Position 0: p(x) = 0, so x is rejected whatever u; the residual max(0, p - q) is all on token 1.
    target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    draft_probs = torch.tensor([[0.5, 0.0, 0.5]])
    assert rejection_sample(target, [0], draft_probs, 0, seed=9) == VerificationResult(0, 1, True, (1,))
    # p(x) >= q(x) always accepts; the bonus token then comes from p_k at the next position.
    draft_probs = torch.tensor([[0.1, 0.8, 0.1]])
    result = rejection_sample(target, [1], draft_probs, 4, seed=9)
    bonus = sample_from_probs(target[1], keyed_uniform(9, 5, RandomStream.TARGET_SAMPLE))
    assert result == VerificationResult(1, bonus, False, (1, bonus))


def test_no_draft_samples_from_p_at_first_position() -> None:
    target = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    for seed in range(20):
        token = sample_from_probs(target[0], keyed_uniform(seed, 7, RandomStream.TARGET_SAMPLE))
        expected = VerificationResult(0, token, False, (token,))
        assert rejection_sample(target, [], None, 7, seed) == expected
        assert rejection_sample(target, [], torch.empty(0, 4), 7, seed) == expected


def test_residual_all_zero_falls_back_to_p() -> None:
    # p <= q everywhere (p = q / 2, not normalized): every rejection leaves an all-zero residual.
    draft_probs = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    target = torch.cat([draft_probs / 2, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    rejected = 0
    for seed in range(40):
        result = rejection_sample(target, [2], draft_probs, 0, seed)
        if result.recovered:
            rejected += 1
            u = keyed_uniform(seed, 0, RandomStream.TARGET_SAMPLE)
            assert result.next_token_id == sample_from_probs(target[0], u)
        else:
            assert result.output_token_ids == (2, 3)
    assert 0 < rejected < 40


def test_draft_token_outside_q_support_is_a_point_mass_proposal() -> None:
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    for case in range(50):
        target = _random_probs(3, generator, params)
        draft_probs = _random_probs(2, generator, SamplingParams(temperature=1.0, top_k=2))
        draft = [int(torch.nonzero(draft_probs[i] == 0)[case % 6, 0]) for i in range(2)]
        assert rejection_sample(target, draft, draft_probs, 3, case) == rejection_sample(
            target, draft, None, 3, case
        )


# -------------------------------------------------------------------------------- (2) determinism


def _random_case(rng: random.Random) -> tuple[torch.Tensor, list[int], torch.Tensor | None, int, int]:
    """A random verification input, deliberately covering the corners of the rule."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    k = rng.randrange(0, 6)
    params = rng.choice(
        [
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.7, top_k=3),
            SamplingParams(temperature=1.2, top_p=0.6),
            SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
        ]
    )
    target = _random_probs(k + 1, generator, params)
    kind = rng.choice(["sampled", "sampled", "random_ids", "point_mass", "equal", "half"])
    if kind == "point_mass":
        return (
            target,
            [rng.randrange(VOCAB_SIZE) for _ in range(k)],
            None,
            rng.randrange(1000),
            rng.randrange(2**64),
        )
    if kind == "equal":
        draft_probs = target[:k].clone()
    elif kind == "half":
        draft_probs = target[:k].clone()
        target = torch.cat([target[:k] / 2, target[k:]])
    else:
        draft_probs = _random_probs(k, generator, params)
    seed, first_position = rng.randrange(2**64), rng.randrange(1000)
    if kind == "random_ids":
        draft = [rng.randrange(VOCAB_SIZE) for _ in range(k)]
    else:
        draft = [sample_draft_token(draft_probs[i], first_position + i, seed, False) for i in range(k)]
    return target, draft, draft_probs, first_position, seed


def test_same_inputs_same_seed_same_result() -> None:
    rng = random.Random(1)
    for _ in range(100):
        case = _random_case(rng)
        first = rejection_sample(*case)
        for _ in range(3):
            assert rejection_sample(*case) == first
        assert verify_draft(*case, is_greedy=False) == first


def test_different_seed_changes_results_in_aggregate() -> None:
    generator = torch.Generator().manual_seed(2)
    params = SamplingParams(temperature=1.0)
    target, draft_probs = _random_probs(3, generator, params), _random_probs(2, generator, params)
    outputs: dict[int, list[tuple[int, ...]]] = {}
    for seed in (100, 200):
        outputs[seed] = [
            rejection_sample(target, [1, 2], draft_probs, pos, seed).output_token_ids for pos in range(200)
        ]
    differing = sum(a != b for a, b in zip(outputs[100], outputs[200], strict=True))
    assert differing > 50


def test_rejection_does_not_depend_on_later_draft_tokens() -> None:
    """Truncating the block right after its first rejection gives the same result (k is not a key)."""
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        target, draft, draft_probs, first_position, seed = _random_case(rng)
        result = rejection_sample(target, draft, draft_probs, first_position, seed)
        n = result.num_accepted
        if not result.recovered:
            continue
        short_q = None if draft_probs is None else draft_probs[: n + 1]
        short = rejection_sample(target[: n + 2], draft[: n + 1], short_q, first_position, seed)
        assert short == result
        checked += 1
    assert checked > 50


# ------------------------------------------------------------------- (3) statistical exactness, k = 1


ROUNDS = 4_000


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("temperature_1", SamplingParams(temperature=1.0)),
        ("top_k", SamplingParams(temperature=0.8, top_k=4)),
        ("top_p", SamplingParams(temperature=2.0, top_p=0.8)),
    ],
)
def test_output_is_distributed_as_p_for_random_q(name: str, params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    target = _random_probs(2, generator, params)
    draft_probs = _random_probs(1, generator, params)
    assert int((target[0] > 0).sum()) >= 3
    results = _run_rounds(target, draft_probs, ROUNDS, seed_base=1_000_000)
    _assert_distributed_as(Counter(r.output_token_ids[0] for r in results), target[0], draft_probs[0])
    accept_rate = sum(r.num_accepted for r in results) / ROUNDS
    _acceptance_bound(accept_rate, float(torch.minimum(target[0], draft_probs[0]).sum()), ROUNDS)


def test_output_is_distributed_as_p_for_disjoint_q() -> None:
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(4))
    logits[0, VOCAB_SIZE // 2 :] = float("-inf")
    target = sampling_probs(logits, SamplingParams(temperature=1.0))
    draft_logits = torch.randn(1, VOCAB_SIZE, generator=torch.Generator().manual_seed(5))
    draft_logits[0, : VOCAB_SIZE // 2] = float("-inf")
    draft_probs = sampling_probs(draft_logits, SamplingParams(temperature=1.0))
    results = _run_rounds(target, draft_probs, ROUNDS // 2, seed_base=2_000_000)
    assert all(r.recovered and r.num_accepted == 0 for r in results)
    _assert_distributed_as(Counter(r.next_token_id for r in results), target[0], draft_probs[0])


def test_output_is_distributed_as_p_for_q_equal_to_p() -> None:
    target = _random_probs(2, torch.Generator().manual_seed(6), SamplingParams(temperature=1.0))
    results = _run_rounds(target, target[:1].clone(), ROUNDS // 2, seed_base=3_000_000)
    assert all(r.num_accepted == 1 and not r.recovered for r in results)
    _assert_distributed_as(Counter(r.output_token_ids[0] for r in results), target[0])
    _assert_distributed_as(Counter(r.output_token_ids[1] for r in results), target[1])


@pytest.mark.parametrize("token", [2, 5])
def test_output_is_distributed_as_p_for_point_mass_draft(token: int) -> None:
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(7))
    logits[0, 5] = float("-inf")  # token 5 has p = 0: always rejected
    target = sampling_probs(logits, SamplingParams(temperature=1.0))
    results = _run_rounds(target, None, ROUNDS // 2, seed_base=4_000_000, draft_tokens=lambda _: [token])
    _assert_distributed_as(Counter(r.output_token_ids[0] for r in results), target[0])
    accept_rate = sum(r.num_accepted for r in results) / len(results)
    _acceptance_bound(accept_rate, float(target[0, token]), len(results))


def test_output_is_distributed_as_p_for_draft_outside_q_support() -> None:
    generator = torch.Generator().manual_seed(8)
    target = _random_probs(2, generator, SamplingParams(temperature=1.0))
    draft_probs = _random_probs(1, generator, SamplingParams(temperature=1.0, top_k=3))
    outside = int(torch.nonzero(draft_probs[0] == 0)[0, 0])
    results = _run_rounds(
        target, draft_probs, ROUNDS // 2, seed_base=5_000_000, draft_tokens=lambda _: [outside]
    )
    _assert_distributed_as(Counter(r.output_token_ids[0] for r in results), target[0])


def test_second_position_is_distributed_as_p_given_first_accepted() -> None:
    generator = torch.Generator().manual_seed(9)
    params = SamplingParams(temperature=1.0)
    target = _random_probs(3, generator, params)
    # q_0 close to p_0, so most blocks get past the first token; q_1 is an unrelated distribution.
    draft_probs = torch.stack([0.8 * target[0] + 0.2 / VOCAB_SIZE, _random_probs(1, generator, params)[0]])
    results = _run_rounds(target, draft_probs, ROUNDS, seed_base=6_000_000)
    _assert_distributed_as(Counter(r.output_token_ids[0] for r in results), target[0])
    second = Counter(r.output_token_ids[1] for r in results if r.num_accepted >= 1)
    assert sum(second.values()) > ROUNDS // 2
    _assert_distributed_as(second, target[1], draft_probs[1])


# -------------------------------------------------------------------- (4) optimized vs reference


def test_matches_reference_implementation() -> None:
    rng = random.Random(10)
    outcomes: Counter[str] = Counter()
    for _ in range(800):
        case = _random_case(rng)
        result = rejection_sample(*case)
        assert result == reference_rejection_sample(*case), case
        assert result.output_token_ids[-1] == result.next_token_id
        assert len(result.output_token_ids) == result.num_accepted + 1
        outcomes["recovered" if result.recovered else "bonus"] += 1
    assert outcomes["recovered"] > 100 and outcomes["bonus"] > 100


def test_reference_and_module_agree_on_large_vocab() -> None:
    generator = torch.Generator().manual_seed(11)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    for seed in range(30):
        target = sampling_probs(torch.randn(4, 5_000, generator=generator), params)
        draft_probs = sampling_probs(torch.randn(3, 5_000, generator=generator), params)
        draft = [sample_draft_token(draft_probs[i], 40 + i, seed, False) for i in range(3)]
        case = (target, draft, draft_probs, 40, seed)
        assert rejection_sample(*case) == reference_rejection_sample(*case)


# ------------------------------------------------------------------------------------ (5) validation


@pytest.mark.parametrize(
    ("target_shape", "draft", "draft_shape", "first_position", "message"),
    [
        ((3, 8), [1], None, 0, "target_probs must have shape"),
        ((8,), [], None, 0, "target_probs must have shape"),
        ((2, 8), [8], None, 0, "draft token id 8 is out of range"),
        ((2, 8), [-1], None, 0, "draft token id -1 is out of range"),
        ((2, 8), [1], (2, 8), 0, "draft_probs must have shape"),
        ((2, 8), [1], (1, 7), 0, "draft_probs must have shape"),
        ((2, 8), [1], None, -1, "first_position"),
    ],
)
def test_rejection_sample_rejects_bad_input(
    target_shape: tuple[int, ...],
    draft: list[int],
    draft_shape: tuple[int, int] | None,
    first_position: int,
    message: str,
) -> None:
    target = torch.full(target_shape, 1.0 / 8)
    draft_probs = None if draft_shape is None else torch.full(draft_shape, 1.0 / 8)
    with pytest.raises(InvalidArgumentError, match=message):
        rejection_sample(target, draft, draft_probs, first_position, seed=0)


def test_verify_greedy_rejects_bad_input() -> None:
    with pytest.raises(InvalidArgumentError, match="target_probs must have shape"):
        verify_greedy(torch.zeros(2, 8), [])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        verify_greedy(torch.zeros(2, 8), [9])
