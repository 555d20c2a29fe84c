"""OpenAI request bodies (completions and chat completions) as GenerateRequests.

The fields are OpenAI's, with their defaults (temperature 1, max_tokens 16 for completions), plus vLLM's
sampling extensions under vLLM's names (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, include_stop_str_in_output, skip_special_tokens, allowed_token_ids, bad_words,
guided_json/guided_regex/guided_choice) and specpipe's num_speculative_tokens; chat's tools and tool_choice
(coordinator/openai_api/tools.py). A field that specpipe cannot honour (suffix, best_of above n) is refused,
never ignored; unknown fields are
ignored, as vLLM and OpenAI do. Ranges are checked by the Generate request itself, with the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.openai_api.tools import NO_TOOLS, ToolChoice, tool_choice_of, tool_definitions
from coordinator.request import completion_slots, completions_asked
from specpipe.client import build_request
from specpipe.errors import InvalidArgumentError
from specpipe.sampling.params import MAX_TOP_LOGPROBS
from specpipe.v1 import coordinator_pb2

MAX_PROMPTS = 64  # prompts in one completions body (each is a Generate of its own)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One HTTP request: Generate requests (one per prompt, or per prompt and completion), each with n
    completions; choice i is request i // n's completion i % n."""

    chat: bool
    model: str  # as the body names it ("" = not named)
    requests: tuple[coordinator_pb2.GenerateRequest, ...]
    n: int  # completions per request
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last event with the usage
    echoes: tuple[str, ...]  # per request, the text its choices start with (echo), else ""
    logprobs: bool  # the choices carry log-probs
    # Per request, with echo and logprobs: the prompt's first token, whose log-prob is null (nothing comes
    # before it), ahead of the prompt's scored tokens; else None.
    first_prompt_tokens: tuple[int | None, ...]
    counts_prompt: tuple[bool, ...]  # per request: its prompt tokens count in the usage (once per prompt)
    tool_choice: ToolChoice = NO_TOOLS  # chat: how the output becomes tool calls
    reasoning_parser: str = ""  # chat: how thinking is split from the answer ("" = not)

    @property
    def priority(self) -> int:
        """Where the body waits for the concurrency limit (vLLM's priority: lower first)."""
        return self.requests[0].priority

    def choice_index(self, request: int, completion: int) -> int:
        return request * self.n + completion

    @property
    def slots(self) -> int:
        """Of the coordinator's concurrency limit: every request's completions."""
        return sum(completion_slots(request) for request in self.requests)


class Fields:
    """Typed reads of a JSON body: a wrong type is INVALID_ARGUMENT naming the field."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request body must be a JSON object")
        self.body: dict[str, Any] = body

    def value(self, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        # JSON true is not a number here, though bool is an int in Python.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise InvalidArgumentError(f"{name} must be {what}, got {json.dumps(value)[:80]}")
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self.body.get(name)
        if isinstance(value, float) and value.is_integer():  # 2.0, as pydantic (vLLM's) takes it
            return int(value)
        return self.value(name, (int,), "an integer", default)

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.value(name, (int, float), "a number", default)
        return None if value is None else float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        if self.body.get(name) in (0, 1) and not isinstance(self.body.get(name), bool):
            return bool(self.body[name])  # 0 and 1, as pydantic (vLLM's) takes them
        return bool(self.value(name, (bool,), "true or false", default))

    def top_logprobs(self, name: str) -> int | None:
        """A count of likeliest tokens to report, 0..MAX_TOP_LOGPROBS, under the API's own name."""
        top = self.integer(name)
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidArgumentError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        return top

    def string(self, name: str, default: str | None = None) -> str | None:
        return self.value(name, (str,), "a string", default)

    def integers(self, name: str) -> list[int]:
        values = self.value(name, (list,), "a list of integers", [])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InvalidArgumentError(f"{name} must be a list of integers")
        return values

    def strings(self, name: str) -> list[str]:
        """A string or a list of them (as OpenAI's stop)."""
        values = self.value(name, (str, list), "a string or a list of strings", [])
        values = [values] if isinstance(values, str) else values
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgumentError(f"{name} must be a string or a list of strings")
        return values


