"""What the lean forwards (specpipe/runtime/lean_gpt2.py, lean_llama.py) share: the preallocated per-session
KV cache, and the bookkeeping of a packed pass (several sessions' new tokens in one pass): where each
session's rows sit in the packed matrix, which positions they take in its cache, what each may attend to, and
which rows give logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

INITIAL_CAPACITY = 256  # positions; the buffers double as a session grows, up to the model's context


class PreallocatedKVCache:
    """Keys and values of one session, per layer [heads, capacity, head_dim], of which `length` are valid.

    Rolling back rejected draft tokens only lowers `length`; appending writes in place (growing the buffers
    by doubling when full), so a step never copies the whole cache as concatenation does.
    """

    def __init__(
        self, num_layers: int, heads: int, head_dim: int, max_length: int, like: torch.Tensor
    ) -> None:
        self.max_length = max_length
        capacity = min(INITIAL_CAPACITY, max_length)
        self.keys = [like.new_zeros(heads, capacity, head_dim) for _ in range(num_layers)]
        self.values = [like.new_zeros(heads, capacity, head_dim) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """transformers' Cache.crop semantics: keep the first `max_length` positions (negative: drop that many
        from the end)."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(max_length, self.length))

    def reserve(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(f"{length} positions exceed the model's context of {self.max_length}")
        if length <= self.capacity:
            return
        capacity = min(max(length, 2 * self.capacity), self.max_length)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = old.new_zeros(old.shape[0], capacity, old.shape[2])
                grown[:, : self.length] = old[:, : self.length]
                buffers[i] = grown


def causal_mask(count: int, start: int, device: torch.device) -> torch.Tensor | None:
    """[count, start + count]: True where a new row must not attend, the positions after its own (row i sees
    the cache and the new rows up to itself); None for one row, which sees everything."""
    if count == 1:
        return None
    return torch.ones(count, start + count, dtype=torch.bool, device=device).triu(start + 1)


@dataclass(frozen=True, slots=True)
class Span:
    """One session's rows of a packed pass."""

    offset: int  # its first row in the packed matrix
    start: int  # the cache position of its first row (the positions already cached)
    count: int  # its rows: the new tokens
    num_rows: int  # its last rows whose logits are wanted
    # [count, start + count] True where a row must not attend (a later position); None for one row.
    hidden: torch.Tensor | None

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class Packed:
    ids: torch.Tensor  # [total] every session's new token ids, session after session
    positions: torch.Tensor  # [total] their positions
    spans: list[Span]

    @classmethod
    def of(
        cls, items: Sequence[tuple[Sequence[int], PreallocatedKVCache, int]], device: torch.device
    ) -> Packed:  # items: (new_ids, cache, num_rows) per session
        """Reserves each cache's room for its new tokens and lays the sessions out one after the other."""
        spans: list[Span] = []
        all_ids: list[int] = []
        positions: list[torch.Tensor] = []
        for new_ids, cache, num_rows in items:
            count, start = len(new_ids), cache.length
            cache.reserve(start + count)
            spans.append(Span(len(all_ids), start, count, num_rows, causal_mask(count, start, device)))
            all_ids.extend(new_ids)
            positions.append(torch.arange(start, start + count, device=device))
        ids = torch.tensor(all_ids, dtype=torch.long, device=device)
        return cls(ids, torch.cat(positions) if len(positions) > 1 else positions[0], spans)

    def logit_rows(self) -> torch.Tensor:  # [sum of num_rows]
        """The packed rows whose logits the sessions want: each one's last num_rows."""
        device = self.ids.device
        return torch.cat(
            [
                torch.arange(s.offset + s.count - s.num_rows, s.offset + s.count, device=device)
                for s in self.spans
            ]
        )

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:  # [num_rows, vocab_size] per session
        return list(logits.split([span.num_rows for span in self.spans]))

    def commit(self, caches: Sequence[PreallocatedKVCache]) -> None:
        """After the pass: each cache holds its session's new positions."""
        for span, cache in zip(self.spans, caches, strict=True):
            cache.length = span.end
