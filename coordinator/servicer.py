"""Coordinator RPCs: decode protobuf, run the speculation loop, encode each chunk."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import grpc

from coordinator.admission import ConcurrencyLimit
from coordinator.completions import completion_requests, interleaved_completions
from coordinator.metrics import CoordinatorMetrics
from coordinator.request import (
    GenerationChunk,
    GenerationRequest,
    RequestLimits,
    completion_slots,
    validate_session_id,
)
from coordinator.server_info import ServerInfo
from coordinator.sessions import SessionService
from coordinator.speculation import SpeculativeGenerator
from coordinator.tokenization import Tokenized
from specpipe.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from specpipe.rpc.interceptor import status_for
from specpipe.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        limits: RequestLimits,
        metrics: CoordinatorMetrics | None = None,
        max_concurrent_requests: int = 256,
        max_waiting_requests: int = 0,
    ) -> None:
        self.limits = limits
        self.metrics = metrics or CoordinatorMetrics()
        self.concurrency = ConcurrencyLimit(max_concurrent_requests, max_waiting_requests)
        self.metrics.waiting.set_function(lambda: self.concurrency.waiting)
        self._generator: SpeculativeGenerator | None = None

        self._sessions: SessionService | None = None
        self._info: ServerInfo | None = None

    def attach(self, generator: SpeculativeGenerator, sessions: SessionService, info: ServerInfo) -> None:
        """Called once the workers are paired; until then every RPC answers UNAVAILABLE."""
        self._generator = generator
        self._sessions = sessions
        self._info = info

    @property
    def attached(self) -> bool:
        return self._generator is not None

    @property
    def info(self) -> ServerInfo:
        if self._info is None:
            raise UnavailableError("the coordinator is still starting (waiting for its workers)")
        return self._info

    @property
    def generator(self) -> SpeculativeGenerator:
        if self._generator is None:
            raise UnavailableError("the coordinator is still starting (waiting for its workers)")
        return self._generator

    @property
    def sessions(self) -> SessionService:
        if self._sessions is None:
            raise UnavailableError("the coordinator is still starting (waiting for its workers)")
        return self._sessions

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        # Closed here when the client cancels at a yield, rather than by the generator finalizer.
        async with contextlib.aclosing(self.generate(request, context.time_remaining)) as chunks:
            async for chunk in chunks:
                yield chunk.to_pb()

    async def generate(
        self,
        request: coordinator_pb2.GenerateRequest,
        time_remaining: Callable[[], float | None],
        admitted: bool = False,
        ephemeral: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        """Generate's work, behind the concurrency limit (unless the caller `admitted` it already), observed
        by the metrics; also what the HTTP API calls (coordinator/openai_api): one limit for both."""
        admission = (
            contextlib.nullcontext()
            if admitted
            else self.admission(completion_slots(request), time_remaining, request.priority)
        )
        async with admission:
            with self.metrics.request() as observed:
                generation = GenerationRequest.from_pb(request, self.limits)
                if ephemeral:  # the HTTP API's: deleted after it (GenerationRequest.ephemeral)
                    generation = dataclasses.replace(generation, ephemeral=True)
                async for chunk in self.chunks(generation, time_remaining):
                    observed.chunk(chunk, self.metrics)
                    yield chunk

    @contextlib.asynccontextmanager
    async def admission(
        self, slots: int, time_remaining: Callable[[], float | None], priority: int = 0
    ) -> AsyncIterator[None]:
        """Holds `slots` of the concurrency limit (a request's completions), after a wait in line (by
        `priority`) where one is configured, or refuses them: more than the limit can ever hold is
        INVALID_ARGUMENT, more than it holds now (and its line) RESOURCE_EXHAUSTED
        (coordinator/admission.py)."""
        entered = False
        try:
            async with self.concurrency.hold(slots, time_remaining, priority):
                entered = True
                yield
        except (ResourceExhaustedError, DeadlineExceededError, asyncio.CancelledError) as exc:
            # A request refused, past its deadline or cancelled before it held its slots: counted by outcome
            # only (not a request in flight, nor a latency). Its generation's own errors count there.
            if not entered:
                outcome = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else status_for(exc).name
                self.metrics.requests.labels(outcome=outcome).inc()
            raise

    @property
    def running(self) -> int:
        """Slots of the concurrency limit held now (a request's completions each hold one)."""
        return self.concurrency.running

    def chunks(
        self, generation: GenerationRequest, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[GenerationChunk]:
        generator = self.generator
        if generation.n == 1:
            return generator.generate(generation, time_remaining)
        return interleaved_completions(
            lambda single: generator.generate(single, time_remaining), completion_requests(generation)
        )

    async def GetSession(
        self, request: coordinator_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.SessionInfo:
        view = await self.sessions.get(validate_session_id(request.session_id))
        return view.to_pb()

    async def DeleteSession(
        self, request: coordinator_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.DeleteSessionResponse:
        deleted = await self.sessions.delete(validate_session_id(request.session_id))
        return coordinator_pb2.DeleteSessionResponse(deleted=deleted)

    async def GetServerInfo(
        self, request: coordinator_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ServerInfo:
        return self.info.to_pb(self.running)

    async def Tokenize(
        self, request: coordinator_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.TokenizeResponse:
        add_special_tokens = request.add_special_tokens if request.HasField("add_special_tokens") else True
        generator = self.generator
        tokenized = Tokenized.of(
            generator.tokenizer, request.text, add_special_tokens, generator.limits.target_context
        )
        return tokenized.to_pb()
