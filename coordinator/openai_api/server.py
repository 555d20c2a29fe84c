"""The HTTP server of the OpenAI-compatible API (aiohttp, on the coordinator's event loop).

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true for server-sent events),
GET /v1/models, GET /health (200 once the coordinator is paired with its workers, 503 before). A domain
error is the HTTP status of its gRPC code (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504...) with OpenAI's error body; one after a stream began is its last
event. A client that disconnects cancels its request, as a cancelled gRPC call does (what was committed stays
in the session).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from coordinator.completions import interleaved
from coordinator.openai_api.requests import ApiCall, chat_call, completion_call
from coordinator.openai_api.responses import ResponseBuilder
from coordinator.request import GenerationChunk
from coordinator.servicer import CoordinatorServicer
from specpipe.errors import InvalidArgumentError, NotFoundError, SpecpipeError
from specpipe.rpc.interceptor import status_for

logger = logging.getLogger(__name__)

HTTP_STATUS_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
EVENT_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
MAX_BODY_BYTES = 64 * 1024 * 1024  # as the gRPC API's message limit


def no_deadline() -> float | None:
    return None  # OpenAI's API has none; a client that gives up disconnects, which cancels the request


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_of(exc: Exception) -> tuple[int, dict[str, Any]]:
    """An exception as an HTTP status and OpenAI's error body."""
    if isinstance(exc, SpecpipeError):
        code = status_for(exc)
        status = HTTP_STATUS_BY_CODE.get(code, 500)
        return status, error_body(status, str(exc), code.name)
    logger.exception("HTTP API request failed unexpectedly")
    return 500, error_body(500, f"internal error: {type(exc).__name__}: {exc}", grpc.StatusCode.INTERNAL.name)


def error_response(exc: Exception) -> web.Response:
    status, body = error_of(exc)
    return web.json_response(body, status=status)


def unescaped_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)  # the text as UTF-8, not \\u escapes


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else unescaped_json(payload)
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class OpenAIApi:
    servicer: CoordinatorServicer
    served_model_name: str = ""  # "" = the target model's name as ServerInfo reports it

    def model_name(self) -> str:
        return self.served_model_name or self.servicer.info.target_model

    def token_text(self) -> Callable[[int], str]:
        tokenizer = self.servicer.generator.tokenizer
        return lambda token_id: tokenizer.decode([token_id])

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        try:
            self.servicer.info  # noqa: B018 - raises UnavailableError until the workers are paired
        except SpecpipeError as exc:
            return error_response(exc)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        try:
            info = self.servicer.info
        except SpecpipeError as exc:
            return error_response(exc)
        model = {
            "id": self.model_name(),
            "object": "model",
            "created": int(time.time()),
            "owned_by": "specpipe",
            "max_model_len": info.models.target_context,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        limit = self.servicer.limits.max_new_tokens
        return await self.serve(request, lambda body: completion_call(body, limit, self.decode))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        limit = self.servicer.limits.max_new_tokens
        return await self.serve(request, lambda body: chat_call(body, limit))

    def decode(self, token_ids: Any) -> str:
        return str(self.servicer.generator.tokenizer.decode(list(token_ids)))

    async def serve(self, request: web.Request, parse: Callable[[Any], ApiCall]) -> web.StreamResponse:
        try:
            call = parse(await self.body(request))
            model = self.model_name()
            if call.model and call.model != model:
                raise NotFoundError(f"the model {call.model!r} does not exist: this server serves {model!r}")
            builder = ResponseBuilder(call, model, self.token_text())
        except Exception as exc:  # noqa: BLE001 - every failure is an HTTP error, never a dropped connection
            return error_response(exc)
        # Closed on every way out, a disconnected client's cancellation included: that stops the generations.
        async with contextlib.aclosing(self.chunks(call)) as chunks:
            try:
                if not call.stream:
                    async for prompt, chunk in chunks:
                        builder.add(prompt, chunk)
                    return web.json_response(builder.response(), dumps=unescaped_json)
                first = await anext(chunks)  # an error before the first token is the response's status
            except Exception as exc:  # noqa: BLE001
                return error_response(exc)
            return await self.stream(request, call, builder, first, chunks)

    async def body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"the body is not JSON: {exc}") from None

    async def stream(
        self,
        request: web.Request,
        call: ApiCall,
        builder: ResponseBuilder,
        first: tuple[int, GenerationChunk],
        chunks: AsyncIterator[tuple[int, GenerationChunk]],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=EVENT_STREAM_HEADERS)
        await response.prepare(request)
        try:
            await response.write(sse(builder.event(builder.add(*first))))
            async for prompt, chunk in chunks:
                await response.write(sse(builder.event(builder.add(prompt, chunk))))
            if call.include_usage:
                await response.write(sse(builder.usage_event()))
        except ConnectionError:
            raise  # the client left: nothing to tell it
        except Exception as exc:  # noqa: BLE001 - the status was sent: the error is the stream's last event
            await response.write(sse(error_of(exc)[1]))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response

    def chunks(self, call: ApiCall) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every prompt's Generate, run concurrently: (prompt index, chunk) as they come."""
        return interleaved(
            [
                lambda pb=pb: self.servicer.generate(pb, no_deadline)  # type: ignore[misc]
                for pb in call.requests
            ]
        )


@dataclass(slots=True)
class HttpServer:
    """The API's listener, from start() to close()."""

    api: OpenAIApi
    host: str
    port: int  # 0: a free one; the bound port after start()
    shutdown_grace_s: float = 10.0  # requests in flight get this long when it stops
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, and so its generation.
        self.runner = web.AppRunner(
            self.api.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.shutdown_grace_s,
        )
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        self.port = int(self.runner.addresses[0][1])
        logger.info("OpenAI-compatible HTTP API on http://%s:%d/v1", self.host, self.port)

    async def drain(self, grace_s: float) -> None:
        """serve()'s drain: stops listening; requests in flight get shutdown_grace_s to finish."""
        await self.close()

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
