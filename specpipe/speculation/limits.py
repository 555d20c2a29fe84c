"""What the paired models allow, and the round rules that follow from it: how long a block may be, where
a round's tokens end, and whether drafting the next block during a verify can pay.

Pure functions of tokens and measured costs: the coordinator's loop and the draft worker's delegated loop
(draft_service/delegated.py) apply the same rules, so a request's block boundaries, and with them its seeded
sampled tokens, do not depend on where its rounds run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specpipe.speculation.adaptive_k import CostProfile


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What the paired workers allow, read from their info RPCs at start-up."""

    target_context: int
    draft_context: int
    vocab_size: int
    eos_token_ids: frozenset[int]

    def draft_length(self, requested: int, remaining: int, history_len: int) -> int:
        """k for the next round: never drafts tokens that could not be kept."""
        k = min(
            requested,
            remaining - 1,  # the round also yields one recovered/bonus token
            self.target_context - history_len - 1,  # history + block + next fit the target
            self.draft_context - history_len + 1,  # the draft feeds history + k - 1 tokens
        )
        return max(k, 0)

    def has_eos(self, token_ids: Sequence[int]) -> bool:
        return any(token in self.eos_token_ids for token in token_ids)

    def round_tokens(
        self, block: Sequence[int], num_accepted: int, next_token_id: int, remaining: int, history_len: int
    ) -> tuple[list[int], str]:
        """A verified round's tokens (the accepted part of `block`, then the next token), cut after EOS or at
        max_new_tokens, and the finish reason: "eos", "length" (max_new_tokens reached, or the history now
        fills the target context) or "". Stop strings are the coordinator's (it alone detokenizes)."""
        kept = [*block[:num_accepted], next_token_id][:remaining]
        for i, token in enumerate(kept):
            if token in self.eos_token_ids:
                return kept[: i + 1], "eos"
        if len(kept) == remaining or history_len + len(kept) >= self.target_context:
            return kept, "length"
        return kept, ""


def should_pipeline(
    block: Sequence[int], next_k: int, history_len: int, limits: ModelLimits, costs: CostProfile | None
) -> bool:
    """Draft the next block (next_k + 1 tokens) during the verify of `block` only where it can be used and
    is free: the block holds no EOS (accepted whole, it would end the request), it must fit the draft context
    and, by the measured profile, finish before the verify does (else waiting for it costs time)."""
    k = len(block)
    if k == 0 or history_len + k + next_k > limits.draft_context or limits.has_eos(block):
        return False
    if costs is None:
        return True
    verify_s = costs.verify_base_s + k * costs.verify_token_s
    return (next_k + 1) * costs.draft_token_s <= verify_s
