"""What the draft and target servicers share: the model thread, info, cache release, stats, streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import grpc

from specpipe.errors import UnavailableError
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.runtime.stream_history import StreamHistory
from specpipe.v1 import common_pb2

EngineT = TypeVar("EngineT")


class WorkerServicerBase(Generic[EngineT]):
    """Holds the loaded engine (a drafter or a verifier, each with a `runner`) once warm-up attaches it."""

    def __init__(self, model_thread: ThreadPoolExecutor) -> None:
        self.model_thread = model_thread  # one thread: the model and its caches are not thread-safe
        self._loaded: tuple[EngineT, WorkerModelInfo] | None = None
        self.open_streams = 0

    def attach(self, engine: EngineT, info: WorkerModelInfo) -> None:
        """Called once the model is loaded; until then every RPC answers UNAVAILABLE."""
        self._loaded = (engine, info)

    @property
    def engine(self) -> EngineT:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[0]

    @property
    def info(self) -> WorkerModelInfo:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[1]

    @property
    def runner(self) -> CausalLMRunner:
        return self.engine.runner  # type: ignore[attr-defined]

    async def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def serve_stream(
        self,
        requests: AsyncIterator[Any],
        decode: Callable[[Any, StreamHistory], Any],
        handle: Callable[[Any], Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        """Answers a session stream in order. A stream that is cancelled (client gone, request aborted)
        frees its session's KV cache at once; one closed normally keeps it warm for the next turn."""
        history = StreamHistory()
        session_id = ""
        completed = False
        self.open_streams += 1
        try:
            async for request in requests:
                session_id = request.session_id
                result = await self.on_model_thread(handle, decode(request, history))
                yield result.to_pb()
            # A cancelled call can also look like the end of the requests.
            completed = not context.cancelled()
        finally:
            # Cancelled, closed at a yield (GeneratorExit) or failed: the session will not continue here.
            self.open_streams -= 1
            if not completed and session_id:
                self.model_thread.submit(self.runner.caches.release, session_id)

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self.info.to_pb(include_tokenizer_files=request.include_tokenizer_files)

    async def ReleaseSession(
        self, request: common_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ReleaseSessionResponse:
        released = await self.on_model_thread(self.runner.caches.release, request.session_id)
        return common_pb2.ReleaseSessionResponse(released=released)

    async def GetStats(
        self, request: common_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerStats:
        caches = self.runner.caches
        return common_pb2.WorkerStats(
            cached_sessions=len(caches),
            cache_bytes=caches.total_bytes,
            evictions=caches.evictions,
            session_cached=bool(request.session_id) and request.session_id in caches,
            open_streams=self.open_streams,
        )
