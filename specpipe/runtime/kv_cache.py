"""Per-session KV caches with longest-common-prefix reuse and LRU eviction, and prefixes shared across
sessions.

Workers receive the committed history on every call. Each session keeps the token ids whose keys/values are
in its cache; a call reuses the longest common prefix and recomputes only the rest, so a rejected draft
suffix is dropped by cropping, and a session that was evicted (or never seen, e.g. after failover) is
rebuilt from the history it sends. A wrong token is impossible by construction: the cache is only used for
positions whose ids match.

A session that would compute a long prefix another session's cache already holds (the same system prompt,
n completions of one prompt, a conversation forked) starts from a copy of those positions instead
(`shared_prefix` and `copy_prefix`): the keys and values of a position depend only on the tokens up to it, so
the copy is what its own forward would compute, up to the float rounding that different chunkings of the
same tokens already give.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import DynamicCache

from specpipe.runtime.packing import PreallocatedKVCache

# Shorter shared prefixes are computed rather than copied: the scan and the copy would cost about as much.
MIN_SHARED_PREFIX = 16


@dataclass(slots=True)
class SessionKV:
    """The ids whose keys/values `past` holds, in order; `past` is a transformers Cache."""

    token_ids: list[int] = field(default_factory=list)
    past: Any = None
    nbytes: int = 0


def cache_nbytes(past: Any) -> int:
    """Bytes held by a cache's key and value tensors (a transformers Cache, or one that counts itself)."""
    nbytes = getattr(past, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    total = 0
    for layer in getattr(past, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (history extends the cache), at C speed
        return n
    lo, hi = 0, n  # binary search on the first mismatch: prefixes compare at C speed
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SessionKVCacheStore:
    """LRU map session id -> SessionKV, bounded by a number of sessions and a memory budget.

    The budget is enforced after each forward (`account`): least recently used sessions are evicted until
    the total fits, never the session just used, so one session longer than the budget still works.
    """

    def __init__(self, max_sessions: int, max_bytes: int = 0) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 = unlimited), got {max_bytes}")
        self._max_sessions = max_sessions
        self._max_bytes = max_bytes
        self._sessions: OrderedDict[str, SessionKV] = OrderedDict()
        self.total_bytes = 0
        self.evictions = 0
        self.shared_prefixes = 0  # caches started from another session's prefix, and their positions
        self.shared_tokens = 0

    def get_or_create(self, session_id: str) -> SessionKV:
        entry = self._sessions.get(session_id)
        if entry is None:
            entry = SessionKV()
            self._sessions[session_id] = entry
            while len(self._sessions) > self._max_sessions:
                self._evict_oldest()
        else:
            self._sessions.move_to_end(session_id)
        return entry

    def account(self, session_id: str) -> None:
        """Re-measures a session's cache after a forward and evicts others to respect the budget."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return
        nbytes = cache_nbytes(entry.past)
        self.total_bytes += nbytes - entry.nbytes
        entry.nbytes = nbytes
        while self._max_bytes and self.total_bytes > self._max_bytes and len(self._sessions) > 1:
            oldest = next(iter(self._sessions))
            if oldest == session_id:
                break
            self._evict_oldest()

    def shared_prefix(
        self, session_id: str, ids: list[int], reuse: int, limit: int
    ) -> tuple[SessionKV, int] | None:
        """Another session's cache holding the longest prefix of `ids` (at most `limit` positions), where it
        holds at least MIN_SHARED_PREFIX more than the `reuse` positions the session's own cache gives; and
        that prefix's length. None where none does."""
        head = ids[:MIN_SHARED_PREFIX]
        best: tuple[SessionKV, int] | None = None
        for other_id, entry in self._sessions.items():
            if other_id == session_id or entry.past is None or entry.token_ids[:MIN_SHARED_PREFIX] != head:
                continue  # most sessions differ within their first tokens: no full comparison
            shared = min(common_prefix_length(entry.token_ids, ids), entry.past.get_seq_length(), limit)
            if shared - reuse >= MIN_SHARED_PREFIX and (best is None or shared > best[1]):
                best = (entry, shared)
        return best

    def count_shared(self, positions: int) -> None:
        """A session's cache started from another's prefix, `positions` of it not computed."""
        self.shared_prefixes += 1
        self.shared_tokens += positions

    def release(self, session_id: str) -> bool:
        entry = self._sessions.pop(session_id, None)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def _evict_oldest(self) -> None:
        _, entry = self._sessions.popitem(last=False)
        self._drop(entry)
        self.evictions += 1

    def _drop(self, entry: SessionKV) -> None:
        self.total_bytes -= entry.nbytes
        release_slot = getattr(entry.past, "release_slot", None)  # a static KV slot's cache: free the slot
        if callable(release_slot):
            release_slot()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions


def copyable(past: Any) -> bool:
    """Whether `copy_prefix` copies caches of this kind (a runner's empty one tells for all of them)."""
    if isinstance(past, PreallocatedKVCache):
        return True
    return type(past) is DynamicCache and all(type(layer).__name__ == "DynamicLayer" for layer in past.layers)


def copy_prefix(past: Any, length: int, capacity: int, new_cache: Callable[[], Any]) -> Any | None:
    """A new cache holding the first `length` positions of `past` (a transformers DynamicCache or the lean
    forwards' PreallocatedKVCache; `new_cache` makes an empty one of the kind this runner uses), with room
    for `capacity` positions where the kind preallocates; None for a cache that cannot be copied so (static
    KV slots, sliding-window layers, a layer not yet filled...)."""
    if isinstance(past, PreallocatedKVCache):
        copy = new_cache()
        copy.reserve(max(length, capacity))  # once: the forward that follows fills up to capacity
        for source, target in ((past.keys, copy.keys), (past.values, copy.values)):
            for layer, buffer in enumerate(source):
                target[layer][:, :length] = buffer[:, :length]  # [heads, length, head_dim]
        copy.length = length
        return copy
    if not copyable(past) or any(layer.keys is None for layer in past.layers):
        return None
    copy = new_cache()
    for index, layer in enumerate(past.layers):
        # [batch, heads, length, head_dim] views: the update's concatenation copies them.
        copy.update(layer.keys[..., :length, :], layer.values[..., :length, :], index)
    return copy
