"""Logits -> sampling distribution, shared by the draft (q) and the target (p).

Speculative decoding is exact only if the draft's q and the target's p are the distributions each side really
samples from, so both sides build them with this one function, in Hugging Face's order:

1. cast to float32 (as `transformers` generation does with the last-position logits);
2. divide by the temperature (`TemperatureLogitsWarper`);
3. top-k: mask every logit below the k-th largest value; ties at the k-th value are kept
   (`TopKLogitsWarper`, which masks `scores < topk[..., -1]`);
4. top-p: sort ascending, take the cumulative softmax, mask the tokens whose cumulative probability is
   `<= 1 - top_p`, always keeping the largest one (`TopPLogitsWarper`);
5. softmax in float32.

Greedy requests (temperature 0) get a one-hot at `torch.argmax`, whose first-maximum tie rule is the one
Hugging Face greedy search uses.

Everything here is deterministic on one device: the top-p sort is stable (equal logits keep index order), so
the same logits give the same probabilities in whichever process computes them.
"""

from __future__ import annotations

import torch

from specpipe.sampling.params import SamplingParams

__all__ = ["sampling_probs"]


def sampling_probs(
    logits: torch.Tensor,  # [n, vocab_size], any float dtype
    params: SamplingParams,
) -> torch.Tensor:  # [n, vocab_size] float32
    """The distribution a request samples from at each of the `n` positions: one row per position."""
    scores = logits.to(torch.float32)
    if params.is_greedy:
        return _one_hot_argmax(scores)

    scores = scores / params.temperature
    vocab_size = scores.shape[-1]
    if 0 < params.top_k < vocab_size:
        scores = _apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = _apply_top_p(scores, params.top_p)
    return torch.softmax(scores, dim=-1)


def _one_hot_argmax(
    scores: torch.Tensor,  # [n, vocab_size] float32
) -> torch.Tensor:  # [n, vocab_size] float32
    probs = torch.zeros_like(scores)
    probs.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    return probs


def _apply_top_k(
    scores: torch.Tensor,  # [n, vocab_size] float32
    top_k: int,
) -> torch.Tensor:  # [n, vocab_size] float32
    kth_largest = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [n, 1]
    return scores.masked_fill(scores < kth_largest, float("-inf"))


def _apply_top_p(
    scores: torch.Tensor,  # [n, vocab_size] float32
    top_p: float,
) -> torch.Tensor:  # [n, vocab_size] float32
    sorted_scores, sorted_indices = torch.sort(scores, dim=-1, descending=False, stable=True)
    cumulative_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= (1.0 - top_p)
    sorted_to_remove[..., -1:] = False  # always keep the most likely token
    to_remove = sorted_to_remove.scatter(-1, sorted_indices, sorted_to_remove)
    return scores.masked_fill(to_remove, float("-inf"))
