"""Bad words (`SamplingParams.bad_words`: Hugging Face's bad_words_ids as vLLM applies them), shared by the
draft (q) and the target (p).

A bad word is a sequence of token ids. Its last token gets a -inf logit at every position where the output so
far ends with the tokens before it: a one-token word is banned everywhere, a longer one only where it would
be completed. The output is the session's history from `SamplingParams.output_start` on (vLLM matches the
request's output tokens, never the prompt); a resumed request's counts, so resuming changes nothing.

In a verify pass row i scores the position after history + block[:i], so each row sees the draft tokens
before it, as plain decoding would at that position. Ids past the vocabulary are left out. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpipe.sampling.params import SamplingParams

__all__ = ["ban_bad_words"]


def ban_bad_words(
    logits: torch.Tensor,  # [n, vocab_size]: row i scores the position after history + block[:i]
    history: Sequence[int],
    block: Sequence[int],  # at least n - 1 tokens
    sampling: SamplingParams,
) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor
    scores = logits.to(torch.float32).clone()
    vocab_size = scores.shape[-1]
    words = [word for word in sampling.bad_words if 0 <= word[-1] < vocab_size]
    singles = [word[-1] for word in words if len(word) == 1]
    if singles:
        scores[:, torch.tensor(singles, dtype=torch.long)] = float("-inf")
    longer = [(list(word[:-1]), word[-1]) for word in words if len(word) > 1]
    if not longer:
        return scores
    longest = max(len(prefix) for prefix, _ in longer)
    # The output's last `longest` tokens before row 0 (fewer near its start): no prefix reaches further.
    tail = list(history[max(sampling.output_start, len(history) - longest) :])
    for row in range(scores.shape[0]):
        if row > 0 and len(history) + row - 1 >= sampling.output_start:
            tail.append(block[row - 1])
        for prefix, last in longer:
            if len(prefix) <= len(tail) and tail[len(tail) - len(prefix) :] == prefix:
                scores[row, last] = float("-inf")
    return scores
