"""A draft-target pair whose delegated call failed before its first round is skipped for the back-off."""

from __future__ import annotations

from coordinator.delegation_backoff import DelegationBackoff


def test_a_failed_pair_is_skipped_for_the_back_off_then_tried_again() -> None:
    now = [100.0]
    backoff = DelegationBackoff(backoff_s=60.0, clock=lambda: now[0])
    assert backoff.allowed("draft-a:1", "target-a:2")
    backoff.failed("draft-a:1", "target-a:2")
    assert not backoff.allowed("draft-a:1", "target-a:2")
    # Other pairs are not affected: the same draft with another target, another draft with the same target.
    assert backoff.allowed("draft-a:1", "target-b:2") and backoff.allowed("draft-b:1", "target-a:2")
    now[0] += 59.9
    assert not backoff.allowed("draft-a:1", "target-a:2")
    now[0] += 0.1
    assert backoff.allowed("draft-a:1", "target-a:2")
    assert backoff.allowed("draft-a:1", "target-a:2")  # and stays allowed until it fails again
