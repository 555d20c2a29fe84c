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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.api_key import REFUSAL, bearer_matches
from coordinator.chat import Conversation
from coordinator.completions import interleaved
from coordinator.openai_api.requests import (
    ApiCall,
    Fields,
    chat_call,
    chat_messages,
    completion_call,
    template_kwargs,
)
from coordinator.openai_api.responses import ResponseBuilder
from coordinator.openai_api.tools import tool_definitions
from coordinator.request import GenerationChunk
from coordinator.servicer import CoordinatorServicer
from coordinator.tokenization import Tokenized
from specpipe import __version__
from specpipe.client import build_request
from specpipe.errors import InvalidArgumentError, NotFoundError, SpecpipeError
from specpipe.rpc.interceptor import status_for
from specpipe.sampling.token_bytes import TokenSpeller

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
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})  # never behind the API key
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


class OpenAIApi:
    """The routes, over the coordinator's servicer."""

    def __init__(
        self,
        servicer: CoordinatorServicer,
        served_model_name: str = "",
        api_key: str = "",
        tool_call_parser: str = "",
        reasoning_parser: str = "",
    ) -> None:
        self.servicer = servicer
        self.served_model_name = served_model_name  # "" = the target model's name as ServerInfo reports it
        self.api_key = api_key  # "" = none asked (vLLM's --api-key): `Authorization: Bearer <key>`
        self.tool_call_parser = tool_call_parser  # tool_choice "auto": how the output's calls are written
        self.reasoning_parser = reasoning_parser  # chat: how thinking is split from the answer ("" = not)
        self._speller: TokenSpeller | None = None

    def model_name(self) -> str:
        return self.served_model_name or self.servicer.info.target_model

    def speller(self) -> TokenSpeller:
        if self._speller is None:
            self._speller = TokenSpeller(self.servicer.generator.tokenizer)
        return self._speller

    def app(self) -> web.Application:
        middlewares = [self.counted, json_errors, self.authorized]
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/version", self.version)
        return app

    @web.middleware
    async def counted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """specpipe_http_requests_total{route, status}: the route's pattern (not the path, whose ids would
        grow the label set), "unmatched" for none."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500  # an exception that escapes every handler is aiohttp's 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.servicer.metrics.http_requests.labels(route=route, status=str(status)).inc()

    @web.middleware
    async def authorized(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With an API key, every route but the probes' and the scrapers' (/health, /metrics, /version) asks
        for it as a bearer token; 401 otherwise, as vLLM's --api-key."""
        if not self.api_key or request.path in OPEN_PATHS:
            return await handler(request)
        if not bearer_matches(request.headers.get("Authorization", ""), self.api_key):
            return web.json_response(error_body(401, REFUSAL, "UNAUTHENTICATED"), status=401)
        return await handler(request)

    async def metrics(self, request: web.Request) -> web.Response:
        """The coordinator's Prometheus metrics, also on the API's port (where vLLM serves them)."""
        body = generate_latest(self.servicer.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def health(self, request: web.Request) -> web.Response:
        self.servicer.info  # noqa: B018 - raises UnavailableError (503) until the workers are paired
        return web.json_response({"status": "ok"})

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name(),
            "object": "model",
            "created": int(time.time()),
            "owned_by": "specpipe",
            "max_model_len": self.servicer.info.models.target_context,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self.check_model(request.match_info["model"])
        return web.json_response(self.model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a prompt's tokens as Generate encodes it, or a conversation's as the chat
        template renders it."""
        fields = Fields(await self.body(request))
        self.check_model(fields.string("model", "") or "")
        generator = self.servicer.generator
        context = generator.limits.target_context
        if fields.body.get("messages") is not None:
            # The conversation as Generate would take it: the same request, the same conversion.
            pb = build_request(
                "",
                1,
                messages=chat_messages(fields.body["messages"]),
                tools=tool_definitions(fields.body.get("tools")),
                chat_template_kwargs=template_kwargs(fields),
                continue_final_message=fields.boolean("continue_final_message"),
                add_generation_prompt=fields.value("add_generation_prompt", (bool,), "true or false"),
            )
            conversation = Conversation.from_pb(pb)
            assert conversation is not None  # (it has messages)
            ids = generator.chat.token_ids(conversation, context)
        else:
            prompt = fields.string("prompt")
            if prompt is None:
                raise InvalidArgumentError("set prompt (a string) or messages")
            add_special_tokens = fields.boolean("add_special_tokens", True)
            ids = Tokenized.of(generator.tokenizer, prompt, add_special_tokens, context).token_ids
        return web.json_response({"count": len(ids), "max_model_len": context, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: token ids' text."""
        fields = Fields(await self.body(request))
        self.check_model(fields.string("model", "") or "")
        ids = fields.integers("tokens")
        limits = self.servicer.generator.limits
        if not ids or len(ids) > limits.target_context:  # the tokenizer runs on the event loop
            raise InvalidArgumentError(f"tokens must hold 1..{limits.target_context} token ids")
        vocab_size = limits.vocab_size
        if not all(0 <= token_id < vocab_size for token_id in ids):
            raise InvalidArgumentError(f"tokens must be in [0, {vocab_size})")
        text = self.decode(ids)
        return web.json_response({"prompt": text})

    def check_model(self, name: str) -> str:
        model = self.model_name()
        if name and name != model:
            raise NotFoundError(f"the model {name!r} does not exist: this server serves {model!r}")
        return model

    async def completions(self, request: web.Request) -> web.StreamResponse:
        limit = self.servicer.limits.max_new_tokens

        def parse(body: Any) -> ApiCall:  # the generator is asked for here: 503 until the workers are paired
            return completion_call(body, limit, self.decode, self.servicer.generator.encode_prompt)

        return await self.serve(request, parse)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        limit = self.servicer.limits.max_new_tokens
        parsers = (self.tool_call_parser, self.reasoning_parser)
        return await self.serve(request, lambda body: chat_call(body, limit, *parsers))

    def decode(self, token_ids: Sequence[int]) -> str:
        """A token-id prompt's text, for echo (ids the tokenizer cannot spell are the request's error)."""
        try:
            return str(self.servicer.generator.tokenizer.decode(list(token_ids)))
        except (OverflowError, ValueError, TypeError, IndexError) as exc:
            raise InvalidArgumentError(f"prompt: token ids the tokenizer cannot decode: {exc}") from None

    async def serve(self, request: web.Request, parse: Callable[[Any], ApiCall]) -> web.StreamResponse:
        """A (chat) completion's request; its failures before a stream begins are `json_errors`'."""
        call = parse(await self.body(request))
        builder = ResponseBuilder(call, self.check_model(call.model), self.speller().text_of)
        # All the prompts' completions are admitted at once, or none: a body that could never run whole is
        # refused before any of it starts.
        async with self.servicer.admission(call.slots, no_deadline, call.priority):
            # Closed on every way out, a disconnected client's cancellation included: that stops them.
            async with contextlib.aclosing(self.chunks(call)) as chunks:
                return await self.respond(request, call, builder, chunks)

    async def respond(
        self,
        request: web.Request,
        call: ApiCall,
        builder: ResponseBuilder,
        chunks: AsyncIterator[tuple[int, GenerationChunk]],
    ) -> web.StreamResponse:
        if not call.stream:
            async for prompt, chunk in chunks:
                builder.add(prompt, chunk)
            return web.json_response(builder.response(), dumps=unescaped_json)
        first = await anext(chunks)  # an error before the first token is the response's status
        response = web.StreamResponse(headers=EVENT_STREAM_HEADERS)
        await response.prepare(request)
        try:
            await response.write(sse(builder.event(builder.add(*first))))
            async for prompt, chunk in chunks:
                await response.write(sse(builder.event(builder.add(prompt, chunk))))
            if call.include_usage:
                await response.write(sse(builder.usage_event()))
        except ConnectionError:
            return response  # the client left; closing the chunks stops the generations
        except Exception as exc:  # noqa: BLE001 - the status was sent: the error is the stream's last event
            await response.write(sse(error_of(exc)[1]))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response

    async def body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (ValueError, RecursionError, LookupError) as exc:  # (nested past the decoder's depth)
            raise InvalidArgumentError(f"the body is not JSON: {exc}") from None

    def chunks(self, call: ApiCall) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every prompt's Generate, run concurrently (admitted together): (prompt index, chunk) as they
        come."""
        return interleaved(
            [
                # Ephemeral: no HTTP client can name the session again, so it is deleted after the request.
                lambda pb=pb: self.servicer.generate(  # type: ignore[misc]
                    pb, no_deadline, admitted=True, ephemeral=True
                )
                for pb in call.requests
            ]
        )


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal with OpenAI's error body: aiohttp's own (an unknown route, a body over the size limit...)
    and a handler's exception (a domain error with its gRPC code's status, anything else a logged 500), so a
    failure is always an HTTP error, never a dropped connection. (A stream's errors after its status was sent
    are its last event: `OpenAIApi.respond`.)"""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            error_body(exc.status, exc.text or exc.reason, exc.reason), status=exc.status
        )
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)


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
        try:
            await web.TCPSite(self.runner, self.host, self.port).start()
        except BaseException:  # the port is taken: nothing is left set up
            await self.close()
            raise
        self.port = int(self.runner.addresses[0][1])
        logger.info("OpenAI-compatible HTTP API on http://%s:%d/v1", self.host, self.port)

    async def drain(self, grace_s: float) -> None:
        """serve()'s drain: stops listening; requests in flight get shutdown_grace_s to finish."""
        await self.close()

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
