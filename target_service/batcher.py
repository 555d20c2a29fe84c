"""Cross-session batching on the target: the blocks of several sessions verified in one forward pass.

A stream's block waits here while a pass runs. When the pass ends, the blocks waiting then (at most one per
session, up to `max_sessions` blocks and `max_tokens` new tokens) go into the next pass together, on the
model thread; under load the sessions fall into step, one pass per round for all of them. The runner's packed
forward (specpipe/runtime/lean_gpt2.py, `forward_packed`) computes every layer's matrix products over all the
sessions' rows at once, which is where the throughput comes from: on the 2-core CPU a pass over 4 sessions'
blocks of 7 tokens costs 36 ms against 65 ms for the 4 passes alone (`docs/benchmarks.md`).

Each block is judged as it would be alone: chaining (target_service/chain.py) and the acceptance rule run per
block, on the block's own rows of logits. Packing changes those logits only as any change in the number of
rows of a matrix product can (float rounding, the same kind of difference as verifying a block against
decoding it token by token), so greedy outputs stay the target's own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from target_service.chain import VerifyChain
from target_service.verifier import Verdict, Verifier, VerifyBlock

# Event-loop turns between the end of a pass and the start of the next: the streams whose verdicts just went
# out take them to send their next block, which a chained stream already has at hand (chain.py), so it joins
# this pass instead of waiting for the one after.
GATHER_TURNS = 4


@dataclass(slots=True)
class BatchCounters:
    """Per worker (reported by GetStats): forward passes run here, and the blocks they verified."""

    passes: int = 0
    blocks: int = 0
    largest: int = 0  # the most blocks one pass has verified


@dataclass(slots=True)
class _Job:
    chain: VerifyChain
    block: VerifyBlock
    new_tokens: int  # tokens the stream sent for it: the forward's rows, unless the cache was lost
    verdict: asyncio.Future[Verdict]


class VerifyBatcher:
    def __init__(
        self,
        submit: Callable[..., asyncio.Future[Any]],  # runs a function on the model thread
        verifier: Callable[[], Verifier],
        max_sessions: int,
        max_tokens: int,
    ) -> None:
        if max_sessions < 1 or max_tokens < 1:
            raise ValueError(f"max_sessions and max_tokens must be >= 1, got {max_sessions}, {max_tokens}")
        self.submit = submit
        self.verifier = verifier
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.counters = BatchCounters()
        self._waiting: deque[_Job] = deque()
        self._busy = False  # a pass runs, or the next one is gathering its blocks
        self._gathering: asyncio.Future[None] | None = None

    @property
    def idle(self) -> bool:
        return not self._busy and not self._waiting

    async def verify(self, chain: VerifyChain, block: VerifyBlock, new_tokens: int) -> Verdict:
        """The block's verdict, from the next pass that has room for it."""
        job = _Job(chain, block, new_tokens, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        if not self._busy:
            self._start()
        return await job.verdict

    def _start(self) -> None:
        jobs = self._take()
        if not jobs:
            self._busy = False
            return
        self._busy = True
        try:
            running = self.submit(self._run, [(job.chain, job.block) for job in jobs])
        except BaseException as exc:  # the model thread is gone (shutdown)
            self._busy = False
            for job in jobs:
                if not job.verdict.done():
                    job.verdict.set_exception(exc)
            raise
        running.add_done_callback(lambda done: self._finished(jobs, done))

    def _take(self) -> list[_Job]:
        """The waiting blocks of the next pass, oldest first; the rest keep their order."""
        taken: list[_Job] = []
        sessions: set[str] = set()
        tokens = 0
        kept: deque[_Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.verdict.done():  # its stream was cancelled while it waited
                continue
            fits = len(taken) < self.max_sessions and tokens + job.new_tokens <= self.max_tokens
            if job.block.session_id in sessions or (taken and not fits):
                kept.append(job)
                continue
            taken.append(job)
            sessions.add(job.block.session_id)
            tokens += job.new_tokens
        self._waiting = kept
        return taken

    def _run(self, jobs: list[tuple[VerifyChain, VerifyBlock]]) -> list[Verdict | Exception | None]:
        """On the model thread: the skips of chained blocks whose assumption failed, one pass for the rest."""
        outcomes: list[Verdict | Exception | None] = [chain.admit(block) for chain, block in jobs]
        to_verify = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if to_verify:
            verdicts = self.verifier().verify_many([jobs[i][1] for i in to_verify])
            for index, verdict in zip(to_verify, verdicts, strict=True):
                chain, block = jobs[index]
                outcomes[index] = verdict if isinstance(verdict, Exception) else chain.record(block, verdict)
            self.counters.passes += 1
            self.counters.blocks += len(to_verify)
            self.counters.largest = max(self.counters.largest, len(to_verify))
        return outcomes

    def _finished(self, jobs: list[_Job], done: asyncio.Future[list[Verdict | Exception | None]]) -> None:
        """On the event loop, when a pass has ended: answers its blocks, then gathers the next pass."""
        failure = None if done.cancelled() else done.exception()
        outcomes: list[Verdict | BaseException | None] = (
            [failure or asyncio.CancelledError()] * len(jobs)
            if failure or done.cancelled()
            else done.result()
        )
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.verdict.done():
                continue
            if outcome is None:  # cannot happen: every block has an outcome after its pass
                job.verdict.set_exception(RuntimeError("a batched block got no verdict"))
            elif isinstance(outcome, BaseException):
                job.verdict.set_exception(outcome)
            else:
                job.verdict.set_result(outcome)
        self._gathering = asyncio.ensure_future(
            self._gather_next()
        )  # held: a task only weakly referenced dies

    async def _gather_next(self) -> None:
        for _ in range(GATHER_TURNS):
            await asyncio.sleep(0)
        self._start()
