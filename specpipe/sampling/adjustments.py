"""The adjustments a request asks of the raw logits, in the one order both the draft (q) and the target (p)
apply them, before temperature, top-k, top-p and min-p: the logit bias, min_tokens' hold-back of the ending
tokens, then the penalties on the tokens before each row (as vLLM orders its logits processors and its
penalties). The draft and the target must agree on it exactly, so it lives here once. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specpipe.sampling.logit_bias import bias_logits
from specpipe.sampling.min_tokens import hold_back_ends
from specpipe.sampling.params import SamplingParams

__all__ = ["adjust_logits"]


def adjust_logits(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores position first_position + i
    first_position: int,
    sampling: SamplingParams,
    penalize: Callable[
        [torch.Tensor], torch.Tensor
    ],  # the rows with the penalties over the tokens before each
) -> torch.Tensor:  # [n, vocab_size]: `logits` itself where the request asks for none
    if sampling.logit_bias:
        logits = bias_logits(logits, sampling.logit_bias)
    if sampling.min_tokens:
        logits = hold_back_ends(logits, first_position, sampling)
    if sampling.penalizes:
        logits = penalize(logits)
    return logits
