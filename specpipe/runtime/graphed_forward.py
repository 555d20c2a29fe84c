"""Forwards over static KV slots, replayed as CUDA graphs on a GPU: the verify path of a launch-bound target.

On a GPU at batch 1 an eager forward is bound by kernel launches, not by reading the weights: a 7B-shaped
Llama took 22.6 ms per forward in eager PyTorch where its memory-bandwidth floor is 4.5 ms
(docs/benchmarks.md, `specpipe bench floor`). A CUDA graph replays every kernel of a captured forward with
one launch. Capturing needs every address and shape fixed, so this module owns static buffers (as vLLM's
and nano-vllm's graph runners do, and as `generate` with transformers' StaticCache could not, per
shared/README.md):

- **slots**: the KV caches of `slots` sessions, preallocated per layer at the full context, so a session's
  keys and values never move. A session takes a free slot, or the least recently used one; the session that
  lost it reads as an empty cache and is rebuilt from its history on its next call (the runner's usual path
  for an evicted session), never a wrong token. A session the runner's cache store drops frees its slot.
- **inputs**: one [2, GRAPH_MAX_TOKENS] buffer of (token ids, positions) that each call copies into.
- **shapes**: attention reads the slot's first `key_len` positions, key_len rounded up to a multiple of
  `context_bucket`, and masks the positions after each row's own. So a graph serves every context length of
  its bucket, and one is captured per (slot, new tokens, bucket): those of the first bucket at start-up
  (`capture_first_bucket`, as vLLM captures its batch sizes before serving), the others on first use.

The lean models' `static_forward` is the captured function; it runs eagerly where there is no graph: on the
CPU (the tests run this path), for forwards of more than GRAPH_MAX_TOKENS new tokens (prefills), or with
`cuda_graphs=False`. A verify feeds k + 1 tokens, so every k up to GRAPH_MAX_TOKENS - 1 is graphed (a longer
block runs eagerly: correct, launch-bound).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

# The most new tokens a captured forward takes: k + 1 for every k up to the coordinator's default maximum
# of 16 (so a profile's or a block's k = 16 replays a graph too), and one to spare.
GRAPH_MAX_TOKENS = 18
# Attention reads the cache up to the next multiple of this many positions. 512 puts a typical request (a
# prompt of a few hundred tokens and its answer) in the first bucket, whose graphs are captured at start-up,
# instead of capturing the next bucket's inside timed requests; the masked positions it reads cost little
# beside the weights (a 7B-shaped Llama's 512 positions are ~2% of its weight bytes in bfloat16).
CONTEXT_BUCKET = 512
WARMUP_RUNS = 2  # eager runs on a side stream before a capture, as torch.cuda.graphs asks

__all__ = ["CONTEXT_BUCKET", "GRAPH_MAX_TOKENS", "GraphedForward", "SlotKVCache", "SlotPool", "capture_graph"]


def capture_graph(run: Callable[[], torch.Tensor], side: Any, memory_pool: Any) -> tuple[Any, torch.Tensor]:
    """A CUDA graph of `run` (device work only, reading static buffers) and the tensor its replays write.

    `run` is called WARMUP_RUNS times first, on the side stream (a torch.cuda.Stream) the capture then records
    on, as torch.cuda.graphs asks (per-stream state such as cuBLAS workspaces is set up before capturing).
    Every capture of a pool uses the same side stream, as torch.cuda.graph's default capture stream is
    shared: the caching allocator reuses a freed block only on the stream that freed it. Graphs that share
    `memory_pool` must run one at a time, and each replay's output be read before the next.
    """
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            run()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory_pool, stream=side):
        output = run()
    current.wait_stream(side)
    return graph, output


class StaticForwardModel(Protocol):
    """What a lean model (specpipe/runtime/lean_gpt2.py, lean_llama.py) offers this module."""

    token_embedding: torch.Tensor
    max_length: int

    def kv_layout(self) -> tuple[int, int, int]: ...  # (layers, key/value heads, head_dim)

    def static_forward(
        self,
        ids: torch.Tensor,  # [count] new token ids
        positions: torch.Tensor,  # [count] their positions
        hidden: torch.Tensor,  # [count, key_len] True where a row must not attend
        keys: Sequence[torch.Tensor],  # per layer [kv_heads, capacity, head_dim], capacity >= key_len
        values: Sequence[torch.Tensor],
        logit_rows: int,  # logits for the last logit_rows rows only (a prefill needs one, a graph all)
    ) -> torch.Tensor:  # [logit_rows, vocab_size] float32
        """The forward with every shape fixed by (count, key_len) and every position a tensor, so a CUDA graph
        can capture it: keys and values are written at `positions` (`index_copy_`), attention reads the first
        key_len positions of the cache with `hidden` masking the rest. Nothing in it may wait for the device
        or copy from the host."""
        ...


class SlotKVCache:
    """One session's hold on a slot: the pool's buffers hold its first `length` positions while it owns the
    slot. It reads as empty (`get_seq_length` 0) once another session has taken the slot over."""

    __slots__ = ("_pool", "_length", "slot")

    def __init__(self, pool: SlotPool, slot: int) -> None:
        self._pool = pool
        self.slot = slot
        self._length = 0

    @property
    def owned(self) -> bool:
        return self._pool.owner(self.slot) is self

    @property
    def length(self) -> int:
        return self._length if self.owned else 0

    @length.setter
    def length(self, value: int) -> None:
        self._length = value

    @property
    def nbytes(self) -> int:
        """0: the slots are allocated once, up front, whichever sessions use them (budgets do not apply)."""
        return 0

    def get_seq_length(self) -> int:
        return self.length

    def release_slot(self) -> None:
        """The session is gone (released or evicted by the runner's cache store): its slot is free again."""
        self._pool.release(self)

    def crop(self, max_length: int) -> None:
        """transformers' Cache.crop semantics: keep the first `max_length` positions (negative: drop that many
        from the end)."""
        length = self.length
        self._length = max(0, length + max_length if max_length < 0 else min(max_length, length))


class SlotPool:
    """Keys and values of `slots` sessions, per slot and layer [kv_heads, capacity, head_dim], allocated
    once."""

    def __init__(self, slots: int, layout: tuple[int, int, int], capacity: int, like: torch.Tensor) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        layers, heads, head_dim = layout
        self.capacity = capacity
        self.keys, self.values = (
            [[like.new_zeros(heads, capacity, head_dim) for _ in range(layers)] for _ in range(slots)]
            for _ in range(2)
        )
        self._owners: list[SlotKVCache | None] = [None] * slots
        self._by_use: OrderedDict[int, None] = OrderedDict.fromkeys(range(slots))  # least recently used first
        self.takeovers = 0  # slots taken from a session that still held them

    @property
    def slots(self) -> int:
        return len(self._owners)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in (*self.keys, *self.values) for t in slot)

    def owner(self, slot: int) -> SlotKVCache | None:
        return self._owners[slot]

    def acquire(self) -> SlotKVCache:
        """An empty cache on a free slot, else on the least recently used one (free slots come first in
        that order: never used, or released)."""
        slot = next(iter(self._by_use))
        if self._owners[slot] is not None:
            self.takeovers += 1
        cache = SlotKVCache(self, slot)
        self._owners[slot] = cache
        self.touch(slot)
        return cache

    def touch(self, slot: int) -> None:
        self._by_use.move_to_end(slot)

    def release(self, cache: SlotKVCache) -> None:
        """Frees the cache's slot if it still holds it; a free slot is the next one taken."""
        if self._owners[cache.slot] is cache:
            self._owners[cache.slot] = None
            self._by_use.move_to_end(cache.slot, last=False)

    def free_all(self) -> None:
        """Every slot free again (after a warm-up: no session held one)."""
        self._owners = [None] * len(self._owners)


