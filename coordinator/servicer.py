"""Coordinator RPCs: decode protobuf, run the speculation loop, encode each chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from coordinator.request import GenerationRequest, RequestLimits
from coordinator.speculation import SpeculativeGenerator
from specpipe.errors import UnavailableError
from specpipe.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._generator: SpeculativeGenerator | None = None

    def attach(self, generator: SpeculativeGenerator) -> None:
        """Called once the workers are paired; until then Generate answers UNAVAILABLE."""
        self._generator = generator

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        if self._generator is None:
            raise UnavailableError("the coordinator is still starting (waiting for its workers)")
        generation = GenerationRequest.from_pb(request, self.limits)
        async for chunk in self._generator.generate(generation, context.time_remaining):
            yield chunk.to_pb()
