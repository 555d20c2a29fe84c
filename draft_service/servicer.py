"""DraftService RPCs: decode protobuf, call the drafter on the model thread, encode the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from draft_service.drafter import Drafter, DraftRequest
from specpipe.rpc.worker_servicer import WorkerServicerBase
from specpipe.v1 import draft_pb2, draft_pb2_grpc


class DraftServicer(WorkerServicerBase[Drafter], draft_pb2_grpc.DraftServiceServicer):
    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        proposal = await self.on_model_thread(self.engine.propose, DraftRequest.from_pb(request))
        return proposal.to_pb()

    def ProposeStream(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.ProposeResponse]:
        return self.serve_stream(request_iterator, DraftRequest.from_pb, self.engine.propose, context)
