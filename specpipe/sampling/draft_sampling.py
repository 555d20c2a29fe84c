"""The draft side: sample a draft token from q, and carry q over the wire in a compact form.

The verifier needs q_i (the distribution the draft token x_i was drawn from) to run the accept test
`u < min(1, p_i(x_i) / q_i(x_i))` and to build the residual `max(0, p_i - q_i)` (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding", arXiv:2211.17192). After top-k/top-p, q is often
supported on a few tokens, so it travels as (token_ids, probs) of its support; when the support is more than
half the vocabulary a dense list is shorter, and it travels as ([], probs of every token).

Float32 values survive the round trip exactly (`tolist` widens them to Python floats losslessly), so the
verifier sees bit-for-bit the q the draft sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs

__all__ = ["compact_distribution", "expand_distribution", "expand_distributions", "sample_draft_token"]


def sample_draft_token(
    probs: torch.Tensor,  # [vocab_size], from sampling_probs
    position: int,
    seed: int,
    is_greedy: bool,
) -> int:
    """The draft token at absolute `position`: argmax if greedy, else a keyed draw (stream DRAFT) from q."""
    if is_greedy:
        return int(torch.argmax(probs))
    return sample_from_probs(probs, keyed_uniform(seed, position, RandomStream.DRAFT))


def compact_support(
    probs: torch.Tensor,  # [vocab_size]
) -> tuple[list[int], torch.Tensor]:
    """(token_ids, float32 values) of the support if it is at most half the vocabulary, else ([], dense).

    Empty token_ids always means "dense": an all-zero distribution is therefore sent dense too.
    """
    if probs.dim() != 1:
        raise InvalidArgumentError(f"probs must be a 1-D tensor, got shape {tuple(probs.shape)}")
    support = torch.nonzero(probs, as_tuple=True)[0]  # [support_size]
    support_size = int(support.numel())
    if 0 < support_size and 2 * support_size <= probs.numel():
        return support.tolist(), probs[support].to(torch.float32)
    return [], probs.to(torch.float32)


def compact_distribution(
    probs: torch.Tensor,  # [vocab_size]
) -> tuple[list[int], list[float]]:
    """`compact_support` with the values as a list of floats."""
    token_ids, values = compact_support(probs)
    return token_ids, values.tolist()


def expand_distribution(
    token_ids: Sequence[int],
    probs: Sequence[float] | torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:  # [vocab_size] float32
    """Inverse of `compact_distribution`: the dense float32 distribution over the vocabulary."""
    if vocab_size <= 0:
        raise InvalidArgumentError(f"vocab_size must be positive, got {vocab_size}")
    if isinstance(probs, torch.Tensor):
        values = probs.to(torch.float32).flatten()  # [len(probs)]
    else:
        values = torch.tensor(list(probs), dtype=torch.float32)  # [len(probs)]
    _check_probabilities(values)
    if len(token_ids) == 0:
        _check_dense_size(values, vocab_size)
        return values
    if len(token_ids) != values.numel():
        raise InvalidArgumentError(
            f"sparse draft distribution has {len(token_ids)} token ids but {values.numel()} probabilities"
        )
    ids = torch.tensor(list(token_ids), dtype=torch.long)  # [support_size]
    out_of_range = (ids < 0) | (ids >= vocab_size)
    if bool(out_of_range.any()):
        bad = int(ids[out_of_range][0])
        raise InvalidArgumentError(
            f"draft distribution token id {bad} is out of range for vocab_size={vocab_size}"
        )
    if int(torch.unique(ids).numel()) != ids.numel():
        raise InvalidArgumentError("sparse draft distribution has duplicate token ids")
    dense = torch.zeros(vocab_size, dtype=torch.float32)
    dense[ids] = values
    return dense


def expand_distributions(
    distributions: Sequence[tuple[Sequence[int], Sequence[float] | torch.Tensor]],
    vocab_size: int,
) -> torch.Tensor:  # [k, vocab_size] float32
    """`expand_distribution` of each (token_ids, probs) pair, stacked. The usual case, every row dense
    tensors (sampling without top-k/top-p), is checked once for the whole block instead of row by row,
    which saves a handful of tensor ops per draft token; the checks and errors are the same."""
    rows = list(distributions)
    if rows and all(len(ids) == 0 and isinstance(values, torch.Tensor) for ids, values in rows):
        for _, values in rows:
            _check_dense_size(values, vocab_size)
        stacked = torch.stack([values.to(torch.float32).flatten() for _, values in rows])  # [k, vocab_size]
        _check_probabilities(stacked)
        return stacked
    return torch.stack([expand_distribution(ids, values, vocab_size) for ids, values in rows])


def _check_probabilities(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise InvalidArgumentError("draft probabilities must be finite and non-negative")


def _check_dense_size(values: torch.Tensor, vocab_size: int) -> None:
    if values.numel() != vocab_size:
        raise InvalidArgumentError(
            f"dense draft distribution has {values.numel()} probabilities, expected vocab_size={vocab_size}"
        )
