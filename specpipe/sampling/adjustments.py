"""The adjustments a request asks of the raw logits, in the one order both the draft (q) and the target (p)
apply them, before temperature, top-k, top-p and min-p: structured output's automaton, the allowed tokens
and the bad words, the logit bias, min_tokens' hold-back of the ending tokens, then the penalties on the
tokens before each row (as vLLM orders its masks, its logits processors and its penalties). The draft and the
target must agree on it exactly, so it lives here once. Torch (and outlines-core, for the automaton) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.allowed_tokens import allow_only
from specpipe.sampling.bad_words import ban_bad_words
from specpipe.sampling.logit_bias import bias_logits
from specpipe.sampling.min_tokens import hold_back_ends
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.structured_output import OutputAutomata

__all__ = ["AdjustedLogits", "adjust_logits"]


def adjust_logits(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores the position after history + block[:i]
    history: Sequence[int],
    block: Sequence[int],  # at least n - 1 tokens (a draft step: none)
    sampling: SamplingParams,
    penalize: Callable[
        [torch.Tensor], torch.Tensor
    ],  # the rows with the penalties over the tokens before each
    automata: OutputAutomata | None = None,  # the worker's, where a request may ask for structured output
    session_id: str = "",  # the request's: structured output walks the session's output on from its last
) -> AdjustedLogits:  # its logits are `logits` itself where the request asks for none
    if sampling.output_regex:
        if automata is None:
            raise FailedPreconditionError("sampling.output_regex: this worker cannot apply structured output")
        logits = automata.mask(logits, history, block, sampling, session_id)
    if sampling.allowed_token_ids:
        logits = allow_only(logits, sampling.allowed_token_ids)
    if sampling.bad_words:
        logits = ban_bad_words(logits, history, block, sampling)
    if sampling.logit_bias:
        logits = bias_logits(logits, sampling.logit_bias)
    if sampling.min_tokens:
        logits = hold_back_ends(logits, len(history), sampling)
    if sampling.penalizes:
        logits = penalize(logits)
    if sampling.masks_tokens:
        return _without_dead_rows(logits, len(history))
    return AdjustedLogits(logits, len(history))


class AdjustedLogits(NamedTuple):
    """The adjusted rows, and where the masks left a row no token to choose (allowed ids that are all bad
    words there, an automaton's end held back by min_tokens...). Such a row is reached only if every token
    before it is accepted, which a draft token the target rejects before it prevents; so it is not an error
    until the verdict reaches it (`check_reached`). It and the rows after it hold zeros rather than -inf
    everywhere, whose softmax would be NaN."""

    logits: torch.Tensor  # [n, vocab_size]
    first_position: int  # the position row 0 scores
    dead_from: int | None = None  # the first row without a token to choose

    def check_reached(self, rows_reached: int) -> None:
        """INVALID_ARGUMENT where the verdict's tokens (rows 0..rows_reached - 1) reach a dead row."""
        if self.dead_from is not None and self.dead_from < rows_reached:
            raise InvalidArgumentError(
                "sampling.output_regex, allowed_token_ids, bad_words and min_tokens leave no token to choose "
                f"at position {self.first_position + self.dead_from}"
            )


def _without_dead_rows(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores position first_position + i
    first_position: int,
) -> AdjustedLogits:
    left = torch.isfinite(logits).any(dim=-1)  # [n] bool
    if bool(left.all()):
        return AdjustedLogits(logits, first_position)
    dead_from = int((~left).nonzero()[0])
    filled = logits.clone()
    filled[dead_from:] = 0.0  # never used: the rows are unreachable, or their verdict is refused
    return AdjustedLogits(filled, first_position, dead_from)
