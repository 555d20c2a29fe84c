"""The round decisions both loops share (specpipe/speculation/rounds.py), checked by hand."""

from __future__ import annotations

from specpipe.speculation.adaptive_k import DraftLengthPolicy
from specpipe.speculation.limits import ModelLimits
from specpipe.speculation.rounds import Proposal, QueuedBlock, RoundPlanner, Verification

EOS = 2
LIMITS = ModelLimits(target_context=512, draft_context=512, vocab_size=100, eos_token_ids=frozenset({EOS}))


def planner(k: int = 4, pipelining: bool = True, chaining: bool = True) -> RoundPlanner[str]:
    return RoundPlanner(
        DraftLengthPolicy(k, None, 8, pipelined=pipelining), LIMITS, None, pipelining, chaining
    )


def tokens(*ids: int) -> Proposal:
    return Proposal(list(ids), (), 0)


def test_a_fresh_block_has_the_policys_length_clipped_to_what_can_be_kept() -> None:
    plan = planner(k=4).block([1, 2, 3], remaining=100)
    assert (plan.k, plan.prepared, plan.queued) == (4, None, None)
    assert planner(k=4).block([1, 2, 3], remaining=3).k == 2  # the round also yields one token
    assert planner(k=4).block(list(range(509)), remaining=100).k == 2  # history + block + next fit 512


def test_a_held_guess_leaves_the_block_after_it_for_the_next_round() -> None:
    rounds = planner(k=3)
    guess = tokens(7, 8, 9, 10, 11)  # the bonus guess 7, then the next block
    assert rounds.settle(3, Verification(3, 7, 0), guess, None) is None
    plan = rounds.block([1, 4, 5, 6, 7], remaining=100)
    assert plan.k == 3 and plan.prepared is not None and plan.prepared.token_ids == [8, 9, 10]
    assert plan.queued is None
    # Used once: the round after drafts afresh.
    assert rounds.block([1, 4, 5, 6, 7, 8, 9, 10, 11], remaining=100).prepared is None


def test_a_queued_block_is_verified_as_it_was_sent() -> None:
    rounds = planner(k=2)
    queued = QueuedBlock([1, 4, 5, 7], "stream")
    assert rounds.settle(2, Verification(2, 7, 0), tokens(7, 8, 9, 10), queued) is None
    plan = rounds.block([1, 4, 5, 7], remaining=100)
    # Three tokens although the policy says two: the target already holds the block as drafted.
    assert plan.k == 3 and plan.prepared is not None and plan.prepared.token_ids == [8, 9, 10]
    assert plan.queued == queued


def test_a_missed_guess_leaves_nothing_and_drops_a_queued_block() -> None:
    rounds = planner(k=3)
    queued = QueuedBlock([1, 4, 5, 6, 7], "stream")
    assert rounds.settle(3, Verification(3, 99, 0), tokens(7, 8, 9), queued) == queued  # another bonus token
    assert rounds.block([1, 4, 5, 6, 99], remaining=100).prepared is None
    assert rounds.settle(3, Verification(1, 7, 0), tokens(7, 8, 9), queued) == queued  # a rejection
    assert rounds.settle(3, Verification(1, 7, 0), tokens(7, 8, 9), None) is None  # nothing was queued


def test_drafting_ahead_only_where_the_block_can_be_used() -> None:
    assert planner(k=4).ahead(10, [4, 5, 6, 7], remaining=100) == 4
    assert planner(k=4).ahead(10, [4, 5, 6, 7], remaining=8) == 2  # clipped as the next round will be
    assert planner(k=4).ahead(10, [4, EOS], remaining=100) == 0  # accepted whole, it ends the request
    assert planner(k=4).ahead(10, [], remaining=100) == 0
    assert planner(k=4, pipelining=False).ahead(10, [4, 5], remaining=100) == 0


def test_no_block_is_queued_behind_a_guess_that_would_end_the_request() -> None:
    rounds = planner()
    assert rounds.worth_queueing(tokens(9, 10, 11), verdict_in=False)
    assert not rounds.worth_queueing(tokens(EOS, 10, 11), verdict_in=False)  # if it holds, the request ends
    assert not rounds.worth_queueing(tokens(9), verdict_in=False)  # no block after the guess
    assert not rounds.worth_queueing(tokens(9, 10, 11), verdict_in=True)  # too late to gain anything
    assert not planner(chaining=False).worth_queueing(tokens(9, 10, 11), verdict_in=False)
