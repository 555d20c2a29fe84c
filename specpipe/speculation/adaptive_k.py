"""Choosing the draft length k: expected tokens per unit time from acceptance and measured costs.

With per-token acceptance probability alpha, a round that drafts k tokens yields on average
E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens (Leviathan et al. 2023) and costs
T(k) = overhead + [k > 0] draft_call + k * t_draft + t_verify(k), with t_verify(k) = verify_base +
k * verify_token (measured; draft_call is what the call to the draft worker adds to a round that drafts).
The policy picks the k in [0, max_k] maximising E(k) / T(k); k = 0 is plain decoding, chosen when the draft
is too costly for its acceptance rate. With pipelining, T(k) is the expected round time of the pipelined
scheme (a fully accepted round's successor was drafted during its verify).

The costs come from a profile measured once when the coordinator pairs with its workers, not from live
timings, so the k schedule (and with it a seeded sampled output) depends only on the tokens, never on
momentary load.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens produced by one round with k draft tokens (accepted prefix + 1)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True, slots=True)
class CostProfile:
    """Seconds: one draft forward, the verify pass (base + per draft token), the overhead of a round, and
    what a round that drafts pays on top of that for its call to the draft worker (`draft_call_s`: a round
    with k = 0 makes no such call)."""

    draft_token_s: float
    verify_base_s: float
    verify_token_s: float
    round_overhead_s: float
    draft_call_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("draft_token_s", "verify_base_s", "verify_token_s", "round_overhead_s", "draft_call_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def draft_cost_ratio(self) -> float:
        """c: one draft forward over one target forward."""
        return self.draft_token_s / self.verify_base_s if self.verify_base_s else 0.0

    def round_time(self, k: int) -> float:
        draft = self.draft_call_s + k * self.draft_token_s if k > 0 else 0.0
        return self.round_overhead_s + draft + self.verify_base_s + k * self.verify_token_s

    def pipelined_round_time(self, k: int, alpha: float) -> float:
        """Expected round time when the next block is drafted during the verify (`pipelined_model_time`); a
        round whose block was ready (probability alpha^(k+1)) had its draft call hidden too."""
        if k <= 0:
            return self.round_time(0)
        verify = self.verify_base_s + k * self.verify_token_s
        exposed_calls = (1.0 - alpha ** (k + 1.0)) * self.draft_call_s
        model_time = pipelined_model_time(k, alpha, self.draft_token_s, verify)
        return self.round_overhead_s + exposed_calls + model_time


def pipelined_model_time(k: float, alpha: float, draft: float, verify: float) -> float:
    """Expected model time of a round of k draft tokens (k may be a mean) when the next block is drafted
    during the verify, assuming full acceptance and guessing the bonus token: that block is usable with
    probability alpha^(k+1), and such a round costs the longer of the verify and the k + 1 draft steps;
    the other rounds draft first. `draft` is one draft step, `verify` the verify of the k tokens."""
    if k <= 0:
        return verify
    held = alpha ** (k + 1.0)
    return held * max(verify, (k + 1.0) * draft) + (1.0 - held) * (k * draft + verify)


def best_draft_length(alpha: float, costs: CostProfile, max_k: int, pipelined: bool = False) -> int:
    """argmax over k in [0, max_k] of E(k) / T(k); ties go to the smaller k. With pipelining, T(k) is the
    expected pipelined round time, so the (partly hidden) draft cost weighs less and k grows."""
    best_k, best_rate = 0, 0.0
    for k in range(max_k + 1):
        time = costs.pipelined_round_time(k, alpha) if pipelined else costs.round_time(k)
        rate = expected_tokens(alpha, k) / max(time, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


class AcceptanceEstimator:
    """Per-token acceptance alpha as (accepted) / (accepted + rejections), exponentially forgotten.

    Each round is a sequence of Bernoulli trials that stops at the first rejection, so accepted tokens
    count successes and a round that stopped early counts one failure (the maximum-likelihood estimate of
    a geometric process). A prior of `prior_weight` pseudo-trials at `prior_alpha` keeps early rounds sane.
    Fast forgetting (decay 0.7) tracks the easy and hard stretches of real text; in simulation it beats
    Hugging Face's +2/-1 rule on constant and on quickly alternating acceptance (tests/test_adaptive_k.py).
    """

    def __init__(self, prior_alpha: float = 0.6, prior_weight: float = 1.0, decay: float = 0.7) -> None:
        if not 0.0 < prior_alpha < 1.0:
            raise ValueError(f"prior_alpha must be in (0, 1), got {prior_alpha}")
        self.prior_alpha = prior_alpha
        self.prior_weight = prior_weight
        self.decay = decay
        self.accepted = 0.0
        self.rejected = 0.0

    def record(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < drafted else 0.0)

    @property
    def alpha(self) -> float:
        prior_accepted = self.prior_alpha * self.prior_weight
        return (self.accepted + prior_accepted) / (self.accepted + self.rejected + self.prior_weight)


# When plain decoding wins, every PROBE_INTERVAL-th round still drafts one token.
PROBE_INTERVAL = 4


# Hugging Face's "heuristic" schedule of assisted generation (its earlier default; transformers now defaults
# to 20 candidate tokens, constant, with a draft-confidence stop), which
# `DraftLengthPolicy(heuristic_k=HF_HEURISTIC_START)` runs for comparison: 5 draft tokens to start, 2 more
# after a block accepted whole, 1 fewer otherwise (at least 1), per request (its "heuristic_transient").
# A block cut short (the request's end, the context) counts as accepted whole when all of it was.
HF_HEURISTIC_START = 5


class DraftLengthPolicy:
    """k for each round of one request: fixed, or adaptive from the session's acceptance and the costs (or,
    to compare, adaptive by Hugging Face's +2/-1 rule)."""

    def __init__(
        self,
        fixed_k: int | None,
        costs: CostProfile | None,
        max_k: int,
        pipelined: bool = False,
        heuristic_k: int | None = None,
    ) -> None:
        self.fixed_k = fixed_k
        self.costs = costs
        self.max_k = max_k
        self.pipelined = pipelined  # the coordinator drafts the next block during each verify
        self.acceptance = AcceptanceEstimator()
        self.rounds_since_draft = 0  # rounds decoded plainly since the last one that drafted
        # Set: k follows Hugging Face's +2/-1 rule from here (within [1, max_k]) instead of the costs (for
        # requests without a fixed k); the costs then only decide where pipelining pays.
        self.heuristic_k = None if heuristic_k is None else max(1, min(heuristic_k, max(max_k, 1)))

    @property
    def adaptive(self) -> bool:
        return self.fixed_k is None and (self.costs is not None or self.heuristic_k is not None)

    def next_k(self) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        if self.heuristic_k is not None:
            return min(self.heuristic_k, self.max_k)
        if self.costs is None:
            return self.max_k
        k = best_draft_length(self.acceptance.alpha, self.costs, self.max_k, self.pipelined)
        if k > 0:
            return k
        # Plain decoding wins. A probe of one token every PROBE_INTERVAL-th round lets a session whose
        # acceptance improves (e.g. it reaches repetitive text) return to speculation, without paying a draft
        # call and a wasted verify position in every round of a stretch the draft cannot predict. The
        # schedule depends only on the tokens (rounds and their outcomes), never on timing.
        return 1 if self.rounds_since_draft >= PROBE_INTERVAL - 1 else 0

    def record(self, drafted: int, accepted: int) -> None:
        self.acceptance.record(drafted, accepted)
        self.rounds_since_draft = 0 if drafted > 0 else self.rounds_since_draft + 1
        self._step_heuristic(drafted, accepted)

    def _step_heuristic(self, drafted: int, accepted: int) -> None:
        if self.heuristic_k is None or self.fixed_k is not None or drafted <= 0:
            return
        if accepted == drafted:
            self.heuristic_k = min(self.heuristic_k + 2, max(self.max_k, 1))
        else:
            self.heuristic_k = max(1, self.heuristic_k - 1)

    def next_k_if_accepted(self, drafted: int) -> int:
        """The k the policy will choose after a round whose `drafted` tokens are all accepted: the size of
        the block a pipelined draft prepares during that round's verify."""
        if not self.adaptive:
            return self.next_k()
        saved = (self.acceptance.accepted, self.acceptance.rejected, self.heuristic_k)
        self.acceptance.record(drafted, drafted)
        self._step_heuristic(drafted, drafted)
        k = self.next_k()
        self.acceptance.accepted, self.acceptance.rejected, self.heuristic_k = saved
        return k
