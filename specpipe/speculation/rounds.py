"""The schedule of one request's rounds, whichever loop runs them.

The coordinator's loop (coordinator/speculation.py) and the draft worker's delegated loop
(draft_service/delegated.py) move blocks and verdicts differently, but must run the same rounds: block
boundaries decide seeded sampled tokens under the Leviathan rule, and the coordinator continues a delegated
request from its own copy of the policy when the draft fails. So the decisions live here, once:

- how long this round's block is, and whether it is the block drafted during the previous verify (cut to
  the length chosen now) or, when that block was also queued on the target behind the verify
  (target_service/chain.py), exactly that block;
- whether to draft the next block during this verify (pipelining), and how long;
- whether a drafted guess is worth queueing on the target (chaining);
- what the verdict leaves for the next round.

Pure: tokens, verdicts and measured costs in, decisions out; no gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from specpipe.sampling.logprobs import TokenLogprob
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.adaptive_k import CostProfile, DraftLengthPolicy
from specpipe.speculation.limits import ModelLimits, should_pipeline
from specpipe.v1 import common_pb2

Handle = TypeVar("Handle")


@dataclass(frozen=True, slots=True)
class Proposal:
    token_ids: list[int]
    draft_probs: Sequence[common_pb2.TokenDistribution]  # forwarded to the target as they came
    forward_ns: int

    def first(self, k: int) -> Proposal:
        """The first k proposed tokens (a prepared block cut to the k the round chose)."""
        return Proposal(self.token_ids[:k], list(self.draft_probs)[:k], self.forward_ns)

    def after_guess(self) -> Proposal:
        """A pipelined proposal (a guess of the bonus token, then the next block) without the guess."""
        return Proposal(self.token_ids[1:], list(self.draft_probs)[1:], self.forward_ns)

    def guess_held(self, verdict: Verification, block_len: int) -> bool:
        """Whether the verify this pipelined proposal assumed accepted all `block_len` tokens and its bonus
        token is the guess: then the block after the guess is the next round's."""
        return verdict.num_accepted == block_len and self.token_ids[:1] == [verdict.next_token_id]


NO_PROPOSAL = Proposal([], (), 0)


# What a verdict reports beside its tokens, as VerifyResponse and SpeculationRound both carry it (fields of
# the same names): the tokens' log-probs, and the echoes of the processing the target applied.
VerdictReport = tuple[tuple[TokenLogprob, ...], float, SamplingParams | None]


def report_fields(
    logprobs: Sequence[TokenLogprob], repetition_penalty: float, applied_sampling: SamplingParams | None
) -> dict[str, Any]:
    """A verdict's report as keyword arguments of either message (unset: no penalty, no echo)."""
    return {
        "logprobs": [logprob.to_pb() for logprob in logprobs],
        "repetition_penalty": None if repetition_penalty == 1.0 else repetition_penalty,
        "applied_sampling": None if applied_sampling is None else applied_sampling.to_pb(),
    }


def read_report(pb: Any) -> VerdictReport:  # a VerifyResponse or a SpeculationRound
    return (
        tuple(TokenLogprob.from_pb(logprob) for logprob in pb.logprobs),
        pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
        SamplingParams.from_pb(pb.applied_sampling) if pb.HasField("applied_sampling") else None,
    )


@dataclass(frozen=True, slots=True)
class Verification:
    num_accepted: int
    next_token_id: int
    forward_ns: int
    # Where the request's sampling asks: those of the accepted tokens and the next one (a prefix of them
    # when the round's tokens were cut, as in a delegated round).
    logprobs: tuple[TokenLogprob, ...] = ()
    repetition_penalty: float = 1.0  # the one the target applied (VerifyResponse.repetition_penalty)
    # Where the sampling needs it (SamplingParams.needs_applied_echo): the one the target applied.
    applied_sampling: SamplingParams | None = None


@dataclass(frozen=True, slots=True)
class QueuedBlock(Generic[Handle]):
    """A drafted block queued on the target behind the verify it assumes fully accepted."""

    history: list[int]  # what it extends: that verify's history + block + the guessed bonus token
    handle: Handle  # where it was queued (the coordinator's target stream; the draft has only one)


@dataclass(frozen=True, slots=True)
class PlannedBlock(Generic[Handle]):
    """A round's block before drafting: its length, and what is already drafted for it."""

    k: int
    prepared: Proposal | None  # drafted during the previous verify (cut to k); None: draft k now if k > 0
    queued: QueuedBlock[Handle] | None  # `prepared` is already queued on the target: verify it as sent


class RoundPlanner(Generic[Handle]):
    """One request's round decisions, carrying the block drafted ahead from one round to the next."""

    def __init__(
        self,
        policy: DraftLengthPolicy,
        limits: ModelLimits,
        costs: CostProfile | None,
        pipelining: bool,
        chaining: bool,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.costs = costs
        self.pipelining = pipelining
        self.chaining = chaining
        self._ready: Proposal | None = None  # drafted during the last verify, valid as it accepted all
        self._queued: QueuedBlock[Handle] | None = None  # `_ready`, if it was queued on the target too

    def block(self, history: Sequence[int], remaining: int) -> PlannedBlock[Handle]:
        """This round's block for `history` with `remaining` tokens still wanted. A block queued on the
        target keeps the length it was drafted with (the target verifies it as it was sent)."""
        ready, queued = self._ready, self._queued
        self._ready = self._queued = None
        if ready is not None and queued is not None and queued.history == list(history):
            return PlannedBlock(len(ready.token_ids), ready, queued)
        k = self.limits.draft_length(self.policy.next_k(), remaining, len(history))
        if k > 0 and ready is not None:
            prepared = ready.first(k)
            return PlannedBlock(len(prepared.token_ids), prepared, None)
        return PlannedBlock(k, None, None)

    def ahead(self, history_len: int, block: Sequence[int], remaining: int) -> int:
        """How many tokens to draft during this block's verify, after a guess of its bonus token (0: none):
        the next block as the policy will size it if this one is accepted whole, where that can pay."""
        k = len(block)
        next_k = self.limits.draft_length(
            self.policy.next_k_if_accepted(k), remaining - k - 1, history_len + k + 1
        )
        if (
            not self.pipelining
            or next_k <= 0
            or not should_pipeline(block, next_k, history_len, self.limits, self.costs)
        ):
            return 0
        return next_k

    def worth_queueing(self, guess: Proposal, verdict_in: bool) -> bool:
        """Whether to queue the block after `guess` on the target behind the verify: not when there is no
        block after the guess, the verdict is in already, or the guess is EOS (if it holds, the request ends
        with it and the queued verify would be wasted)."""
        return (
            self.chaining
            and len(guess.token_ids) >= 2
            and not verdict_in
            and not self.limits.has_eos(guess.token_ids[:1])
        )

    def settle(
        self,
        block_len: int,
        verdict: Verification,
        guess: Proposal | None,
        queued: QueuedBlock[Handle] | None,
    ) -> QueuedBlock[Handle] | None:
        """Records the verdict; keeps the block drafted after `guess` for the next round if the guess held.
        Returns `queued` when it was queued for nothing (the target skips it; its reply is to be dropped)."""
        self.policy.record(block_len, verdict.num_accepted)
        if guess is not None and guess.guess_held(verdict, block_len):
            self._ready = guess.after_guess()
            self._queued = queued
            return None
        return queued
