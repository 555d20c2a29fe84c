"""Log-probabilities of generated tokens under the target model, for clients that ask for them.

Reported from the target's raw distribution, log_softmax of its logits before temperature, top-k and top-p
(as vLLM reports by default): a greedy request's processed distribution is a point mass, whose log-probs say
nothing. Every emitted token comes from one row of the verify pass: an accepted draft token from the row
that checked it, the recovered or bonus token from the row after the last accepted one, so a token's
log-prob does not depend on where the block boundaries fell (up to float rounding: a forward of k + 1 rows,
a packed batch or a CUDA graph rounds differently from one of a single row). Torch only, no gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specpipe.sampling.params import MAX_TOP_LOGPROBS
from specpipe.v1 import common_pb2

__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "token_logprobs"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), most likely first

    def to_pb(self) -> common_pb2.TokenLogprob:
        return common_pb2.TokenLogprob(
            token_id=self.token_id,
            logprob=self.logprob,
            top_token_ids=[token for token, _ in self.top],
            top_logprobs=[logprob for _, logprob in self.top],
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.TokenLogprob) -> TokenLogprob:
        return cls(pb.token_id, pb.logprob, tuple(zip(pb.top_token_ids, pb.top_logprobs, strict=True)))


def token_logprobs(
    logits: torch.Tensor,  # [n, vocab_size]: row i scored the position of token_ids[i]
    token_ids: Sequence[int],  # [n]
    top: int,  # how many of the most likely tokens to report per position (0..MAX_TOP_LOGPROBS)
) -> list[TokenLogprob]:
    """Each token's log-probability in its row's log_softmax, with the row's `top` most likely tokens."""
    if logits.shape[0] != len(token_ids):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(token_ids)} tokens")
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab_size]
    chosen = log_probs.gather(1, torch.tensor(list(token_ids), dtype=torch.long)[:, None])[:, 0]  # [n]
    top = min(top, log_probs.shape[-1])  # a vocabulary smaller than the ask (toy models)
    if top > 0:
        top_values, top_ids = log_probs.topk(top, dim=-1)  # [n, top] each, most likely first
        tops = [
            tuple(zip(ids, values, strict=True))
            for ids, values in zip(top_ids.tolist(), top_values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(token_ids)
    return [
        TokenLogprob(int(token), float(logprob), row_top)
        for token, logprob, row_top in zip(token_ids, chosen.tolist(), tops, strict=True)
    ]
