"""The coordinator's concurrency limit, shared by the gRPC and HTTP APIs, with an optional waiting line.

A request holds one slot per completion (n completions: n slots) while it runs. Where the limit is full it
is refused at once with RESOURCE_EXHAUSTED (TGI's `--max-concurrent-requests`), unless a waiting line is
configured (`--max-waiting-requests`): then up to that many requests wait for their slots, by priority
(lower first, vLLM's request priority) and first come first served among equals (as vLLM queues requests
beyond its batch), and only a request finding the line full is refused. The line's head is served first: a
request too large to fit yet keeps those behind it waiting.
A waiting request leaves the line when its client cancels it or when its deadline passes
(DEADLINE_EXCEEDED); the slots it was granted but could not take are handed on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from specpipe.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError


@dataclass(slots=True)
class Waiter:
    slots: int
    granted: asyncio.Future[None]
    priority: int = 0  # lower first; equal: first come first served


@dataclass(slots=True)
class ConcurrencyLimit:
    limit: int  # slots held at once
    max_waiting: int = 0  # requests that may wait for slots (0: refused at once)
    running: int = 0  # slots held now
    line: deque[Waiter] = field(default_factory=deque)

    @property
    def waiting(self) -> int:
        return len(self.line)

    @contextlib.asynccontextmanager
    async def hold(
        self, slots: int, time_remaining: Callable[[], float | None], priority: int = 0
    ) -> AsyncIterator[None]:
        """Holds `slots` while the body runs: at once, after a wait in line (by `priority`, lower first), or
        refused."""
        if slots > self.limit:
            raise InvalidArgumentError(
                f"{slots} completions at once are above the coordinator's limit of {self.limit} concurrent "
                "requests (--max-concurrent-requests)"
            )
        if not self.line and self.running + slots <= self.limit:
            self.running += slots
        else:
            await self.wait(slots, time_remaining, priority)
        try:
            yield
        finally:
            self.running -= slots
            self.hand_on()

    async def wait(self, slots: int, time_remaining: Callable[[], float | None], priority: int = 0) -> None:
        """Waits in line, behind every waiter of a lower or equal priority value, until `slots` are granted
        (hand_on adds them to `running`)."""
        if len(self.line) >= self.max_waiting:
            waiting = f" and {len(self.line)} waiting" if self.max_waiting else ""
            raise ResourceExhaustedError(
                f"the coordinator is serving {self.running} of its limit of {self.limit} concurrent requests "
                f"(--max-concurrent-requests){waiting}, too many for {slots} more: retry later"
            )
        waiter = Waiter(slots, asyncio.get_running_loop().create_future(), priority)
        # Behind every waiter of a lower or equal value (the line is short: a scan is enough).
        place = next((i for i, other in enumerate(self.line) if other.priority > priority), len(self.line))
        self.line.insert(place, waiter)
        try:
            done, _ = await asyncio.wait({waiter.granted}, timeout=time_remaining())
        except asyncio.CancelledError:
            self.leave(waiter)
            raise
        if not done:
            self.leave(waiter)
            raise DeadlineExceededError("the request's deadline passed while it waited for a slot")

    def leave(self, waiter: Waiter) -> None:
        """A waiter that gives up: out of the line, or, where it was granted its slots meanwhile, they are
        handed on."""
        if waiter.granted.done():
            self.running -= waiter.slots
        else:
            waiter.granted.cancel()
            self.line.remove(waiter)
        # Either way those behind it may fit now (the head of the line never fits after any change: what
        # `hold`'s way past the line relies on).
        self.hand_on()

    def hand_on(self) -> None:
        """Grants the head of the line its slots while they fit (by priority, then first come first served:
        one that does not fit yet keeps those behind it waiting)."""
        while self.line and self.running + self.line[0].slots <= self.limit:
            waiter = self.line.popleft()
            self.running += waiter.slots
            waiter.granted.set_result(None)
