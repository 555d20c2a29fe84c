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

__all__ = [
    "compact_distribution",
    "compact_support",
    "compact_supports",
    "expand_distribution",
    "expand_distributions",
    "sample_draft_token",
]


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


def compact_supports(
    probs: torch.Tensor,  # [k, vocab_size]
) -> list[tuple[list[int], torch.Tensor]]:
    """`compact_support` of each row, with one support search for the whole block (a drafted block's q
    rows, compacted once the block is drafted instead of token by token)."""
    if probs.dim() != 2:
        raise InvalidArgumentError(f"probs must be a 2-D tensor, got shape {tuple(probs.shape)}")
    rows, ids = torch.nonzero(probs, as_tuple=True)  # [total support] each, row-major
    sizes = torch.bincount(rows, minlength=probs.shape[0]).tolist()  # [k]
    values = probs[rows, ids].to(torch.float32)  # [total support]
    out: list[tuple[list[int], torch.Tensor]] = []
    start = 0
    for row, size in enumerate(sizes):
        if 0 < size and 2 * size <= probs.shape[1]:
            out.append((ids[start : start + size].tolist(), values[start : start + size]))
        else:
            out.append(([], probs[row].to(torch.float32)))
        start += size
    return out


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
    """`expand_distribution` of each (token_ids, probs) pair, stacked, checked and built once for the whole
    block: a block of dense rows is one stack; in a mixed one, dense rows are copied in and every sparse
    row's values scattered to their ids by one index_put. The checks and errors are `expand_distribution`'s;
    where several rows are bad, the error may name another one. Row by row, a sparse row (sampling with top-k
    or top-p) cost ~0.23 ms on the 2-core CPU, so a 6-token block ~1.4 ms on the verify's critical path; the
    block at once costs about a tenth of that."""
    if vocab_size <= 0:
        raise InvalidArgumentError(f"vocab_size must be positive, got {vocab_size}")
    rows = list(distributions)
    values = [
        probs.to(torch.float32).flatten()  # [len(probs)]
        if isinstance(probs, torch.Tensor)
        else torch.tensor(list(probs), dtype=torch.float32)
        for _, probs in rows
    ]
    if not rows:
        return torch.zeros(0, vocab_size, dtype=torch.float32)
    if all(len(token_ids) == 0 for token_ids, _ in rows):
        # Every row dense (sampling without top-k/top-p, the usual case): one stack, no scatter. 73 against
        # 134 us for a 6-row block of 4096 on the 2-core CPU, on the verify's critical path.
        for row_values in values:
            _check_dense_size(row_values, vocab_size)
        block = torch.stack(values)  # [k, vocab_size]
        _check_probabilities(block.view(-1))
        return block
    _check_probabilities(torch.cat(values))
    dense = torch.zeros(len(rows), vocab_size, dtype=torch.float32)  # [k, vocab_size]
    sparse_rows: list[int] = []
    sparse_ids: list[int] = []
    sparse_values: list[torch.Tensor] = []
    for row, ((token_ids, _), row_values) in enumerate(zip(rows, values, strict=True)):
        if len(token_ids) == 0:
            _check_dense_size(row_values, vocab_size)
            dense[row] = row_values
            continue
        if len(token_ids) != row_values.numel():
            raise InvalidArgumentError(
                f"sparse draft distribution has {len(token_ids)} token ids "
                f"but {row_values.numel()} probabilities"
            )
        sparse_rows.extend([row] * len(token_ids))
        sparse_ids.extend(token_ids)
        sparse_values.append(row_values)
    ids = torch.tensor(sparse_ids, dtype=torch.long)  # [total support]
    out_of_range = (ids < 0) | (ids >= vocab_size)
    if bool(out_of_range.any()):
        bad = int(ids[out_of_range][0])
        raise InvalidArgumentError(
            f"draft distribution token id {bad} is out of range for vocab_size={vocab_size}"
        )
    row_index = torch.tensor(sparse_rows, dtype=torch.long)  # [total support]
    if int(torch.unique(row_index * vocab_size + ids).numel()) != ids.numel():
        raise InvalidArgumentError("sparse draft distribution has duplicate token ids")
    dense.index_put_((row_index, ids), torch.cat(sparse_values))
    return dense


def _check_probabilities(values: torch.Tensor) -> None:
    if values.numel() == 0:
        return
    # One pass (a block's q is k x vocab_size values): NaN fails both comparisons.
    smallest, largest = torch.aminmax(values)
    if not (float(smallest) >= 0.0 and float(largest) < float("inf")):
        raise InvalidArgumentError("draft probabilities must be finite and non-negative")


def _check_dense_size(values: torch.Tensor, vocab_size: int) -> None:
    if values.numel() != vocab_size:
        raise InvalidArgumentError(
            f"dense draft distribution has {values.numel()} probabilities, expected vocab_size={vocab_size}"
        )
