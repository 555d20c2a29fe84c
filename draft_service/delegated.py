"""Delegated speculation: one request's rounds run on the draft worker, beside the draft model.

The coordinator's loop (coordinator/speculation.py) moves every block and verdict through the coordinator:
after a rejection that is four one-way messages and two passes through its event loop before the target
works again. Here the draft drafts locally and talks to the target directly over the target's session
stream, so that round costs one message each way. Everything that decides tokens is unchanged: the target
owns the acceptance rule, drafting is keyed by (seed, position), and the schedule is the coordinator's
policy with its costs and limits (specpipe/speculation/), so the rounds are those the coordinator's loop would
run. Pipelining and chaining work as there: while the target verifies a block, the next one (after a guess
of the bonus token) is drafted and queued behind it on the target stream.

The coordinator commits and streams each round it receives; when this call fails it continues the request
itself from the tokens it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from draft_service.drafter import DraftProposal, DraftRequest
from specpipe.rpc.worker_clients import TargetClient, TargetStream, call_timeout
from specpipe.speculation.delegation import DelegatedRequest, SpeculationRound
from specpipe.speculation.rounds import NO_PROPOSAL, Proposal, QueuedBlock, RoundPlanner, Verification

logger = logging.getLogger(__name__)

# Runs a drafter call: `inline` when the caller waits for it anyway (on the event loop if the model thread
# is idle); otherwise on the model thread, so the event loop stays free to send and receive meanwhile.
RunDrafter = Callable[[DraftRequest, bool], Awaitable[DraftProposal]]


class TargetClients:
    """One channel per target address this worker delegates to, kept for the worker's lifetime."""

    def __init__(self) -> None:
        self._clients: dict[str, TargetClient] = {}

    def get(self, address: str) -> TargetClient:
        if address not in self._clients:
            self._clients[address] = TargetClient(address)
        return self._clients[address]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class DelegatedRounds:
    def __init__(self, run_drafter: RunDrafter, targets: TargetClients) -> None:
        self.run_drafter = run_drafter
        self.targets = targets
        self._background: set[asyncio.Future[None]] = set()  # streams closing after a stopped request

    async def propose(
        self, request: DelegatedRequest, history: list[int], k: int, inline: bool, bonus_guess: bool = False
    ) -> Proposal:
        drafted = await self.run_drafter(
            DraftRequest(request.session_id, tuple(history), k, request.sampling, bonus_guess), inline
        )
        return Proposal(list(drafted.token_ids), drafted.wire_probs(), drafted.forward_ns)

    async def run(
        self, request: DelegatedRequest, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[SpeculationRound]:
        """The request's rounds, each yielded once verified; ends after the round that finishes it."""

        def worker_call_timeout() -> float:
            return call_timeout(request.worker_timeout_s, time_remaining())

        limits, schedule, sampling = request.limits, request.schedule, request.sampling
        sid = request.session_id
        planner: RoundPlanner[None] = RoundPlanner(
            schedule.policy(), limits, schedule.costs, schedule.pipelining, schedule.chaining
        )
        # The target stream connects while the first block is drafted: that first call is the draft's prefill
        # of the prompt, on the model thread, so the event loop is free to open the connection meanwhile.
        connecting = asyncio.ensure_future(
            self.targets.get(request.target_address).connect_stream(worker_call_timeout())
        )
        stream: TargetStream | None = None
        history = list(request.token_ids)
        generated = 0
        verify: asyncio.Future[Verification] | None = None
        first_call = True  # a prefill: on the model thread, never inline
        try:
            while True:
                remaining = request.max_new_tokens - generated
                plan = planner.block(history, remaining)
                k, proposal, draft_ns = plan.k, plan.prepared or NO_PROPOSAL, 0
                if k > 0 and plan.prepared is None:
                    proposal = await self.propose(request, history, k, inline=not first_call)
                    first_call = False
                    draft_ns = proposal.forward_ns
                if stream is None:
                    stream = await connecting
                draft_ids = proposal.token_ids[:k]
                k = len(draft_ids)
                if plan.queued is not None:
                    verify = asyncio.ensure_future(
                        self.chained_verdict(
                            stream, request, history, draft_ids, proposal, worker_call_timeout()
                        )
                    )
                else:
                    # Written before any drafting below, which may run on the event loop.
                    await stream.send(sid, history, draft_ids, proposal.draft_probs, sampling)
                    verify = asyncio.ensure_future(stream.receive_verdict(worker_call_timeout()))
                guess: Proposal | None = None
                queued: QueuedBlock[None] | None = None
                ahead = planner.ahead(len(history), draft_ids, remaining)
                if ahead > 0:
                    assumed = [*history, *draft_ids]
                    guess = await self.propose(request, assumed, ahead + 1, inline=False, bonus_guess=True)
                    first_call = False
                    if planner.worth_queueing(guess, verify.done()):
                        queued = QueuedBlock([*assumed, guess.token_ids[0]], None)
                        block = guess.after_guess()
                        await stream.send(
                            sid, queued.history, block.token_ids, block.draft_probs, sampling, chained=True
                        )
                verdict = await asyncio.shield(verify)  # a stop leaves the read to close_after
                verify = None
                if planner.settle(k, verdict, guess, queued) is not None:
                    stream.unwanted_replies += 1  # its (skip) reply is read and dropped before the next
                new_ids, finish_reason = limits.round_tokens(
                    draft_ids, verdict.num_accepted, verdict.next_token_id, remaining, len(history)
                )
                yield SpeculationRound(
                    draft_ids, verdict.num_accepted, verdict.next_token_id, new_ids, finish_reason, draft_ns,
                    verdict.forward_ns, verdict.logprobs[: len(new_ids)], verdict.repetition_penalty,
                    verdict.applied_sampling,
                )  # fmt: skip
                if finish_reason:
                    break
                history.extend(new_ids)
                generated += len(new_ids)
        finally:
            if stream is None:
                self._spawn(self.discard(connecting))
            elif verify is not None and not verify.done():
                # Stopped during a verify (the coordinator cancels the call at a stop string): the verdict is
                # read in the background and the stream then closed normally, so the target keeps the
                # session's cache warm for the next turn (and crops the tokens after the stop then). A
                # request that failed has the coordinator free the caches explicitly.
                self._spawn(self.close_after(verify, stream))
            else:
                await self.close(stream)

    @staticmethod
    async def discard(connecting: asyncio.Future[TargetStream]) -> None:
        """Stops a connection the rounds never used (they failed or stopped during the first draft)."""
        connecting.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            (await connecting).cancel()  # connected before the cancel: nothing was sent on it

    async def close_after(self, verify: asyncio.Future[Verification], stream: TargetStream) -> None:
        with contextlib.suppress(Exception):
            await verify
        await self.close(stream)

    @staticmethod
    async def close(stream: TargetStream) -> None:
        """Ends the target stream: normally (the target keeps the session's cache warm) unless it failed."""
        if stream.broken:
            stream.cancel()
        else:
            await stream.finish()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def chained_verdict(
        self,
        stream: TargetStream,
        request: DelegatedRequest,
        history: list[int],
        draft_ids: list[int],
        proposal: Proposal,
        timeout_s: float,
    ) -> Verification:
        """The verdict of a chained block; a block the target skipped is verified now the ordinary way."""
        verdict = await stream.receive(timeout_s)
        if verdict is not None:
            return verdict
        logger.debug("session %s: the target skipped a chained block", request.session_id)
        await stream.send(request.session_id, history, draft_ids, proposal.draft_probs, request.sampling)
        return await stream.receive_verdict(timeout_s)
