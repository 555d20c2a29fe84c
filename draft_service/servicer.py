"""DraftService RPCs: decode protobuf, call the drafter on the model thread, encode the reply."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from draft_service.delegated import DelegatedRounds, TargetClients
from draft_service.drafter import Drafter, DraftProposal, DraftRequest, ModelDrafter
from specpipe.rpc.session_batcher import SessionBatcher
from specpipe.rpc.worker_servicer import WorkerServicerBase, read_ahead
from specpipe.speculation.delegation import DelegatedRequest
from specpipe.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(WorkerServicerBase[Drafter], draft_pb2_grpc.DraftServiceServicer):
    def __init__(
        self,
        model_thread: ThreadPoolExecutor,
        targets: TargetClients,
        max_batch_sessions: int = 1,
        max_batch_tokens: int = 512,
    ) -> None:
        super().__init__(model_thread)
        self.delegated = DelegatedRounds(self.run_drafter, targets)
        self.delegated_rounds = 0
        # Cross-session batching (specpipe/rpc/session_batcher.py) of a model drafter's proposals.
        self.batcher: SessionBatcher[DraftRequest, DraftProposal] | None = None
        if max_batch_sessions > 1:
            self.batcher = SessionBatcher(
                self.submit, self.propose_batch, max_batch_sessions, max_batch_tokens
            )

    def propose_batch(self, requests: Sequence[DraftRequest]) -> Sequence[DraftProposal | Exception]:
        engine = self.engine
        if isinstance(engine, ModelDrafter):
            return engine.propose_many(requests)
        outcomes: list[DraftProposal | Exception] = []
        for request in requests:  # a model-free drafter: nothing to pack
            try:
                outcomes.append(engine.propose(request))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def run_drafter(self, request: DraftRequest, inline: bool) -> DraftProposal:
        """A proposal: batched with other sessions' where several are drafting, else on its own (inline when
        the caller waits for it anyway and the model thread is idle)."""
        await self.prepare(request)  # the delegated rounds' (a stream's was prepared as it was decoded)
        if self.batcher is not None and self.batching_now():
            # The pass's new tokens: the history too where the session has no cache here (a prefill, which
            # --max-batch-tokens keeps from holding up a pass of short steps).
            prefill = 0 if request.session_id in self.caches else len(request.token_ids)
            return await self.batcher.run(request.session_id, prefill + request.num_tokens, request)
        if inline:
            return await self.run_model(self.engine.propose, request, request.num_tokens)
        return await self.submit(self.engine.propose, request)

    async def run_proposal(self, request: DraftRequest, new_tokens: int) -> DraftProposal:
        return await self.run_drafter(request, inline=True)

    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        draft_request = DraftRequest.from_pb(request)
        await self.prepare(draft_request)
        proposal = await self.on_model_thread(self.engine.propose, draft_request)
        return proposal.to_pb()

    def ProposeStream(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.ProposeResponse]:
        run = self.run_proposal if self.batcher is not None else None
        return self.serve_stream(request_iterator, DraftRequest.from_pb, self.engine.propose, context, run)

    async def Speculate(
        self, request: draft_pb2.SpeculateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.SpeculationRound]:
        delegated = DelegatedRequest.from_pb(request)
        self.engine  # noqa: B018 - UNAVAILABLE while the model loads, before any target stream opens
        self.count_stream(1)
        try:
            # The rounds run in a task of their own (read_ahead), so the loop goes on with the next round
            # while gRPC writes this one, instead of waiting for each write to complete.
            rounds = read_ahead(self.delegated.run(delegated, context.time_remaining))
            async with contextlib.aclosing(rounds):  # closed here: stops the rounds
                async for speculation_round in rounds:
                    self.delegated_rounds += 1
                    yield speculation_round.to_pb()
        finally:
            self.count_stream(-1)

    def stats(self, session_id: str = "") -> common_pb2.WorkerStats:
        stats = super().stats(session_id)
        stats.delegated_rounds = self.delegated_rounds
        return stats