def completion_call(
    body: Any,
    max_tokens_limit: int,
    decode: Callable[[Sequence[int]], str],
    encode: Callable[[str], list[int]],
) -> ApiCall:
    """/v1/completions: `decode` spells a token-id prompt for echo, `encode` gives a text prompt's tokens (as
    Generate encodes it) for echo with logprobs; max_tokens at most the limit."""
    fields = Fields(body)
    prompts = completion_prompts(fields.body.get("prompt"))
    if fields.body.get("suffix"):
        raise InvalidArgumentError("suffix is not supported")
    top = fields.top_logprobs("logprobs")
    echo = fields.boolean("echo")
    default = min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_limit)
    max_tokens = requested_max_tokens(fields, ("max_tokens",), default, max_tokens_limit)
    requests: list[coordinator_pb2.GenerateRequest] = []
    echoes: list[str] = []
    first_tokens: list[int | None] = []
    counts_prompt: list[bool] = []
    for prompt in prompts:
        request = generate_request(fields, prompt, max_tokens, top_logprobs=top)
        echoed = (prompt if isinstance(prompt, str) else decode(prompt)) if echo else ""
        if not echo or top is None:
            requests.append(request)
            echoes.append(echoed)
            first_tokens.append(None)
            counts_prompt.append(True)
            continue
        # Echo with logprobs (how lm-evaluation-harness scores a text): every choice starts with the prompt's
        # log-probs, which Generate gives to a request's first completion only, so each completion is a
        # request of its own, completion i with seed + i as Generate's n draws it.
        n = completions_asked(request)
        prompt_ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
        for completion in range(n):
            single = coordinator_pb2.GenerateRequest()
            single.CopyFrom(request)
            single.n = 1
            single.prompt_logprobs = top
            if single.sampling.HasField("seed"):
                single.sampling.seed = (single.sampling.seed + completion) % 2**64
            requests.append(single)
            echoes.append(echoed)
            first_tokens.append(prompt_ids[0] if prompt_ids else None)
            counts_prompt.append(completion == 0)
    return api_call(
        fields,
        chat=False,
        requests=tuple(requests),
        echoes=tuple(echoes),
        logprobs=top is not None,
        first_prompt_tokens=tuple(first_tokens),
        counts_prompt=tuple(counts_prompt),
    )


def chat_call(
    body: Any, max_tokens_limit: int, tool_call_parser: str = "", reasoning_parser: str = ""
) -> ApiCall:
    """/v1/chat/completions: without max_tokens, the output may run to the limit (or the context), as vLLM's
    does. With a reasoning parser, an unconstrained output's thinking is split from its answer."""
    fields = Fields(body)
    tools = tool_definitions(fields.body.get("tools"))
    parallel = fields.value("parallel_tool_calls", (bool,), "true or false", True)
    choice, tool_schema = tool_choice_of(fields.body.get("tool_choice"), tools, tool_call_parser, parallel)
    if choice.active and fields.boolean("continue_final_message"):
        raise InvalidArgumentError(
            "continue_final_message continues a message as text: set tool_choice to none to use it with tools"
        )
    if fields.boolean("echo"):
        raise InvalidArgumentError("echo is not supported for chat completions")
    messages = chat_messages(fields.body.get("messages"))
    top = fields.top_logprobs("top_logprobs")
    if not fields.boolean("logprobs"):
        if top is not None:
            raise InvalidArgumentError("top_logprobs needs logprobs: true")
    else:
        top = top or 0
    names = ("max_completion_tokens", "max_tokens")  # OpenAI's current name, and the older one
    max_tokens = requested_max_tokens(fields, names, max_tokens_limit, max_tokens_limit)
    request = generate_request(
        fields,
        "",
        max_tokens,
        top_logprobs=top,
        messages=messages,
        continue_final_message=fields.boolean("continue_final_message"),
        add_generation_prompt=fields.value("add_generation_prompt", (bool,), "true or false"),
        tools=tools,
        tool_schema=tool_schema,
        chat_template_kwargs=template_kwargs(fields),
        # A Hermes call's tags are special tokens in some models: the parser must see them (vLLM's hermes
        # parser turns skip_special_tokens off likewise, unless the request set it).
        skip_special_tokens_default=False if choice.mode == "auto" else None,
    )
    return api_call(
        fields,
        chat=True,
        requests=(request,),
        echoes=("",),
        logprobs=top is not None,
        first_prompt_tokens=(None,),
        counts_prompt=(True,),
        tool_choice=choice,
        # A constrained output is the constrained value, not thinking and an answer.
        reasoning_parser="" if request.HasField("structured_output") else reasoning_parser,
    )


