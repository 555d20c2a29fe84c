"""Per-session KV caches with longest-common-prefix reuse and LRU eviction.

Workers receive the committed history on every call. Each session keeps the token ids whose keys/values are
in its cache; a call reuses the longest common prefix and recomputes only the rest, so a rejected draft
suffix is dropped by cropping, and a session that was evicted (or never seen, e.g. after failover) is
rebuilt from the history it sends. A wrong token is impossible by construction: the cache is only used for
positions whose ids match.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


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
