"""Penalties on tokens already in the sequence, shared by the draft (q) and the target (p).

- **Repetition penalty** (CTRL's; Hugging Face's `RepetitionPenaltyLogitsProcessor`): every token already in
  the sequence has its logit divided by the penalty when positive and multiplied by it when negative. The
  sequence is the whole history, prompt included, as there.
- **Frequency and presence penalties** (OpenAI's, as vLLM applies them): every token that appears in the
  request's output so far has `frequency_penalty` times its count, then `presence_penalty`, subtracted from
  its logit. The output is the session's history from `SamplingParams.output_start` on: the tokens
  generated since the latest prompt, which a resumed request counts too, so resuming changes nothing.

All before temperature, top-k, top-p and min-p (Hugging Face applies its logits processors before its
warpers, vLLM its penalties before its sampler), the repetition penalty first, as vLLM orders them, and
after the logit bias (sampling/logit_bias.py), as there.

In a verify pass row i scores the position after history + block[:i], so each row sees the draft tokens
before it: p is the distribution plain decoding would have had at that position, whatever the block
boundaries, which keeps speculation exact. The draft applies the same rules to each of its steps. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpipe.sampling.params import SamplingParams
from specpipe.sampling.vocab_ids import ids_in_vocab

__all__ = ["SequencePenalties", "penalize_block"]


class SequencePenalties:
    """What a request's penalties need to know of the sequence so far, kept as tokens are appended: which
    tokens it holds (repetition) and how often each appears in the output (frequency and presence)."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int, sampling: SamplingParams) -> None:
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.seen: torch.Tensor | None = None  # [vocab_size] bool
        self.counts: torch.Tensor | None = None  # [vocab_size] float32
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[ids_in_vocab(token_ids, vocab_size)] = True
        if sampling.penalizes_occurrences:
            output = ids_in_vocab(token_ids[sampling.output_start :], vocab_size)
            self.counts = torch.bincount(output, minlength=vocab_size).to(torch.float32)

    def append(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            return
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1.0

    def apply(self, row: torch.Tensor) -> None:  # row [vocab_size] float32, changed in place
        """The penalties on the logits of the position after the sequence so far."""
        if self.seen is not None:
            picked = row[self.seen]
            penalty = self.sampling.repetition_penalty
            row[self.seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
        if self.counts is not None:
            row -= self.sampling.frequency_penalty * self.counts
            row -= self.sampling.presence_penalty * (self.counts > 0).to(torch.float32)


def penalize_block(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores the position after history + block[:i]
    history: Sequence[int],
    block: Sequence[int],  # at least n - 1 tokens
    sampling: SamplingParams,
) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor
    """The logits of each row with the penalties over the tokens before its position."""
    scores = logits.to(torch.float32).clone()
    penalties = SequencePenalties(history, scores.shape[-1], sampling)
    for i in range(scores.shape[0]):
        if i > 0:
            penalties.append(block[i - 1])
        penalties.apply(scores[i])
    return scores
