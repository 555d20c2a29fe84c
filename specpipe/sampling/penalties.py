"""The repetition penalty (CTRL's; Hugging Face's `RepetitionPenaltyLogitsProcessor`), shared by the draft (q)
and the target (p).

Every token already in the sequence has its logit divided by the penalty when positive and multiplied by it
when negative, before temperature, top-k and top-p (Hugging Face applies its logits processors before its
warpers). The sequence is the whole history, prompt included, as there.

In a verify pass row i scores the position after history + block[:i], so each row sees the draft tokens
before it: p is the distribution plain decoding would have had at that position, whatever the block
boundaries, which keeps speculation exact. The draft applies the same rule to each of its steps. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["penalize_repetitions", "penalize_row", "seen_mask"]


def seen_mask(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:  # [vocab_size] bool
    """True at every id in `token_ids` (ids past the vocabulary, which the model cannot produce, are left
    out, as Hugging Face does)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    if len(token_ids):
        ids = torch.as_tensor(token_ids, dtype=torch.long)  # [len(token_ids)]
        mask[ids[(ids >= 0) & (ids < vocab_size)]] = True
    return mask


def penalize_row(
    row: torch.Tensor,  # [vocab_size] float32, changed in place
    seen: torch.Tensor,  # [vocab_size] bool
    penalty: float,
) -> None:
    picked = row[seen]
    row[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)


def penalize_repetitions(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores the position after history + block[:i]
    history: Sequence[int],
    block: Sequence[int],  # at least n - 1 tokens
    penalty: float,
) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor
    """The logits of each row with the tokens before its position penalized."""
    scores = logits.to(torch.float32).clone()
    vocab_size = scores.shape[-1]
    seen = seen_mask(history, vocab_size)
    for i in range(scores.shape[0]):
        if i > 0 and 0 <= block[i - 1] < vocab_size:
            seen[block[i - 1]] = True
        penalize_row(scores[i], seen, penalty)
    return scores