class GraphedForward:
    """`forward(new_ids, cache, num_rows)` and `new_cache()` as the lean models offer them, over a SlotPool,
    replaying CUDA graphs where it can."""

    def __init__(
        self,
        model: StaticForwardModel,
        slots: int,
        max_context: int = 0,
        cuda_graphs: bool = True,
        context_bucket: int = CONTEXT_BUCKET,
    ) -> None:
        if context_bucket < 1:
            raise ValueError(f"context_bucket must be >= 1, got {context_bucket}")
        self.model = model
        self.device = model.token_embedding.device
        self.capacity = min(max_context, model.max_length) if max_context else model.max_length
        self.context_bucket = context_bucket
        self.pool = SlotPool(slots, model.kv_layout(), self.capacity, like=model.token_embedding)
        self.key_positions = torch.arange(self.capacity, device=self.device)  # [capacity]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._inputs = torch.zeros(2, GRAPH_MAX_TOKENS, dtype=torch.long, device=self.device)
        # (slot, new tokens, key_len) -> the graph (a torch.cuda.CUDAGraph) and the logits its replays write.
        self._graphs: dict[tuple[int, int, int], tuple[Any, torch.Tensor]] = {}
        self._memory_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._capture_stream = torch.cuda.Stream(self.device) if self.cuda_graphs else None

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def new_cache(self) -> SlotKVCache:
        return self.pool.acquire()

    def capture_first_bucket(self) -> int:
        """Captures the graphs of every slot and token count (1..GRAPH_MAX_TOKENS) whose context fits the
        first bucket, so the first requests pay no capture; returns the graphs captured (0 without graphs).
        The slots are free afterwards."""
        if not self.cuda_graphs:
            return 0
        for _ in range(self.pool.slots):  # acquire() goes round the free slots, least recently used first
            cache = self.new_cache()
            for count in range(1, min(GRAPH_MAX_TOKENS, self.capacity) + 1):
                self.forward([0] * count, cache, 1)
                cache.crop(0)
        self.pool.free_all()
        return self.captured

    def key_length(self, end: int) -> int:
        """The positions attention reads for a forward ending at `end`: `end` rounded up to the bucket."""
        return min(self.capacity, -(-end // self.context_bucket) * self.context_bucket)

    @torch.inference_mode()
    def forward(
        self, new_ids: Sequence[int], cache: SlotKVCache, num_rows: int
    ) -> torch.Tensor:  # [num_rows, vocab_size] float32
        """Appends `new_ids` after the cache's valid positions; logits for the last `num_rows` of them. A
        graph's logits are overwritten by its next replay: copy them (`.cpu()`) before the next forward."""
        if not cache.owned:
            raise ValueError("the cache's slot belongs to another session now: start a new cache")
        count, start = len(new_ids), cache.length
        end = start + count
        if end > self.capacity:
            raise ValueError(f"{end} positions exceed the static KV slots' context of {self.capacity}")
        self.pool.touch(cache.slot)
        key_len = self.key_length(end)
        host = torch.tensor([list(new_ids), list(range(start, end))], dtype=torch.long)  # [2, count]
        if self.cuda_graphs and count <= GRAPH_MAX_TOKENS:
            inputs = self._inputs[:, :count]  # a fixed address: what the graphs read
            inputs.copy_(host)
            key = (cache.slot, count, key_len)
            captured = self._graphs.get(key)
            if captured is None:
                # Its warm-up runs write this call's keys and values at this call's positions, which the
                # replay below writes again: nothing a session can read changes.
                slot = cache.slot
                captured = capture_graph(
                    lambda: self._step(inputs, slot, key_len, count), self._capture_stream, self._memory_pool
                )
                self._graphs[key] = captured
            graph, logits = captured
            graph.replay()
            logits = logits[count - num_rows :]
        else:
            # Only the rows asked for: a prompt's prefill would otherwise make [prompt, vocab] logits on the
            # device (2k positions of a 128k vocabulary: 1 GB of float32) to keep one row.
            logits = self._step(host.to(self.device), cache.slot, key_len, num_rows)
        cache.length = end
        return logits

    def _step(
        self, inputs: torch.Tensor, slot: int, key_len: int, logit_rows: int
    ) -> torch.Tensor:  # [logit_rows, vocab_size]
        """The forward of inputs [2, count] (ids; positions) on a slot, with the logits of its last logit_rows
        rows: device work only, nothing that waits for the device or copies from the host, so a graph can
        capture it."""
        ids, positions = inputs[0], inputs[1]
        # [count, key_len]: a row sees the positions up to its own (the cache and the new rows before it).
        hidden = self.key_positions[:key_len][None, :] > positions[:, None]
        keys, values = self.pool.keys[slot], self.pool.values[slot]
        return self.model.static_forward(ids, positions, hidden, keys, values, logit_rows)
