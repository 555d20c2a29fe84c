"""The contract of delegated speculation (DraftService.Speculate): what the coordinator hands the draft
worker, and the rounds that come back.

With delegation the draft worker runs a request's rounds itself (draft_service/delegated.py): blocks go
straight to the target and verdicts straight back, so a round after a rejection costs two one-way messages
instead of four plus two passes through the coordinator. The schedule travels with the request (the same
policy, costs and limits the coordinator would use), so the rounds, and with them seeded sampled tokens,
are those the coordinator's own loop would run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.logprobs import TokenLogprob
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.adaptive_k import CostProfile, DraftLengthPolicy
from specpipe.speculation.limits import ModelLimits
from specpipe.speculation.rounds import read_report, report_fields
from specpipe.v1 import draft_pb2


@dataclass(frozen=True, slots=True)
class DraftSchedule:
    """A request's k policy and where it stands (DraftLengthPolicy's state), to continue it elsewhere."""

    fixed_k: int | None
    max_k: int
    pipelining: bool
    chaining: bool
    costs: CostProfile | None
    accepted: float = 0.0
    rejected: float = 0.0
    rounds_since_draft: int = 0
    heuristic_k: int | None = None  # Hugging Face's +2/-1 rule's k where the policy runs that rule

    @classmethod
    def of(cls, policy: DraftLengthPolicy, chaining: bool) -> DraftSchedule:
        return cls(
            fixed_k=policy.fixed_k,
            max_k=policy.max_k,
            pipelining=policy.pipelined,
            chaining=chaining,
            costs=policy.costs,
            accepted=policy.acceptance.accepted,
            rejected=policy.acceptance.rejected,
            rounds_since_draft=policy.rounds_since_draft,
            heuristic_k=policy.heuristic_k,
        )

    def policy(self) -> DraftLengthPolicy:
        policy = DraftLengthPolicy(
            self.fixed_k, self.costs, self.max_k, pipelined=self.pipelining, heuristic_k=self.heuristic_k
        )
        policy.acceptance.accepted = self.accepted
        policy.acceptance.rejected = self.rejected
        policy.rounds_since_draft = self.rounds_since_draft
        return policy

    def to_pb(self) -> draft_pb2.DraftSchedule:
        pb = draft_pb2.DraftSchedule(
            max_k=self.max_k,
            pipelining=self.pipelining,
            chaining=self.chaining,
            accepted=self.accepted,
            rejected=self.rejected,
            rounds_since_draft=self.rounds_since_draft,
        )
        if self.fixed_k is not None:
            pb.fixed_k = self.fixed_k
        if self.heuristic_k is not None:
            pb.heuristic_k = self.heuristic_k
        if self.costs is not None:
            c = self.costs
            pb.costs.CopyFrom(
                draft_pb2.CostProfile(
                    draft_token_s=c.draft_token_s,
                    verify_base_s=c.verify_base_s,
                    verify_token_s=c.verify_token_s,
                    round_overhead_s=c.round_overhead_s,
                    draft_call_s=c.draft_call_s,
                )
            )
        return pb

    @classmethod
    def from_pb(cls, pb: draft_pb2.DraftSchedule) -> DraftSchedule:
        costs = None
        if pb.HasField("costs"):
            try:
                costs = CostProfile(
                    pb.costs.draft_token_s,
                    pb.costs.verify_base_s,
                    pb.costs.verify_token_s,
                    pb.costs.round_overhead_s,
                    pb.costs.draft_call_s,
                )
            except ValueError as exc:
                raise InvalidArgumentError(f"schedule.costs: {exc}") from exc
        fixed_k = pb.fixed_k if pb.HasField("fixed_k") else None
        if fixed_k is not None and fixed_k > pb.max_k:
            raise InvalidArgumentError(f"schedule.fixed_k ({fixed_k}) exceeds schedule.max_k ({pb.max_k})")
        if pb.accepted < 0 or pb.rejected < 0:
            raise InvalidArgumentError("schedule.accepted and schedule.rejected must be >= 0")
        heuristic_k = pb.heuristic_k if pb.HasField("heuristic_k") else None
        if heuristic_k is not None and not 1 <= heuristic_k <= max(pb.max_k, 1):
            raise InvalidArgumentError(
                f"schedule.heuristic_k must be in [1, {max(pb.max_k, 1)}], got {heuristic_k}"
            )
        return cls(
            fixed_k,
            pb.max_k,
            pb.pipelining,
            pb.chaining,
            costs,
            pb.accepted,
            pb.rejected,
            pb.rounds_since_draft,
            heuristic_k,
        )


@dataclass(frozen=True, slots=True)
class DelegatedRequest:
    session_id: str
    token_ids: tuple[int, ...]  # the whole history
    max_new_tokens: int
    sampling: SamplingParams
    target_address: str
    schedule: DraftSchedule
    limits: ModelLimits
    worker_timeout_s: float

    def to_pb(self) -> draft_pb2.SpeculateRequest:
        return draft_pb2.SpeculateRequest(
            session_id=self.session_id,
            token_ids=self.token_ids,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling.to_pb(),
            target_address=self.target_address,
            schedule=self.schedule.to_pb(),
            target_context=self.limits.target_context,
            draft_context=self.limits.draft_context,
            vocab_size=self.limits.vocab_size,
            eos_token_ids=sorted(self.limits.eos_token_ids),
            worker_timeout_s=self.worker_timeout_s,
        )

    @classmethod
    def from_pb(cls, pb: draft_pb2.SpeculateRequest) -> DelegatedRequest:
        if not pb.session_id:
            raise InvalidArgumentError("session_id must not be empty")
        if not pb.token_ids:
            raise InvalidArgumentError("token_ids must not be empty")
        if pb.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be >= 1")
        if not pb.target_address:
            raise InvalidArgumentError("target_address must not be empty")
        if not pb.target_context or not pb.draft_context or not pb.vocab_size:
            raise InvalidArgumentError("target_context, draft_context and vocab_size must be > 0")
        if pb.worker_timeout_s <= 0:
            raise InvalidArgumentError("worker_timeout_s must be > 0")
        limits = ModelLimits(
            pb.target_context, pb.draft_context, pb.vocab_size, frozenset(int(t) for t in pb.eos_token_ids)
        )
        return cls(
            session_id=pb.session_id,
            token_ids=tuple(pb.token_ids),
            max_new_tokens=pb.max_new_tokens,
            sampling=SamplingParams.from_pb(pb.sampling),
            target_address=pb.target_address,
            schedule=DraftSchedule.from_pb(pb.schedule),
            limits=limits,
            worker_timeout_s=pb.worker_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class SpeculationRound:
    """One verified round: the block, the verdict, and what the round yields (already truncated)."""

    draft_token_ids: Sequence[int]
    num_accepted: int
    next_token_id: int
    new_token_ids: Sequence[int]
    finish_reason: str  # "eos", "length" or ""
    draft_forward_ns: int
    target_forward_ns: int
    logprobs: Sequence[TokenLogprob] = ()  # those of new_token_ids where the sampling asks
    repetition_penalty: float = 1.0  # the verdict's (the target applied it)
    applied_sampling: SamplingParams | None = None  # the verdict's (Verification.applied_sampling)

    def to_pb(self) -> draft_pb2.SpeculationRound:
        return draft_pb2.SpeculationRound(
            draft_token_ids=self.draft_token_ids,
            num_accepted=self.num_accepted,
            next_token_id=self.next_token_id,
            new_token_ids=self.new_token_ids,
            finish_reason=self.finish_reason,
            draft_forward_ns=self.draft_forward_ns,
            target_forward_ns=self.target_forward_ns,
            **report_fields(self.logprobs, self.repetition_penalty, self.applied_sampling),
        )

    @classmethod
    def from_pb(cls, pb: draft_pb2.SpeculationRound) -> SpeculationRound:
        return cls(
            list(pb.draft_token_ids),
            pb.num_accepted,
            pb.next_token_id,
            list(pb.new_token_ids),
            pb.finish_reason,
            pb.draft_forward_ns,
            pb.target_forward_ns,
            *read_report(pb),
        )
