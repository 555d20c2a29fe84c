"""A reasoning model's thinking split from its answer (--reasoning-parser): the splitter on hand-made outputs,
streamed in every way against whole, then a coordinator started with the flag, through OpenAI's client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from coordinator.openai_api.reasoning import ReasoningSplit, split_reasoning
from coordinator.openai_api.requests import chat_call
from specpipe.launcher import free_port
from tests.conftest import CHAT_TEMPLATE, Pipeline, start_coordinator
from tests.test_openai_api import post

ASK = [{"role": "user", "content": "def parse(text):"}]


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        ("deepseek_r1", "weigh it</think>\n\nThe answer.", ("weigh it", "\n\nThe answer.")),
        ("deepseek_r1", "<think>weigh it</think>answer", ("weigh it", "answer")),
        (
            "deepseek_r1",
            "still thinking when max_tokens ran out",
            ("still thinking when max_tokens ran out", ""),
        ),
        ("deepseek_r1", "a < b </thinking> no", ("a < b </thinking> no", "")),
        ("qwen3", "<think>\nweigh it\n</think>\n\nanswer", ("\nweigh it\n", "\n\nanswer")),
        ("qwen3", "\n<think>x</think>y", ("x", "y")),
        ("qwen3", "an answer without thinking", ("", "an answer without thinking")),
        ("qwen3", "<thin", ("", "<thin")),
        ("qwen3", "<think>cut short", ("cut short", "")),
    ],
)
def test_whole_outputs_split(parser: str, text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(parser, text) == expected


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize(
    "text", ["<think>ab</think>cd</think>", "a</think>b", " <think>x</thi", "<t", "plain </think"]
)
def test_a_stream_split_anywhere_shows_what_the_whole_output_does(parser: str, text: str) -> None:
    whole = split_reasoning(parser, text)
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            splitter = ReasoningSplit(parser)
            pieces = [
                splitter.push(text[:first]),
                splitter.push(text[first:second]),
                splitter.push(text[second:]),
            ]
            pieces.append(splitter.finish())
            assert ("".join(r for r, _ in pieces), "".join(c for _, c in pieces)) == whole, (first, second)


def test_constrained_outputs_are_not_split() -> None:
    assert chat_call({"messages": ASK}, 64, "", "qwen3").reasoning_parser == "qwen3"
    for constraint in (
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "[a-z]+"},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
    ):
        assert chat_call({"messages": ASK, **constraint}, 64, "", "qwen3").reasoning_parser == ""


@pytest.fixture(scope="module")
def reasoning_api(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A coordinator on the shared workers whose chat responses split deepseek_r1's thinking."""
    port = free_port()
    extra = ["--http-port", str(port), "--reasoning-parser", "deepseek_r1"]
    extra += ["--chat-template", str(CHAT_TEMPLATE)]
    workers = (pipeline.draft.address, pipeline.target.address, pipeline.redis.url)
    coordinator = start_coordinator(*workers, tmp_path_factory.mktemp("reasoning"), extra=extra)
    try:
        coordinator.wait_serving(120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        coordinator.stop()


def test_the_thinking_comes_back_as_reasoning_content(pipeline: Pipeline, reasoning_api: str) -> None:
    asked = dict(model="", messages=ASK, max_tokens=12, temperature=0)
    plain = openai.OpenAI(base_url=f"{pipeline.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    client = openai.OpenAI(base_url=reasoning_api, api_key="unused", max_retries=0, timeout=60)
    with plain, client:
        text = plain.chat.completions.create(**asked).choices[0].message.content
        assert text and "</think>" not in text  # the demo model never ends a thinking
        message = client.chat.completions.create(**asked).choices[0].message
        assert (message.content, message.model_extra["reasoning_content"]) == (None, text)
        streamed = [e.choices[0].delta for e in client.chat.completions.create(**asked, stream=True)]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in streamed) == text
        assert not any(d.content for d in streamed)
        # (A constrained output is not split: test_constrained_outputs_are_not_split.)


def test_a_chat_choice_has_openai_keys_only(pipeline: Pipeline, reasoning_api: str) -> None:
    """A message, no completion's "text": without a reasoning parser and with one (reasoning_content)."""
    body = {"messages": ASK, "max_tokens": 4, "n": 2}
    status, plain = post(pipeline, "/v1/chat/completions", body)
    assert status == 200, plain
    for choice in plain["choices"]:
        assert set(choice) == {"index", "message", "logprobs", "finish_reason", "stop_reason"}
        assert set(choice["message"]) == {"role", "content"}
    client = openai.OpenAI(base_url=reasoning_api, api_key="unused", max_retries=0, timeout=60)
    with client:
        raw = client.chat.completions.with_raw_response.create(model="", messages=ASK, max_tokens=4, n=2)
    for choice in json.loads(raw.text)["choices"]:
        assert set(choice) == {"index", "message", "logprobs", "finish_reason", "stop_reason"}
        assert set(choice["message"]) == {"role", "content", "reasoning_content"}
