"""The delegation contract (specpipe/speculation/delegation.py): what the coordinator sends survives the wire
exactly, a policy continued from its schedule chooses what the original would, and bad fields are refused."""

from __future__ import annotations

import pytest

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.adaptive_k import CostProfile, DraftLengthPolicy
from specpipe.speculation.delegation import DelegatedRequest, DraftSchedule, SpeculationRound
from specpipe.speculation.limits import ModelLimits
from specpipe.v1 import draft_pb2

COSTS = CostProfile(0.0006, 0.012, 0.0008, 0.001, 0.0018)
LIMITS = ModelLimits(1024, 512, 50257, frozenset({50256}))


def request(schedule: DraftSchedule) -> DelegatedRequest:
    # Sampling values exact in float32, as the coordinator's always are (they arrive in float32 fields).
    return DelegatedRequest(
        "s1", (5, 6, 7), 64, SamplingParams(temperature=0.75, top_p=0.5, seed=3), "10.0.0.7:50062", schedule,
        LIMITS, 30.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "schedule",
    [
        DraftSchedule(None, 16, True, True, COSTS, accepted=2.5, rejected=0.7, rounds_since_draft=2),
        DraftSchedule(4, 16, False, False, None),
    ],
)
def test_requests_and_rounds_survive_the_wire(schedule: DraftSchedule) -> None:
    sent = request(schedule)
    assert (
        DelegatedRequest.from_pb(draft_pb2.SpeculateRequest.FromString(sent.to_pb().SerializeToString()))
        == sent
    )
    round_ = SpeculationRound([1, 2, 3], 2, 9, [1, 2, 9], "", 1200, 34000)
    assert (
        SpeculationRound.from_pb(draft_pb2.SpeculationRound.FromString(round_.to_pb().SerializeToString()))
        == round_
    )


def test_a_policy_continued_from_its_schedule_chooses_as_the_original() -> None:
    original = DraftLengthPolicy(None, COSTS, 16, pipelined=True)
    outcomes = [(4, 4), (6, 2), (3, 0), (2, 2), (0, 0), (0, 0), (0, 0), (1, 1), (5, 5)]
    for i, (drafted, accepted) in enumerate(outcomes):
        continued = DraftSchedule.of(original, chaining=True).policy()
        assert continued.next_k() == original.next_k(), i
        assert continued.next_k_if_accepted(drafted) == original.next_k_if_accepted(drafted), i
        original.record(drafted, accepted)


SPOILERS = {
    "session_id": lambda pb: pb.ClearField("session_id"),
    "token_ids": lambda pb: pb.ClearField("token_ids"),
    "max_new_tokens": lambda pb: pb.ClearField("max_new_tokens"),
    "target_address": lambda pb: pb.ClearField("target_address"),
    "target_context": lambda pb: pb.ClearField("target_context"),
    "worker_timeout_s": lambda pb: setattr(pb, "worker_timeout_s", 0.0),
    "fixed_k": lambda pb: setattr(pb.schedule, "fixed_k", 9),
    "costs": lambda pb: setattr(pb.schedule.costs, "verify_base_s", -1.0),
    "accepted": lambda pb: setattr(pb.schedule, "accepted", -0.5),
}


@pytest.mark.parametrize("field", sorted(SPOILERS))
def test_bad_fields_are_invalid_arguments(field: str) -> None:
    pb = request(DraftSchedule(None, 8, True, True, COSTS)).to_pb()
    SPOILERS[field](pb)
    with pytest.raises(InvalidArgumentError):
        DelegatedRequest.from_pb(pb)
