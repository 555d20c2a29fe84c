"""TargetService RPCs: decode protobuf, call the verifier on the model thread, encode the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specpipe.rpc.worker_servicer import WorkerServicerBase
from specpipe.v1 import target_pb2, target_pb2_grpc
from target_service.verifier import Verifier, VerifyBlock


class TargetServicer(WorkerServicerBase[Verifier], target_pb2_grpc.TargetServiceServicer):
    async def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        verdict = await self.on_model_thread(self.engine.verify, VerifyBlock.from_pb(request))
        return verdict.to_pb()

    def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        return self.serve_stream(request_iterator, VerifyBlock.from_pb, self.engine.verify, context)
