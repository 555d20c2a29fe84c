"""The draft-length policy: hand-checked optima, the estimator, and a comparison with HF's +2/-1 rule."""

from __future__ import annotations

import random

import pytest

from specpipe.speculation.adaptive_k import (
    HF_HEURISTIC_START,
    PROBE_INTERVAL,
    AcceptanceEstimator,
    CostProfile,
    DraftLengthPolicy,
    best_draft_length,
    expected_tokens,
)


def test_expected_tokens_matches_the_formula() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_free_draft_and_perfect_acceptance_use_max_k() -> None:
    costs = CostProfile(draft_token_s=0.0, verify_base_s=1.0, verify_token_s=0.0, round_overhead_s=0.0)
    assert best_draft_length(0.99, costs, 8) == 8


def test_costly_draft_with_poor_acceptance_means_plain_decoding() -> None:
    costs = CostProfile(draft_token_s=0.5, verify_base_s=1.0, verify_token_s=0.1, round_overhead_s=0.0)
    assert best_draft_length(0.1, costs, 8) == 0


def test_hand_computed_optimum() -> None:
    # c = 0.1, verify grows 5% per token: rates for k = 0..3 at alpha = 0.7 are 1.0, 1.478, 1.741, 1.853...
    costs = CostProfile(draft_token_s=0.1, verify_base_s=1.0, verify_token_s=0.05, round_overhead_s=0.0)
    rates = [expected_tokens(0.7, k) / costs.round_time(k) for k in range(9)]
    assert best_draft_length(0.7, costs, 8) == max(range(9), key=rates.__getitem__)
    assert 3 <= best_draft_length(0.7, costs, 8) <= 6


def test_estimator_converges_to_the_true_acceptance() -> None:
    rng = random.Random(0)
    estimator = AcceptanceEstimator(decay=0.98)
    for _ in range(2000):
        k = 4
        accepted = 0
        while accepted < k and rng.random() < 0.8:
            accepted += 1
        estimator.record(k, accepted)
    assert estimator.alpha == pytest.approx(0.8, abs=0.05)


def simulate(policy_next, policy_record, alpha_of_round, costs: CostProfile, rounds: int, seed: int) -> float:
    """Tokens per unit time of a policy on a simulated session whose acceptance varies."""
    rng = random.Random(seed)
    tokens = 0
    elapsed = 0.0
    for i in range(rounds):
        k = policy_next()
        accepted = 0
        while accepted < k and rng.random() < alpha_of_round(i):
            accepted += 1
        tokens += accepted + 1
        elapsed += costs.round_time(k)
        policy_record(k, accepted)
    return tokens / elapsed


class HfHeuristic:
    """Hugging Face's candidate_generator schedule: +2 after a fully accepted block, -1 otherwise."""

    def __init__(self, initial_k: int, max_k: int) -> None:
        self.k = initial_k
        self.max_k = max_k

    def next_k(self) -> int:
        return self.k

    def record(self, k: int, accepted: int) -> None:
        self.k = min(self.max_k, k + 2) if accepted == k else max(1, k - 1)