def template_kwargs(fields: Fields) -> dict[str, object]:
    """vLLM's chat_template_kwargs: more variables for the chat template (an object)."""
    return fields.value("chat_template_kwargs", (dict,), "an object of template variables", {}) or {}


def requested_max_tokens(fields: Fields, names: tuple[str, ...], default: int, limit: int) -> int:
    """The first of `names` set, in [1, limit] (the server's --max-new-tokens-limit), else `default`."""
    for name in names:
        value = fields.integer(name)
        if value is not None:
            if not 1 <= value <= limit:
                raise InvalidArgumentError(
                    f"{name} must be in [1, {limit}] (the server's limit), got {value}"
                )
            return value
    return default


def api_call(
    fields: Fields,
    *,
    chat: bool,
    requests: tuple[coordinator_pb2.GenerateRequest, ...],
    echoes: tuple[str, ...],
    logprobs: bool,
    first_prompt_tokens: tuple[int | None, ...],
    counts_prompt: tuple[bool, ...],
    tool_choice: ToolChoice = NO_TOOLS,
    reasoning_parser: str = "",
) -> ApiCall:
    stream_options = fields.value("stream_options", (dict,), "an object", {})
    stream = fields.boolean("stream")
    if stream_options and not stream:
        raise InvalidArgumentError("stream_options is only for stream: true")
    include_usage = stream and bool(Fields(stream_options).boolean("include_usage"))
    return ApiCall(
        chat=chat,
        model=fields.string("model", "") or "",
        requests=requests,
        n=requests[0].n or 1,
        stream=stream,
        include_usage=include_usage,
        echoes=echoes,
        logprobs=logprobs,
        first_prompt_tokens=first_prompt_tokens,
        counts_prompt=counts_prompt,
        tool_choice=tool_choice,
        reasoning_parser=reasoning_parser,
    )


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt: a text, a list of texts, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        ):
            if len(prompt) > MAX_PROMPTS:
                raise InvalidArgumentError(
                    f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}"
                )
            return list(prompt)
    raise InvalidArgumentError(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
    )


def chat_messages(messages: Any) -> list[coordinator_pb2.ChatMessage]:
    """OpenAI's messages; a content given as parts must be text parts (no images here). An assistant's
    tool_calls and a tool message's tool_call_id and name go to the chat template."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects")
    converted: list[coordinator_pb2.ChatMessage] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidArgumentError(f"messages[{index}] must be an object with a string role")
        fields = Fields(message)
        converted.append(
            coordinator_pb2.ChatMessage(
                role=message["role"],
                content=message_text(message.get("content"), index),
                tool_calls=message_tool_calls(message.get("tool_calls"), index),
                tool_call_id=fields.string("tool_call_id", "") or "",
                name=fields.string("name", "") or "",
            )
        )
    return converted


def message_tool_calls(calls: Any, index: int) -> list[coordinator_pb2.ToolCall]:
    """An assistant message's tool_calls: `{id, type: function, function: {name, arguments}}` each, the
    arguments a JSON object's text (as OpenAI returns them) or the object."""
    if not calls:
        return []
    if not isinstance(calls, list):
        raise InvalidArgumentError(f"messages[{index}].tool_calls must be a list")
    converted = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgumentError(
                f"messages[{index}].tool_calls[{number}] must be {{id, type: function, function: {{name, "
                "arguments}}}}"
            )
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        call_id = call.get("id", "")
        converted.append(
            coordinator_pb2.ToolCall(
                id=call_id if isinstance(call_id, str) else "", name=function["name"], arguments=arguments
            )
        )
    return converted


