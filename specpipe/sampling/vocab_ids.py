"""Token ids a request names, as an index into a row of logits. Torch only."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ids_in_vocab"]


def ids_in_vocab(token_ids: Iterable[int], vocab_size: int) -> torch.Tensor:  # [m] long
    """The ids the model can produce, in order: ids past the vocabulary (which the coordinator refuses where a
    client names them) are left out rather than failing a worker, as Hugging Face leaves them out."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    return ids[(ids >= 0) & (ids < vocab_size)]
