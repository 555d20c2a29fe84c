"""Which draft-target pairs are delegated to: a pair whose delegated call failed before its first round is
skipped for a while.

Such a failure usually repeats for every request: the draft cannot reach the target (a network policy, an
address only the coordinator resolves), or the draft worker predates DraftService.Speculate (UNIMPLEMENTED)
during a rolling upgrade. The request itself is finished by the coordinator's own loop either way; without
a back-off every request would pay the failed attempt again, which may take up to the worker timeout when the
connection hangs rather than failing at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DelegationBackoff:
    def __init__(self, backoff_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_s = backoff_s
        self.clock = clock
        self._until: dict[tuple[str, str], float] = {}  # (draft, target) address -> skipped until

    def allowed(self, draft: str, target: str) -> bool:
        until = self._until.get((draft, target))
        if until is None:
            return True
        if self.clock() >= until:
            del self._until[(draft, target)]
            return True
        return False

    def failed(self, draft: str, target: str) -> None:
        self._until[(draft, target)] = self.clock() + self.backoff_s
