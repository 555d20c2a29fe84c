"""Cross-session batching of a worker's model calls: the calls of several sessions in one forward pass.

A session's call waits here while a pass runs. When the pass ends, the calls waiting then (at most one per
session, up to `max_sessions` calls and `max_tokens` new tokens; a longer one runs alone) go into the next
pass together, on the model thread; under load the sessions fall into step, one pass per round for all of
them. What a pass does is the worker's `run_batch` (the target verifies blocks, target_service/batching.py;
the draft drafts them, draft_service/drafter.py): it returns one result or exception per call, so a call
that fails leaves the others their results.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

CallT = TypeVar("CallT")
ResultT = TypeVar("ResultT")

# Event-loop turns between the end of a pass and the start of the next: the streams whose results just went
# out take them to send their next call, which a chained target stream already has at hand
# (target_service/chain.py), so it joins this pass instead of waiting for the one after.
GATHER_TURNS = 4


@dataclass(slots=True)
class BatchCounters:
    """Per worker (reported by GetStats): passes the batcher ran, the calls they answered, the largest."""

    passes: int = 0
    calls: int = 0
    largest: int = 0


@dataclass(slots=True)
class _Waiting(Generic[CallT, ResultT]):
    session_id: str
    new_tokens: int
    call: CallT
    result: asyncio.Future[ResultT]


class SessionBatcher(Generic[CallT, ResultT]):
    def __init__(
        self,
        submit: Callable[..., asyncio.Future[Any]],  # runs a function on the model thread
        run_batch: Callable[[Sequence[CallT]], Sequence[ResultT | Exception]],  # on the model thread
        max_sessions: int,
        max_tokens: int,
    ) -> None:
        if max_sessions < 1 or max_tokens < 1:
            raise ValueError(f"max_sessions and max_tokens must be >= 1, got {max_sessions}, {max_tokens}")
        self.submit = submit
        self.run_batch = run_batch
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.counters = BatchCounters()
        self._waiting: deque[_Waiting[CallT, ResultT]] = deque()
        self._busy = False  # a pass runs, or the next one is gathering its calls
        self._gathering: asyncio.Future[None] | None = None

    @property
    def idle(self) -> bool:
        return not self._busy and not self._waiting

    async def run(self, session_id: str, new_tokens: int, call: CallT) -> ResultT:
        """The call's result, from the next pass that has room for it."""
        waiting = _Waiting[CallT, ResultT](
            session_id, new_tokens, call, asyncio.get_running_loop().create_future()
        )
        self._waiting.append(waiting)
        if not self._busy:
            self._start()
        return await waiting.result

    def _start(self) -> None:
        taken = self._take()
        if not taken:
            self._busy = False
            return
        self._busy = True
        try:
            running = self.submit(self._run, [waiting.call for waiting in taken])
        except BaseException as exc:  # the model thread is gone (shutdown)
            self._busy = False
            for waiting in taken:
                if not waiting.result.done():
                    waiting.result.set_exception(exc)
            raise
        running.add_done_callback(lambda done: self._finished(taken, done))

    def _take(self) -> list[_Waiting[CallT, ResultT]]:
        """The waiting calls of the next pass, oldest first; the rest keep their order."""
        taken: list[_Waiting[CallT, ResultT]] = []
        sessions: set[str] = set()
        tokens = 0
        kept: deque[_Waiting[CallT, ResultT]] = deque()
        while self._waiting:
            waiting = self._waiting.popleft()
            if waiting.result.done():  # its caller was cancelled while it waited
                continue
            fits = len(taken) < self.max_sessions and tokens + waiting.new_tokens <= self.max_tokens
            if waiting.session_id in sessions or (taken and not fits):
                kept.append(waiting)
                continue
            taken.append(waiting)
            sessions.add(waiting.session_id)
            tokens += waiting.new_tokens
        self._waiting = kept
        return taken

    def _run(self, calls: list[CallT]) -> Sequence[ResultT | Exception]:
        results = self.run_batch(calls)
        self.counters.passes += 1
        self.counters.calls += len(calls)
        self.counters.largest = max(self.counters.largest, len(calls))
        return results

    def _finished(
        self, taken: list[_Waiting[CallT, ResultT]], done: asyncio.Future[Sequence[ResultT | Exception]]
    ) -> None:
        """On the event loop, when a pass has ended: answers its calls, then gathers the next pass."""
        failure: BaseException | None = asyncio.CancelledError() if done.cancelled() else done.exception()
        results: Sequence[ResultT | BaseException] = [failure] * len(taken) if failure else done.result()
        for waiting, result in zip(taken, results, strict=True):
            if waiting.result.done():
                continue
            if isinstance(result, BaseException):
                waiting.result.set_exception(result)
            else:
                waiting.result.set_result(result)
        self._gathering = asyncio.ensure_future(
            self._gather_next()
        )  # held: a task only weakly referenced dies

    async def _gather_next(self) -> None:
        for _ in range(GATHER_TURNS):
            await asyncio.sleep(0)
        self._start()
