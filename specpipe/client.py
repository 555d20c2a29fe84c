"""A small client for the public Coordinator API (used by `specpipe generate` and the tests)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from specpipe.rpc.server import server_options
from specpipe.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


def build_request(
    prompt: str | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = 0,  # None: unset, the coordinator draws one
    stop: Sequence[str] = (),
    session_id: str = "",
    num_speculative_tokens: int | None = None,
    acceptance: str = "leviathan",
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    stop_token_ids: Sequence[int] = (),
    allowed_token_ids: Sequence[int] = (),
    bad_words: Sequence[str] = (),
    bad_word_token_ids: Sequence[Sequence[int]] = (),
    include_stop_str_in_output: bool = False,
    skip_special_tokens: bool | None = None,
    n: int | None = None,
    json_schema: str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    messages: Sequence[Mapping[str, str] | coordinator_pb2.ChatMessage] = (),
    continue_final_message: bool = False,
    add_generation_prompt: bool | None = None,
    tools: Sequence[coordinator_pb2.ToolDefinition] = (),
    chat_template_kwargs: Mapping[str, object] | None = None,
    priority: int = 0,
) -> coordinator_pb2.GenerateRequest:
    """A GenerateRequest; with `messages` ({"role": ..., "content": ...} each, or ChatMessages), pass "" as
    the prompt."""
    rule = (
        common_pb2.ACCEPTANCE_RULE_COUPLED
        if acceptance == "coupled"
        else common_pb2.ACCEPTANCE_RULE_LEVIATHAN
    )
    request = coordinator_pb2.GenerateRequest(
        max_new_tokens=max_new_tokens,
        sampling=common_pb2.SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, acceptance=rule, logprobs=logprobs
        ),
        stop=list(stop),
        session_id=session_id,
        ignore_eos=ignore_eos,
        stop_token_ids=list(stop_token_ids),
        prompt_logprobs=prompt_logprobs,
        bad_words=list(bad_words),
        include_stop_str_in_output=include_stop_str_in_output,
        skip_special_tokens=skip_special_tokens,
        n=n,
        messages=[
            m if isinstance(m, coordinator_pb2.ChatMessage) else coordinator_pb2.ChatMessage(**m)
            for m in messages
        ],
        tools=tools,
        chat_template_kwargs_json=json.dumps(dict(chat_template_kwargs)) if chat_template_kwargs else "",
        priority=priority,
        continue_final_message=continue_final_message,
        add_generation_prompt=add_generation_prompt,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    if num_speculative_tokens is not None:
        request.num_speculative_tokens = num_speculative_tokens
    if repetition_penalty != 1.0:
        request.sampling.repetition_penalty = repetition_penalty
    if min_p:
        request.sampling.min_p = min_p
    if presence_penalty:
        request.sampling.presence_penalty = presence_penalty
    if frequency_penalty:
        request.sampling.frequency_penalty = frequency_penalty
    if logit_bias:
        request.sampling.logit_bias.update(logit_bias)
    request.sampling.min_tokens = min_tokens
    request.sampling.allowed_token_ids.extend(allowed_token_ids)
    for word in bad_word_token_ids:
        request.sampling.bad_words.add(token_ids=word)
    if json_schema is not None:
        request.structured_output.json_schema = json_schema
    elif json_object:
        request.structured_output.json_object = True
    elif regex is not None:
        request.structured_output.regex = regex
    elif choice is not None:
        request.structured_output.choice.choices.extend(choice)
    return request


@dataclass
class GenerationResult:
    """A whole Generate stream, gathered."""

    session_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    chunks: int = 0
    finish_reason: str = ""
    usage: coordinator_pb2.Usage | None = None
    # One per token where the request's sampling.logprobs asked (common.proto: TokenLogprob).
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    # Where the request's prompt_logprobs asked: one per prompt token that has one (the first chunk's).
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    stop_reason: str | int | None = None  # what stopped a "stop" finish: a stop string or token id

    def add(self, chunk: coordinator_pb2.GenerateResponse) -> None:
        self.session_id = chunk.session_id
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.text += chunk.text
        self.chunks += 1
        if chunk.finish_reason:
            self.finish_reason = coordinator_pb2.FinishReason.Name(chunk.finish_reason)
            self.finish_reason = self.finish_reason.removeprefix("FINISH_REASON_").lower()
            self.usage = chunk.usage
            stop = chunk.WhichOneof("stop_reason")
            self.stop_reason = getattr(chunk, stop) if stop else None


@dataclass
class Completions:
    """The streams of a request's n completions (GenerateRequest.n), gathered apart by chunk index."""

    results: dict[int, GenerationResult] = field(default_factory=dict)

    def add(self, chunk: coordinator_pb2.GenerateResponse) -> GenerationResult:
        """Adds the chunk to its completion's result, which it returns."""
        result = self.results.setdefault(chunk.index, GenerationResult())
        result.add(chunk)
        return result

    def by_index(self) -> list[GenerationResult]:
        return [self.results[index] for index in sorted(self.results)]


