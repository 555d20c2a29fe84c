"""OpenAI's logit bias (`SamplingParams.logit_bias`), shared by the draft (q) and the target (p).

Each biased token id has its bias added to its logit, before the penalties and the temperature, as vLLM
applies it. A bias moves every row alike, so unlike the penalties it does not depend on the tokens before a
position: a verify applies it to all k + 1 rows at once. Ids past the vocabulary (which the coordinator
refuses) are left out rather than failing a worker. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["bias_logits"]


def bias_logits(
    logits: torch.Tensor,  # [n, vocab_size]
    logit_bias: Sequence[tuple[int, float]],  # (token id, bias)
) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor
    scores = logits.to(torch.float32).clone()
    vocab_size = scores.shape[-1]
    biased = [(token_id, bias) for token_id, bias in logit_bias if 0 <= token_id < vocab_size]
    if biased:
        ids = torch.tensor([token_id for token_id, _ in biased], dtype=torch.long)  # [m]
        biases = torch.tensor([bias for _, bias in biased], dtype=torch.float32)  # [m]
        scores[:, ids] += biases
    return scores
