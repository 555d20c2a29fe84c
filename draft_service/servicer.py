"""DraftService RPCs: decode protobuf, call the drafter on the model thread, encode the reply."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from draft_service.delegated import DelegatedRounds, TargetClients
from draft_service.drafter import Drafter, DraftProposal, DraftRequest
from specpipe.rpc.worker_servicer import WorkerServicerBase, read_ahead
from specpipe.speculation.delegation import DelegatedRequest
from specpipe.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(WorkerServicerBase[Drafter], draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, model_thread: ThreadPoolExecutor, targets: TargetClients) -> None:
        super().__init__(model_thread)
        self.delegated = DelegatedRounds(self.run_drafter, targets)
        self.delegated_rounds = 0

    async def run_drafter(self, request: DraftRequest, inline: bool) -> DraftProposal:
        if inline:
            return await self.run_model(self.engine.propose, request, request.num_tokens)
        return await self.submit(self.engine.propose, request)

    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        proposal = await self.on_model_thread(self.engine.propose, DraftRequest.from_pb(request))
        return proposal.to_pb()

    def ProposeStream(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.ProposeResponse]:
        return self.serve_stream(request_iterator, DraftRequest.from_pb, self.engine.propose, context)

    async def Speculate(
        self, request: draft_pb2.SpeculateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.SpeculationRound]:
        delegated = DelegatedRequest.from_pb(request)
        self.engine  # noqa: B018 - UNAVAILABLE while the model loads, before any target stream opens
        self.open_streams += 1
        try:
            # The rounds run in a task of their own (read_ahead), so the loop goes on with the next round
            # while gRPC writes this one, instead of waiting for each write to complete.
            rounds = read_ahead(self.delegated.run(delegated, context.time_remaining))
            async with contextlib.aclosing(rounds):  # closed here: stops the rounds
                async for speculation_round in rounds:
                    self.delegated_rounds += 1
                    yield speculation_round.to_pb()
        finally:
            self.open_streams -= 1

    def stats(self, session_id: str = "") -> common_pb2.WorkerStats:
        stats = super().stats(session_id)
        stats.delegated_rounds = self.delegated_rounds
        return stats