def key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries a coordinator's API key (`authorization: Bearer <key>`); None: env
    SPECPIPE_API_KEY's, where set."""
    key = os.environ.get("SPECPIPE_API_KEY", "") if api_key is None else api_key
    return (("authorization", f"Bearer {key.strip()}"),) if key.strip() else None


class CoordinatorClient:
    """Blocking client."""

    def __init__(self, address: str, api_key: str | None = None) -> None:
        # gRPC's default 4 MB receive limit is below a long prompt's prompt_logprobs (~160 B per token at 20).
        self.channel = grpc.insecure_channel(address, options=server_options())
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.metadata = key_metadata(api_key)

    def stream(
        self, request: coordinator_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> Iterator[coordinator_pb2.GenerateResponse]:
        yield from self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def generate(
        self, request: coordinator_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> GenerationResult:
        result = GenerationResult()
        for chunk in self.stream(request, timeout_s):
            result.add(chunk)
        return result

    def generate_completions(
        self, request: coordinator_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> list[GenerationResult]:
        """A request's n completions (GenerateRequest.n), gathered, by index."""
        results = Completions()
        for chunk in self.stream(request, timeout_s):
            results.add(chunk)
        return results.by_index()

    def get_session(self, session_id: str, timeout_s: float = 10.0) -> coordinator_pb2.SessionInfo:
        request = coordinator_pb2.GetSessionRequest(session_id=session_id)
        return self.stub.GetSession(request, timeout=timeout_s, metadata=self.metadata)

    def server_info(self, timeout_s: float = 10.0) -> coordinator_pb2.ServerInfo:
        request = coordinator_pb2.GetServerInfoRequest()
        return self.stub.GetServerInfo(request, timeout=timeout_s, metadata=self.metadata)

    def tokenize(
        self, text: str, add_special_tokens: bool = True, timeout_s: float = 10.0
    ) -> coordinator_pb2.TokenizeResponse:
        request = coordinator_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return self.stub.Tokenize(request, timeout=timeout_s, metadata=self.metadata)

    def delete_session(self, session_id: str, timeout_s: float = 10.0) -> bool:
        request = coordinator_pb2.DeleteSessionRequest(session_id=session_id)
        return self.stub.DeleteSession(request, timeout=timeout_s, metadata=self.metadata).deleted

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCoordinatorClient:
    """asyncio client, for many concurrent streams from one process."""

    def __init__(self, address: str, api_key: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=server_options())
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.metadata = key_metadata(api_key)

    async def stream(
        self, request: coordinator_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        async for chunk in self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata):
            yield chunk

    async def generate(
        self, request: coordinator_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> GenerationResult:
        result = GenerationResult()
        async for chunk in self.stream(request, timeout_s):
            result.add(chunk)
        return result

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
