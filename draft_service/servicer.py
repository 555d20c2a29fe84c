"""DraftService RPCs: decode protobuf, call the drafter on the model thread, encode the reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from draft_service.drafter import DraftRequest, ModelDrafter
from specpipe.errors import UnavailableError
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.stream_history import StreamHistory
from specpipe.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, model_thread: ThreadPoolExecutor) -> None:
        self.model_thread = model_thread  # one thread: the model and its caches are not thread-safe
        self._loaded: tuple[ModelDrafter, WorkerModelInfo] | None = None

    def attach(self, drafter: ModelDrafter, info: WorkerModelInfo) -> None:
        """Called once the model is loaded; until then every RPC answers UNAVAILABLE."""
        self._loaded = (drafter, info)

    @property
    def drafter(self) -> ModelDrafter:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[0]

    @property
    def info(self) -> WorkerModelInfo:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[1]

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self.info.to_pb(include_tokenizer_files=request.include_tokenizer_files)

    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        draft_request = DraftRequest.from_pb(request)
        loop = asyncio.get_running_loop()
        proposal = await loop.run_in_executor(self.model_thread, self.drafter.propose, draft_request)
        return proposal.to_pb()

    async def ProposeStream(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[draft_pb2.ProposeResponse]:
        history = StreamHistory()
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            draft_request = DraftRequest.from_pb(request, history)
            proposal = await loop.run_in_executor(self.model_thread, self.drafter.propose, draft_request)
            yield proposal.to_pb()

    async def ReleaseSession(
        self, request: common_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ReleaseSessionResponse:
        loop = asyncio.get_running_loop()
        released = await loop.run_in_executor(
            self.model_thread, self.drafter.runner.caches.release, request.session_id
        )
        return common_pb2.ReleaseSessionResponse(released=released)