def message_text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidArgumentError(
                    f"messages[{index}].content: only text parts ({{type: text, text}}) are supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidArgumentError(f"messages[{index}].content must be a string or a list of text parts")


def generate_request(
    fields: Fields,
    prompt: str | Sequence[int],
    max_tokens: int,
    *,
    top_logprobs: int | None,
    messages: Sequence[coordinator_pb2.ChatMessage] = (),
    continue_final_message: bool = False,
    add_generation_prompt: bool | None = None,
    tools: Sequence[coordinator_pb2.ToolDefinition] = (),
    tool_schema: str | None = None,
    skip_special_tokens_default: bool | None = None,
    chat_template_kwargs: Mapping[str, object] | None = None,
) -> coordinator_pb2.GenerateRequest:
    n = fields.integer("n", 1)
    best_of = fields.integer("best_of")
    if best_of is not None and best_of != n:
        raise InvalidArgumentError("best_of is not supported (other than equal to n)")
    top_k = fields.integer("top_k", 0)
    logit_bias = fields.value("logit_bias", (dict,), "an object of token id to bias", {})
    try:
        bias = {int(token_id): float(value) for token_id, value in logit_bias.items()}
    except (TypeError, ValueError):
        raise InvalidArgumentError("logit_bias must map token ids (as strings) to numbers") from None
    for name in ("n", "min_tokens"):
        if (fields.integer(name) or 0) < 0:
            raise InvalidArgumentError(f"{name} must be >= 0, got {fields.integer(name)}")
    seed = fields.integer("seed")
    priority = fields.integer("priority", 0) or 0
    if not -(2**31) <= priority < 2**31:
        raise InvalidArgumentError(f"priority must be a 32-bit integer, got {priority}")
    constraint = structured_output(fields)
    if tool_schema is not None:  # tool_choice "required" or a named function: the output is the call
        if constraint:
            raise InvalidArgumentError(
                "tool_choice (required or a named function) constrains the output: leave response_format "
                "and guided_* unset"
            )
        constraint = {"json_schema": tool_schema}
    try:
        return build_request(
            prompt,
            max_tokens,
            temperature=fields.number("temperature", 1.0),  # type: ignore[arg-type]
            top_k=0 if top_k is None or top_k < 0 else top_k,  # vLLM's -1 is off
            top_p=fields.number("top_p", 1.0),  # type: ignore[arg-type]
            min_p=fields.number("min_p", 0.0),  # type: ignore[arg-type]
            seed=None if seed is None else seed % 2**64,  # OpenAI's seed may be negative
            stop=fields.strings("stop"),
            num_speculative_tokens=fields.integer("num_speculative_tokens"),
            logprobs=top_logprobs,
            repetition_penalty=fields.number("repetition_penalty", 1.0),  # type: ignore[arg-type]
            presence_penalty=fields.number("presence_penalty", 0.0),  # type: ignore[arg-type]
            frequency_penalty=fields.number("frequency_penalty", 0.0),  # type: ignore[arg-type]
            logit_bias=bias,
            min_tokens=fields.integer("min_tokens", 0),  # type: ignore[arg-type]
            ignore_eos=fields.boolean("ignore_eos"),
            stop_token_ids=fields.integers("stop_token_ids"),
            allowed_token_ids=fields.integers("allowed_token_ids"),
            bad_words=fields.strings("bad_words"),
            include_stop_str_in_output=fields.boolean("include_stop_str_in_output"),
            skip_special_tokens=fields.value(
                "skip_special_tokens", (bool,), "true or false", skip_special_tokens_default
            ),
            n=n,
            messages=messages,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            priority=priority,
            **constraint,
        )
    except ValueError as exc:  # a number beyond its protobuf field (a uint32 above 2^32...)
        raise InvalidArgumentError(f"a field is out of range: {exc}") from None


def structured_output(fields: Fields) -> dict[str, Any]:
    """OpenAI's response_format, or vLLM's guided_json / guided_regex / guided_choice, as build_request's
    arguments (at most one of them)."""
    chosen: dict[str, Any] = {}
    response_format = fields.value("response_format", (dict,), "an object", None)
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            chosen["json_object"] = True
        elif kind == "json_schema":
            json_schema = response_format.get("json_schema")
            schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
            if not isinstance(schema, dict | bool):
                raise InvalidArgumentError("response_format.json_schema.schema must be a JSON Schema object")
            chosen["json_schema"] = json.dumps(schema)
        elif kind != "text":
            raise InvalidArgumentError(
                f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)}"
            )
    guided_json = fields.value("guided_json", (dict, str), "a JSON Schema (an object or its text)")
    if guided_json is not None:
        chosen["json_schema"] = guided_json if isinstance(guided_json, str) else json.dumps(guided_json)
    if (regex := fields.string("guided_regex")) is not None:
        chosen["regex"] = regex
    if fields.body.get("guided_choice") is not None:
        chosen["choice"] = fields.strings("guided_choice")
    if len(chosen) > 1:
        raise InvalidArgumentError(
            "set at most one of response_format (json), guided_json, guided_regex and guided_choice"
        )
    return chosen
