"""The coordinator's API key (vLLM's --api-key): one bearer token that both public APIs ask for.

The HTTP API reads it from the `Authorization` header (coordinator/openai_api/server.py), the gRPC API from
the `authorization` metadata (ApiKeyInterceptor): `Bearer <key>` in both. grpc.health.v1 stays open, as do
the HTTP API's /health, /metrics and /version: probes and scrapers carry no key.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

GUARDED_SERVICE_PREFIX = "/specpipe.v1.Coordinator/"
REFUSAL = "a valid API key is required (Authorization: Bearer <key>)"


def bearer_matches(authorization: str, api_key: str) -> bool:
    """Whether an `Authorization` value is `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    # surrogateescape: aiohttp keeps a header's undecodable bytes as surrogates, which must not raise here.
    matches = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), api_key.encode())
    return scheme.lower() == "bearer" and matches


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses the Coordinator service's calls without the key with UNAUTHENTICATED."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(GUARDED_SERVICE_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(str(metadata.get("authorization", "")), self.api_key):
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            yield  # pragma: no cover - an async generator, as a streaming behaviour must be

        if handler.unary_stream is not None:
            return handler._replace(unary_stream=refuse_stream)
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=refuse_stream)
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=refuse)
        return handler._replace(unary_unary=refuse)
