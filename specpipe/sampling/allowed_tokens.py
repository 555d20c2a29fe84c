"""vLLM's allowed_token_ids (`SamplingParams.allowed_token_ids`), shared by the draft (q) and the target (p).

Every token outside the allowed set has its logit set to -inf, in every row alike (the set does not depend on
the tokens before a position), first of the adjustments (sampling/adjustments.py), as vLLM applies it before
its other logits processors. Ids past the vocabulary (which the coordinator refuses) are left out rather
than failing a worker. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpipe.sampling.vocab_ids import ids_in_vocab

__all__ = ["allow_only"]


def allow_only(
    logits: torch.Tensor,  # [n, vocab_size]
    allowed_token_ids: Sequence[int],
) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor: -inf but at the allowed ids
    ids = ids_in_vocab(allowed_token_ids, logits.shape[-1])  # [m]
    scores = torch.full(logits.shape, float("-inf"), dtype=torch.float32, device=logits.device)
    scores[:, ids] = logits[:, ids].to(torch.float32)
    return scores
