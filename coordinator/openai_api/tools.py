"""OpenAI's function calling: `tools` and `tool_choice` in, `tool_calls` out.

The tools go to the chat template (GenerateRequest.tools), which describes them in the prompt. What makes the
output a call is the choice, as vLLM does it:

- a named function (`{"type": "function", "function": {"name": ...}}`): the output is constrained to a JSON
  object of that function's parameters' schema (structured output), and is the call's arguments;
- "required": the output is constrained to a non-empty JSON array of `{"name": ..., "parameters": ...}`, one
  item per call, each naming one of the tools;
- "auto" (the default with tools): the model decides, and its text is parsed for calls in the format the
  server's `--tool-call-parser` names: `hermes` (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  after any text, as Qwen 2.5+ and Hermes models write) or `llama3_json` (the whole output one or more
  `{"name": ..., "parameters": ...}` objects, as Llama 3.1+ writes). Without a parser it is refused, as vLLM
  refuses it;
- "none": the tools are described, and the output is text.

A choice whose output holds calls ends with finish reason "tool_calls" (a named function's with "stop", or
"length" where max_tokens cut its arguments short, as OpenAI's forced call and vLLM do: the output is the
arguments, whole or not). "required" or "auto" output that does not parse as calls (cut short by max_tokens,
say) is returned as content. In a stream a named function's arguments stream as they come; "required" and
"auto" send their calls once parsed, at the end, and "auto" streams the text before a call as content.
`parallel_tool_calls: false` allows one call ("required": the schema's maxItems; "auto": the first call).
Under "auto" `skip_special_tokens` defaults to false, as vLLM's Hermes parser sets it: some models'
`<tool_call>` is a special token.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator.openai_api.reasoning import partial_end
from specpipe.errors import InvalidArgumentError
from specpipe.v1 import coordinator_pb2

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1+ may open its calls with it


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """A call the output made: its function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str
    id: str = field(default_factory=call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return entry if index is None else {"index": index, **entry}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """How a chat request's output becomes calls: mode none, auto, required or named (`name`)."""

    mode: str = "none"
    name: str = ""  # the named function
    parser: str = ""  # auto: the --tool-call-parser
    parallel: bool = True  # auto: more than one call kept (OpenAI's parallel_tool_calls)

    @property
    def active(self) -> bool:
        return self.mode != "none"


NO_TOOLS = ToolChoice()


def tool_definitions(tools: Any) -> list[coordinator_pb2.ToolDefinition]:
    """OpenAI's tools: a list of `{"type": "function", "function": {name, description?, parameters?}}`."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidArgumentError("tools must be a list of {type: function, function: {...}} objects")
    definitions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidArgumentError(f"tools[{index}] must be {{type: function, function: {{name, ...}}}}")
        name, description = function.get("name"), function.get("description", "")
        if not isinstance(name, str) or not name or not isinstance(description, str | None):
            raise InvalidArgumentError(f"tools[{index}].function needs a string name (and description)")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidArgumentError(f"tools[{index}].function.parameters must be a JSON Schema object")
        definitions.append(
            coordinator_pb2.ToolDefinition(
                name=name,
                description=description or "",
                parameters_json=json.dumps(parameters) if parameters is not None else "",
            )
        )
    return definitions


def tool_choice_of(
    value: Any, tools: list[coordinator_pb2.ToolDefinition], parser: str, parallel: bool = True
) -> tuple[ToolChoice, str | None]:
    """OpenAI's tool_choice, and the JSON Schema (text) the output is held to, if any; with `parallel` false
    (OpenAI's parallel_tool_calls), at most one call."""
    if value is None:
        value = "auto" if tools else "none"
    if value == "none":
        return NO_TOOLS, None
    if not tools:
        raise InvalidArgumentError("tool_choice needs tools")
    if value == "auto":
        if not parser:
            raise InvalidArgumentError(
                '"auto" tool choice needs the server\'s --tool-call-parser (or ask for "required", a named '
                'function, or "none")'
            )
        return ToolChoice("auto", parser=parser, parallel=parallel), None
    if value == "required":
        return ToolChoice("required"), json.dumps(required_schema(tools, parallel))
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(function, dict) and value.get("type") == "function":
        name = function.get("name")
        chosen = next((tool for tool in tools if tool.name == name), None)
        if chosen is None:
            raise InvalidArgumentError(f"tool_choice names {json.dumps(name)}, which is not among the tools")
        return ToolChoice("named", name=chosen.name), parameters_schema(chosen)
    raise InvalidArgumentError(
        'tool_choice must be "none", "auto", "required" or {type: function, function: {name}}'
    )


def parameters(tool: coordinator_pb2.ToolDefinition) -> dict[str, Any]:
    """The schema of a call's arguments: an object's, also where the tool's schema names no type (`{}` for a
    function without arguments)."""
    schema: dict[str, Any] = json.loads(tool.parameters_json) if tool.parameters_json else {}
    return schema if "type" in schema else {"type": "object", **schema}


def parameters_schema(tool: coordinator_pb2.ToolDefinition) -> str:
    return json.dumps(parameters(tool))


def required_schema(tools: list[coordinator_pb2.ToolDefinition], parallel: bool = True) -> dict[str, Any]:
    """One or more calls (one where `parallel` is false), each of one of the tools with its parameters
    (vLLM's schema for "required"). Each tool's `$defs` move to the root, where its `#/$defs/...`
    references point (as vLLM moves them); two tools defining one name differently are refused."""
    definitions: dict[str, Any] = {}
    calls = []
    for tool in tools:
        schema = dict(parameters(tool))
        shared = schema.pop("$defs", {})
        if not isinstance(shared, dict):
            raise InvalidArgumentError(f"tools: {tool.name}'s parameters.$defs must be an object")
        for name, definition in shared.items():
            if definitions.setdefault(name, definition) != definition:
                raise InvalidArgumentError(
                    f'tools define "$defs/{name}" differently: tool_choice "required" needs them to agree'
                )
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    required: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
    }
    if not parallel:
        required["maxItems"] = 1
    if definitions:
        required["$defs"] = definitions
    return required


def parse_required(text: str) -> list[ParsedCall]:
    """The calls of a "required" output (a JSON array of {name, parameters}); none where it does not parse."""
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the decoder's depth
        return []
    if not isinstance(items, list):
        return []
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        calls.append(ParsedCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


def parse_hermes(text: str) -> tuple[str, list[ParsedCall]]:
    """Hermes' format: text, then `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the last
    may be unclosed where the output ended). The text before the first block is the content; output whose
    blocks do not all parse is content alone, as vLLM's parser returns it."""
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in HERMES_CALL.findall(text[start:]):
        try:
            call = json.loads(body.strip())
            arguments = call.get("arguments", {}) if isinstance(call, dict) else None
            if isinstance(arguments, str):  # some models write the arguments' text
                arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return text, []
        if not isinstance(arguments, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append(ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
    content = text[:start]
    return (content if content.strip() else ""), calls


def parse_llama3_json(text: str) -> tuple[str, list[ParsedCall]]:
    """Llama 3.x's JSON calls: the output is `{"name": ..., "parameters": {...}}` objects (separated by `;`,
    after an optional `<|python_tag|>`), and nothing else; any other output is content alone, as vLLM's
    llama3_json parser reads it."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, position = json.JSONDecoder(), [], 0
    try:
        while position < len(body):
            call, position = decoder.raw_decode(body, position)
            arguments = call.get("parameters", call.get("arguments", {})) if isinstance(call, dict) else None
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(arguments, dict) or not isinstance(call.get("name"), str):
                return text, []
            calls.append(ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
            rest = body[position:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return text, []
            position = len(body) - len(rest)
    except (ValueError, RecursionError):
        return text, []
    return "", calls


def parse_auto(parser: str, text: str) -> tuple[str, list[ParsedCall]]:
    """A "auto" output's content and calls, in the format `parser` names."""
    return parse_hermes(text) if parser == "hermes" else parse_llama3_json(text)


def streamable_content(parser: str, text: str) -> int:
    """How much of an "auto" output a stream may send as content now: before a Hermes call's tag (holding
    back an end that could begin it), or, for Llama's calls (which are the whole output), nothing while the
    output may still be one."""
    if parser == "hermes":
        tag = text.find(HERMES_OPEN)
        return tag if tag >= 0 else len(text) - partial_end(text, HERMES_OPEN)
    start = text.lstrip()
    if not start or start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start):
        return 0
    return len(text)


@dataclass(slots=True)
class ToolOutput:
    """One choice's output under a tool choice: what a stream may send now, and the calls at the end."""

    choice: ToolChoice
    text: str = ""  # everything so far
    sent: int = 0  # characters of `text` sent as content ("auto") or as arguments (named)
    named_call: ParsedCall | None = None

    def __post_init__(self) -> None:
        if self.choice.mode == "named":
            self.named_call = ParsedCall(self.choice.name, "")

    def stream_delta(self, text: str, first: bool) -> dict[str, Any]:
        """The delta of a stream event for `text`, the next piece of output."""
        self.text += text
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if self.choice.mode == "named":
            assert self.named_call is not None
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if first:  # the call's id, type and name go with its first piece, as OpenAI streams them
                call = self.named_call.to_openai(0)
                call["function"]["arguments"] = text
            delta["tool_calls"] = [call]
        elif self.choice.mode == "auto":
            end = streamable_content(self.choice.parser, self.text)
            if end > self.sent:
                delta["content"] = self.text[self.sent : end]
                self.sent = end
        return delta

    def final(self) -> tuple[str | None, list[ParsedCall]]:
        """The whole output's content (None where calls are all it holds) and calls."""
        if self.choice.mode == "named":
            assert self.named_call is not None
            return None, [ParsedCall(self.choice.name, self.text, self.named_call.id)]
        if self.choice.mode == "required":
            calls = parse_required(self.text)
            return (None, calls) if calls else (self.text, [])
        content, calls = parse_auto(self.choice.parser, self.text)
        if calls and not self.choice.parallel:
            calls = calls[:1]
        return (content or None) if calls else content, calls

    def final_delta(self) -> dict[str, Any]:
        """The last stream event's delta: the calls (a named function's were streamed), or the content held
        back where the output holds none."""
        if self.choice.mode == "named":
            return {}
        content, calls = self.final()
        delta: dict[str, Any] = {}
        if calls:
            held_back = (content or "")[self.sent :]  # the content before the calls not sent yet
            if held_back:
                delta["content"] = held_back
            delta["tool_calls"] = [call.to_openai(index) for index, call in enumerate(calls)]
        elif self.sent < len(self.text):
            delta["content"] = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        """ "tool_calls" where the output's calls were parsed out ("required", "auto"), also where max_tokens
        cut it after them, as vLLM reports it; a named function's call ends as OpenAI's forced call does."""
        if reason and self.choice.mode != "named" and self.final()[1]:
            return "tool_calls"
        return reason
