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
    """LRU map session id -> SessionKV, bounded by a number of sessions."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[str, SessionKV] = OrderedDict()

    def get_or_create(self, session_id: str) -> SessionKV:
        entry = self._sessions.get(session_id)
        if entry is None:
            entry = SessionKV()
            self._sessions[session_id] = entry
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session_id)
        return entry

    def release(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions
