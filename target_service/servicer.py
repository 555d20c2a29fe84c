"""TargetService RPCs: decode protobuf, call the verifier on the model thread, encode the reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from specpipe.errors import UnavailableError
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.stream_history import StreamHistory
from specpipe.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_service.verifier import Verifier, VerifyBlock


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, model_thread: ThreadPoolExecutor) -> None:
        self.model_thread = model_thread  # one thread: the model and its caches are not thread-safe
        self._loaded: tuple[Verifier, WorkerModelInfo] | None = None

    def attach(self, verifier: Verifier, info: WorkerModelInfo) -> None:
        """Called once the model is loaded; until then every RPC answers UNAVAILABLE."""
        self._loaded = (verifier, info)

    @property
    def verifier(self) -> Verifier:
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

    async def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        block = VerifyBlock.from_pb(request)
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self.model_thread, self.verifier.verify, block)
        return verdict.to_pb()

    async def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        history = StreamHistory()
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            block = VerifyBlock.from_pb(request, history)
            verdict = await loop.run_in_executor(self.model_thread, self.verifier.verify, block)
            yield verdict.to_pb()

    async def ReleaseSession(
        self, request: common_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ReleaseSessionResponse:
        loop = asyncio.get_running_loop()
        released = await loop.run_in_executor(
            self.model_thread, self.verifier.runner.caches.release, request.session_id
        )
        return common_pb2.ReleaseSessionResponse(released=released)
