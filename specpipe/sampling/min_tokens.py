"""vLLM's min_tokens (`SamplingParams.min_tokens`), shared by the draft (q) and the target (p).

Until the output holds min_tokens tokens, the logits of the tokens that would end it (`end_token_ids`:
end-of-sequence unless the request ignores it, and its stop token ids) are -inf. The output starts at
`SamplingParams.output_start`, so the position a row scores says how many tokens the output holds before it:
a verify's row i scores position len(history) + i, a draft step the position after its history. Applied with
the logit bias, before the penalties (as vLLM orders its logits processors). Torch only.
"""

from __future__ import annotations

import torch

from specpipe.sampling.params import SamplingParams
from specpipe.sampling.vocab_ids import ids_in_vocab

__all__ = ["hold_back_ends"]


def hold_back_ends(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores position first_position + i
    first_position: int,
    sampling: SamplingParams,
) -> torch.Tensor:  # [n, vocab_size]: a new float32 tensor where any row changed, else `logits`
    # Rows scoring positions before output_start + min_tokens: the output then holds fewer than min_tokens.
    held = min(logits.shape[0], sampling.output_start + sampling.min_tokens - first_position)
    if held <= 0:
        return logits
    ends = ids_in_vocab(sampling.end_token_ids, logits.shape[-1])  # [m]
    if ends.numel() == 0:
        return logits
    scores = logits.to(torch.float32).clone()
    rows = scores[:held]  # [held, vocab_size], a view
    rows[:, ends] = float("-inf")
    return scores