SCENARIOS = {
    "constant-0.7": lambda i: 0.7,
    "constant-0.5": lambda i: 0.5,
    "alternating-10": lambda i: 0.9 if (i // 10) % 2 == 0 else 0.35,
    "alternating-50": lambda i: 0.9 if (i // 50) % 2 == 0 else 0.35,
}


def test_adaptive_policy_beats_the_hf_heuristic() -> None:
    """HF candidate_generator: k += 2 after a fully accepted block, k -= 1 otherwise (min 1)."""
    costs = CostProfile(draft_token_s=0.09, verify_base_s=1.0, verify_token_s=0.06, round_overhead_s=0.05)
    ours = theirs = 0.0
    for phases in SCENARIOS.values():
        for seed in range(5):
            policy = DraftLengthPolicy(None, costs, max_k=12)
            ours += simulate(policy.next_k, policy.record, phases, costs, 400, seed)
            hf = HfHeuristic(initial_k=5, max_k=12)
            theirs += simulate(hf.next_k, hf.record, phases, costs, 400, seed)
    assert ours > theirs * 1.005, (ours, theirs)


def test_block_prepared_during_verify_is_sized_for_the_next_round() -> None:
    """A pipelined draft prepares the k the policy picks after full acceptance, so k can grow."""
    costs = CostProfile(draft_token_s=0.01, verify_base_s=1.0, verify_token_s=0.01, round_overhead_s=0.0)
    policy = DraftLengthPolicy(None, costs, max_k=16)
    k = 1
    for _ in range(6):
        k_next = policy.next_k_if_accepted(k)
        assert k_next >= k
        policy.record(k, k)
        assert policy.next_k() == k_next
        k = k_next
    assert k > 4
    fixed = DraftLengthPolicy(3, costs, max_k=16)
    assert fixed.next_k_if_accepted(3) == 3


def test_pipelined_policy_maximises_the_pipelined_rate() -> None:
    costs = CostProfile(draft_token_s=0.06, verify_base_s=1.0, verify_token_s=0.09, round_overhead_s=0.25)
    # Hand-checked: at alpha = 0.9 and k = 4, a round is usable ahead with 0.9^5 = 0.59049; its draft
    # (5 x 0.06 = 0.30) hides behind the verify (1.36), the others pay 4 x 0.06 = 0.24 on top.
    assert costs.pipelined_round_time(4, 0.9) == pytest.approx(0.25 + 1.36 + (1 - 0.59049) * 0.24)
    assert costs.pipelined_round_time(0, 0.9) == costs.round_time(0)
    rates = [expected_tokens(0.9, k) / costs.pipelined_round_time(k, 0.9) for k in range(17)]
    pipelined = best_draft_length(0.9, costs, 16, pipelined=True)
    assert pipelined == max(range(17), key=rates.__getitem__)
    assert rates[pipelined] > rates[best_draft_length(0.9, costs, 16)] or pipelined == best_draft_length(
        0.9, costs, 16
    )
    # Pipelining makes drafting worth it where the sequential rule would decode plainly.
    # (alpha = 0.45, c = 0.45, k = 1: sequential 1.45 / 1.45 = 1.0 is no gain; pipelined, the draft of the
    # usable rounds (probability 0.2025) hides behind the verify: 1.45 / (1 + 0.7975 * 0.45) = 1.066.)
    dear = CostProfile(draft_token_s=0.45, verify_base_s=1.0, verify_token_s=0.0, round_overhead_s=0.0)
    assert best_draft_length(0.45, dear, 8) == 0
    assert best_draft_length(0.45, dear, 8, pipelined=True) == 1
    # A draft slower than the verify is not hidden: the round waits for it.
    slow = CostProfile(draft_token_s=0.5, verify_base_s=1.0, verify_token_s=0.0, round_overhead_s=0.0)
    assert slow.pipelined_round_time(3, 1.0) == pytest.approx(4 * 0.5)
    policy = DraftLengthPolicy(None, costs, max_k=16, pipelined=True)
    for _ in range(20):
        policy.record(8, 8 if random.random() < 0.5 else 7)
    assert policy.next_k() == best_draft_length(policy.acceptance.alpha, costs, 16, pipelined=True)


def test_plain_stretches_probe_every_few_rounds_and_recover() -> None:
    """Where plain decoding wins, only every PROBE_INTERVAL-th round drafts (one token); once the draft is
    right again, the estimate climbs and speculation resumes."""
    costs = CostProfile(draft_token_s=0.3, verify_base_s=1.0, verify_token_s=0.1, round_overhead_s=0.1)
    policy = DraftLengthPolicy(None, costs, max_k=8)
    for _ in range(6):  # a hard stretch: every drafted token rejected
        policy.record(policy.next_k(), 0)
    schedule = []
    for _ in range(3 * PROBE_INTERVAL):
        k = policy.next_k()
        schedule.append(k)
        policy.record(k, 0)
    probes = [i for i, k in enumerate(schedule) if k]
    assert set(schedule) == {0, 1} and len(probes) == 3, schedule
    assert [b - a for a, b in zip(probes, probes[1:], strict=False)] == [PROBE_INTERVAL] * 2, schedule
    for _ in range(12):  # an easy stretch: every drafted token accepted
        k = policy.next_k()
        policy.record(k, k)
    assert policy.next_k() > 1


def test_sparse_probing_beats_probing_every_round_when_the_draft_is_useless() -> None:
    costs = CostProfile(draft_token_s=0.2, verify_base_s=1.0, verify_token_s=0.1, round_overhead_s=0.3)

    class EveryRound(DraftLengthPolicy):
        def next_k(self) -> int:
            return max(super().next_k(), 1)

    sparse = simulate(*(lambda p: (p.next_k, p.record))(DraftLengthPolicy(None, costs, 8)), lambda i: 0.05,
                      costs, 400, 0)  # fmt: skip
    every = simulate(*(lambda p: (p.next_k, p.record))(EveryRound(None, costs, 8)), lambda i: 0.05,
                     costs, 400, 0)  # fmt: skip
    assert sparse > every * 1.05, (sparse, every)


def test_draft_call_is_paid_only_by_rounds_that_draft() -> None:
    costs = CostProfile(
        draft_token_s=0.01, verify_base_s=1.0, verify_token_s=0.1, round_overhead_s=0.1, draft_call_s=0.15
    )
    assert costs.round_time(0) == pytest.approx(1.1)
    assert costs.round_time(2) == pytest.approx(0.1 + 0.15 + 0.02 + 1.2)
    # Pipelined: a round whose block was ready (alpha^(k+1)) had its draft call hidden behind the verify.
    held = 0.9**3
    model_time = held * max(1.2, 3 * 0.01) + (1 - held) * (2 * 0.01 + 1.2)
    assert costs.pipelined_round_time(2, 0.9) == pytest.approx(0.1 + (1 - held) * 0.15 + model_time)
    # A nearly free draft with poor acceptance: one token is worth it only while the call costs nothing.
    free_call = CostProfile(draft_token_s=0.001, verify_base_s=1.0, verify_token_s=0.05, round_overhead_s=0.2)
    assert best_draft_length(0.1, free_call, 8) == 1
    dear_call = CostProfile(
        draft_token_s=0.001, verify_base_s=1.0, verify_token_s=0.05, round_overhead_s=0.2, draft_call_s=0.15
    )
    assert best_draft_length(0.1, dear_call, 8) == 0


def test_the_verify_cost_line_goes_through_the_median_at_each_k() -> None:
    from coordinator.cost_profile import median_line

    points = [(1.0, 11.0), (1.0, 11.2), (1.0, 10.9), (8.0, 18.0), (8.0, 31.0), (8.0, 18.1), (16.0, 26.0)]
    base, per_token = median_line(points)  # the 31 ms hiccup at k = 8 is ignored
    assert per_token == pytest.approx(1.0, abs=0.01)
    assert base == pytest.approx(10.0, abs=0.1)


def test_the_hf_heuristic_rule_adds_two_after_a_whole_block_and_drops_one_otherwise() -> None:
    """Hugging Face's +2/-1 schedule, run by the policy to compare it with the cost model in one system: it
    ignores the costs and the acceptance estimate, and a fixed k still overrides it."""
    costs = CostProfile(draft_token_s=0.09, verify_base_s=1.0, verify_token_s=0.06, round_overhead_s=0.05)
    policy = DraftLengthPolicy(None, costs, max_k=8, heuristic_k=HF_HEURISTIC_START)
    assert policy.adaptive and policy.next_k() == 5
    assert policy.next_k_if_accepted(5) == 7 and policy.next_k() == 5  # a look ahead changes nothing
    ks = []
    for accepted_whole in (True, True, False, False, False, False, False, True):
        k = policy.next_k()
        ks.append(k)
        policy.record(k, k if accepted_whole else 0)
    assert ks == [5, 7, 8, 7, 6, 5, 4, 3]  # capped at max_k, then down by one per rejection
    assert policy.next_k() == 5
    for _ in range(10):
        policy.record(policy.next_k(), 0)
    assert policy.next_k() == 1  # never below one draft token
    assert DraftLengthPolicy(3, costs, max_k=8, heuristic_k=HF_HEURISTIC_START).next_k() == 3


def test_the_hf_heuristic_start_is_capped_at_max_k() -> None:
    """A coordinator with --max-speculative-tokens below 5 starts the rule at its maximum, so the schedule it
    hands a draft worker is one the worker accepts."""
    from specpipe.speculation.delegation import DraftSchedule

    costs = CostProfile(draft_token_s=0.09, verify_base_s=1.0, verify_token_s=0.06, round_overhead_s=0.05)
    policy = DraftLengthPolicy(None, costs, max_k=3, heuristic_k=HF_HEURISTIC_START)
    assert policy.heuristic_k == 3 and policy.next_k() == 3
    schedule = DraftSchedule.of(policy, chaining=True)
    assert DraftSchedule.from_pb(schedule.to_pb()).policy().next_k() == 3
