"""Function calling through the chat API: tools in the prompt, tool_choice's constraint, calls parsed out.

Layered as the other API tests: the parsers and the stream's shaping on hand-made outputs, the request's
checks, the chat template's rendering of tools and calls, then OpenAI's own client against the shared
pipeline (whose coordinator runs --tool-call-parser hermes).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import openai
import pytest
from transformers import AutoTokenizer

from coordinator.chat import ChatTemplate, Conversation, messages_from_pb, tools_from_pb
from coordinator.openai_api.requests import chat_call, chat_messages
from coordinator.openai_api.tools import (
    ToolChoice,
    ToolOutput,
    parse_hermes,
    parse_llama3_json,
    parse_required,
    required_schema,
    tool_choice_of,
    tool_definitions,
)
from coordinator.structured_requests import output_regex
from specpipe import errors
from specpipe.client import CoordinatorClient, build_request
from specpipe.v1 import coordinator_pb2
from tests.conftest import CHAT_TEMPLATE, Pipeline
from tests.test_openai_api import post

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- parsing an output ---


def test_hermes_calls_are_parsed_after_the_content() -> None:
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}'  # unclosed: the output ended
    )
    content, calls = parse_hermes(text)
    assert content == "Let me look.\n"  # as a stream shows it, before the tag
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    _, (call,) = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert (call.name, json.loads(call.arguments)) == ("f", {"a": 1})  # the arguments' text, as some write


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{cut sho"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
    ],
)
def test_output_that_is_not_hermes_calls_is_content(text: str) -> None:
    assert parse_hermes(text) == (text, [])


def test_llama3_json_calls_are_the_whole_output() -> None:
    _, (call,) = parse_llama3_json('{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert (call.name, json.loads(call.arguments)) == ("get_time", {"zone": "UTC"})
    content, calls = parse_llama3_json(
        '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": "{\\"a\\": 1}"}'
    )
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {}), ("g", {"a": 1})]
    not_calls = ('Sure: {"name": "f"}', '{"name": "f", "parameters": {}} more', '{"nam', "[1]", "{" * 5000)
    for text in not_calls:
        assert parse_llama3_json(text) == (text, []), text


def test_llama3_json_streams_text_unless_it_may_be_a_call() -> None:
    content, calls, finish = stream(
        ToolOutput(ToolChoice("auto", parser="llama3_json")), [" ", '{"name": "f", ', '"parameters": {}}']
    )
    assert (content, [c["function"]["name"] for c in calls], finish) == ("", ["f"], "tool_calls")
    output = ToolOutput(ToolChoice("auto", parser="llama3_json"))
    assert output.stream_delta("<|pyth", first=True) == {"role": "assistant"}  # may open a call: held
    assert stream(ToolOutput(ToolChoice("auto", parser="llama3_json")), ["It is ", "sunny."]) == (
        "It is sunny.",
        [],
        "stop",
    )


def test_required_output_is_a_list_of_calls_or_nothing() -> None:
    calls = parse_required('[{"name": "get_time", "parameters": {"zone": "UTC"}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert parse_required('[{"name": "get_time", "parameters": {"zo') == []  # cut short by max_tokens
    assert parse_required('{"name": "get_time"}') == []


def stream(output: ToolOutput, pieces: list[str], finish: str = "stop") -> tuple[str, list[Any], str | None]:
    """The content and calls a stream of these pieces shows, and its finish reason."""
    content, calls = "", []
    for index, piece in enumerate(pieces):
        delta = output.stream_delta(piece, first=index == 0)
        if index == len(pieces) - 1:
            delta.update(
                {k: delta.get(k, "") + v if k == "content" else v for k, v in output.final_delta().items()}
            )
        content += delta.get("content") or ""
        calls += delta.get("tool_calls", [])
    return content, calls, output.finish_reason(finish)


def test_auto_streams_the_text_before_a_call_and_sends_the_call_at_the_end() -> None:
    output = ToolOutput(ToolChoice("auto", parser="hermes"))
    pieces = ["Sure <", "to", 'ol_call>{"name": "get_time", ', '"arguments": {"zone": "UTC"}}</tool_call>']
    first = output.stream_delta(pieces[0], first=True)
    assert first == {"role": "assistant", "content": "Sure "}  # "<" could open the tag: held back
    content, calls, finish = stream(ToolOutput(ToolChoice("auto", parser="hermes")), pieces)
    assert content == "Sure "
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "get_time", {"zone": "UTC"})
    ]
    assert finish == "tool_calls"


def test_auto_text_without_a_call_streams_whole_even_where_it_looked_like_a_tag() -> None:
    content, calls, finish = stream(ToolOutput(ToolChoice("auto", parser="hermes")), ["a <", "b", " <tool"])
    assert (content, calls, finish) == ("a <b <tool", [], "stop")


def test_a_named_function_streams_its_arguments_as_they_come() -> None:
    output = ToolOutput(ToolChoice("named", name="get_time"))
    first = output.stream_delta('{"zone"', first=True)
    call = first["tool_calls"][0]
    assert (call["index"], call["type"], call["function"]) == (
        0,
        "function",
        {"name": "get_time", "arguments": '{"zone"'},
    )
    assert output.stream_delta(': "UTC"}', first=False) == {
        "tool_calls": [{"index": 0, "function": {"arguments": ': "UTC"}'}}]
    }
    content, calls = output.final()
    assert content is None and calls[0].id == call["id"] and calls[0].arguments == '{"zone": "UTC"}'
    assert output.finish_reason("stop") == "stop"  # as OpenAI's forced call ends


def test_calls_cut_short_after_they_parse_still_end_as_tool_calls() -> None:
    output = ToolOutput(ToolChoice("auto", parser="hermes"))
    output.stream_delta('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool', first=True)
    assert output.finish_reason("length") == "tool_calls"
    named = ToolOutput(ToolChoice("named", name="f"))
    named.stream_delta('{"a": ', first=True)
    assert named.finish_reason("length") == "length"  # its arguments cut short, as OpenAI's are


def test_one_call_only_without_parallel_tool_calls() -> None:
    output = ToolOutput(ToolChoice("auto", parser="hermes", parallel=False))
    output.stream_delta('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g"}', True)
    assert [call.name for call in output.final()[1]] == ["f"]
    assert required_schema(tool_definitions([WEATHER, TIME]), parallel=False)["maxItems"] == 1


def test_output_nested_past_the_decoders_depth_is_no_call() -> None:
    deep = "[" * 100_000
    assert parse_required(deep) == []
    assert parse_hermes(f"<tool_call>{deep}</tool_call>") == (f"<tool_call>{deep}</tool_call>", [])


# --- the request ---


def test_tool_choice_sets_the_output_schema() -> None:
    tools = tool_definitions([WEATHER, TIME])
    assert tool_choice_of(None, [], "") == (ToolChoice(), None)
    assert tool_choice_of("none", tools, "")[1] is None
    named, schema = tool_choice_of({"type": "function", "function": {"name": "get_time"}}, tools, "")
    assert (
        named == ToolChoice("named", name="get_time") and json.loads(schema) == TIME["function"]["parameters"]
    )
    required, schema = tool_choice_of("required", tools, "")
    assert required.mode == "required" and json.loads(schema) == required_schema(tools)
    for constraint in (schema, json.dumps(WEATHER["function"]["parameters"])):  # outlines-core compiles both
        assert output_regex(coordinator_pb2.StructuredOutput(json_schema=constraint))
    assert tool_choice_of(None, tools, "hermes") == (ToolChoice("auto", parser="hermes"), None)


def test_auto_shows_special_tokens_unless_the_request_says_otherwise() -> None:
    body = {"messages": ASK, "tools": [WEATHER]}
    assert not chat_call(body, 64, "hermes").requests[0].skip_special_tokens
    assert chat_call({**body, "skip_special_tokens": True}, 64, "hermes").requests[0].skip_special_tokens
    assert not chat_call({**body, "tool_choice": "required"}, 64).requests[0].HasField("skip_special_tokens")


def test_schemas_of_tools_without_a_type_or_with_shared_definitions() -> None:
    bare = {"type": "function", "function": {"name": "now", "parameters": {}}}  # no arguments
    now = {"type": "function", "function": {"name": "now"}}
    _, schema = tool_choice_of(now, tool_definitions([bare]), "")
    assert json.loads(schema) == {"type": "object"}  # not any JSON value
    city = {"type": "string", "maxLength": 8}
    place = {"type": "object", "properties": {"city": city}, "required": ["city"]}
    nested = {
        "type": "function",
        "function": {
            "name": "trip",
            "parameters": {
                "type": "object",
                "properties": {"start": {"$ref": "#/$defs/Place"}, "end": {"$ref": "#/$defs/Place"}},
                "required": ["start", "end"],
                "$defs": {"Place": place},
            },
        },
    }
    schema = required_schema(tool_definitions([nested, TIME]))
    assert schema["$defs"] == {"Place": place}  # at the root, where "#/$defs/Place" points
    assert output_regex(coordinator_pb2.StructuredOutput(json_schema=json.dumps(schema)))
    other = json.loads(json.dumps(nested))
    other["function"]["name"] = "trip2"
    other["function"]["parameters"]["$defs"]["Place"] = {"type": "string"}
    with pytest.raises(errors.InvalidArgumentError, match="differently"):
        required_schema(tool_definitions([nested, other]))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [WEATHER]}, "--tool-call-parser"),  # "auto" by default, and no parser
        ({"tools": [WEATHER], "tool_choice": "auto"}, "--tool-call-parser"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not among"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "leave response_format",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "tool_calls[0]"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "continue_final_message": True},
            "continue_final_message",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_requests_are_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=message.replace("[", r"\[").replace("(", r"\(")):
        chat_call({"messages": ASK, **body}, 256)


def test_a_past_call_with_arguments_nested_too_deep_is_refused_not_a_crash(pipeline: Pipeline) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}
    conversation = [*ASK, {"role": "assistant", "tool_calls": [call]}]
    status, body = post(pipeline, "/v1/chat/completions", {"messages": conversation, "max_tokens": 4})
    assert status == 400 and "must be a JSON object" in body["error"]["message"], body
    status, body = post(pipeline, "/v1/chat/completions", None, raw=b"[" * 100_000)
    assert status == 400 and "not JSON" in body["error"]["message"], body


# --- the chat template ---


def test_the_template_renders_tools_calls_and_tool_results(pipeline: Pipeline) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]
    template = ChatTemplate(tokenizer, CHAT_TEMPLATE.read_text())
    rendered = Conversation(
        messages_from_pb(chat_messages(conversation)), tools=tools_from_pb(tool_definitions([WEATHER]))
    )
    text = template.render(rendered, 4096)
    assert text.startswith('<|tools|>[{"type": "function", "function": {"name": "get_weather"')
    assert (
        '<|assistant|><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        in text
    )
    assert text.endswith("<|tool|>(call_1) sunny\n<|assistant|>")


# --- through the pipeline ---


@pytest.fixture
def client(pipeline: Pipeline) -> Any:
    with openai.OpenAI(base_url=f"{pipeline.http_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_a_named_function_is_called_with_arguments_its_schema_accepts(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    asked = dict(model="", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=48, temperature=0)
    response = client.chat.completions.create(**asked)
    message = response.choices[0].message
    (call,) = message.tool_calls
    assert (message.content, call.type, call.function.name) == (None, "function", "get_weather")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
    assert response.choices[0].finish_reason == "stop"

    # Streamed: the same call (greedy), its arguments in pieces after the first event's id and name.
    pieces, ids, names = [], set(), set()
    for event in client.chat.completions.create(**asked, stream=True):
        for delta_call in event.choices[0].delta.tool_calls or []:
            ids.add(delta_call.id) if delta_call.id else None
            names.add(delta_call.function.name) if delta_call.function.name else None
            pieces.append(delta_call.function.arguments or "")
    assert "".join(pieces) == call.function.arguments
    assert len(ids) == 1 and names == {"get_weather"} and len(pieces) > 1


def test_required_makes_calls_of_the_given_tools(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        assert (call.function.name, sorted(arguments)) in [("get_weather", ["city"]), ("get_time", ["zone"])]

    # Streamed: the calls come whole in the last event, with its finish reason.
    events = list(
        client.chat.completions.create(
            model="", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96,
            temperature=0, stream=True,
        )
    )  # fmt: skip
    streamed = [call for event in events for call in event.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert events[-1].choices[0].finish_reason == "tool_calls" and events[-1].choices[0].delta.tool_calls


def test_auto_returns_text_where_the_model_makes_no_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0
    )
    plain = client.chat.completions.create(model="", messages=ASK, max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens < response.usage.prompt_tokens  # the tools are in the prompt


def test_a_conversation_with_calls_and_results_is_rendered(pipeline: Pipeline) -> None:
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    status, body = post(pipeline, "/tokenize", {"messages": conversation, "tools": [WEATHER]})
    assert status == 200, body
    status, text = post(pipeline, "/detokenize", {"tokens": body["tokens"]})
    assert '"city": "Paris"' in text["prompt"] and "<|tool|>(c1) sunny" in text["prompt"]
    status, body = post(
        pipeline, "/v1/chat/completions", {"messages": conversation, "tools": [WEATHER], "max_tokens": 4}
    )
    assert status == 200 and body["choices"][0]["message"]["content"], body


def test_grpc_chat_requests_take_tools_for_the_template(pipeline: Pipeline) -> None:
    tools = tool_definitions([WEATHER])
    with CoordinatorClient(pipeline.coordinator_addr) as coordinator:
        result = coordinator.generate(build_request("", 4, messages=ASK, tools=tools))
        session = coordinator.get_session(result.session_id)
        assert session.text.startswith('<|tools|>[{"type": "function"') and "get_weather" in session.text
        with pytest.raises(grpc.RpcError) as refused:
            coordinator.generate(build_request("hello", 4, tools=tools))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tools are for messages" in (refused.value.details() or "")
