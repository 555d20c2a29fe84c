"""GenerateRequest.messages: a conversation rendered by the chat template, through the real pipeline."""

from __future__ import annotations

import grpc
import pytest
from transformers import AutoTokenizer

from specpipe.cli import chat_template
from specpipe.client import CoordinatorClient, build_request
from tests.conftest import CHAT_TEMPLATE, Pipeline

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def parse(text):"},
]


def rendered_ids(pipeline: Pipeline, messages: list[dict[str, str]], **kwargs: bool) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    text = tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE.read_text(), tokenize=False, **kwargs
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_messages_generate_what_their_rendered_prompt_does(
    coordinator_address: str, pipeline: Pipeline
) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        if not client.server_info().chat_template:
            pytest.fail("the shared coordinator was started with --chat-template")
    with CoordinatorClient(coordinator_address) as client:
        info = client.server_info()
        if not info.chat_template:  # the undelegated coordinator has no template: refused, nothing stored
            with pytest.raises(grpc.RpcError) as refused:
                client.generate(build_request("", 8, messages=CONVERSATION))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--chat-template" in (refused.value.details() or "")
            return
        chat = client.generate(build_request("", 24, messages=CONVERSATION, ignore_eos=True))
        plain = client.generate(
            build_request(
                rendered_ids(pipeline, CONVERSATION, add_generation_prompt=True), 24, ignore_eos=True
            )
        )
        assert chat.token_ids == plain.token_ids and chat.text == plain.text
        session = client.get_session(chat.session_id)
    prompt = rendered_ids(pipeline, CONVERSATION, add_generation_prompt=True)
    assert list(session.token_ids)[: len(prompt)] == prompt and session.prompt_tokens == len(prompt)
    assert session.text.startswith("<|system|>You write Python.\n<|user|>def parse(text):\n<|assistant|>")


def test_continue_final_message_extends_the_assistants_prefix(pipeline: Pipeline) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "    return"}]
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        chat = client.generate(
            build_request("", 8, messages=messages, continue_final_message=True, ignore_eos=True)
        )
        session = client.get_session(chat.session_id)
    prompt = rendered_ids(pipeline, messages, continue_final_message=True)
    assert list(session.token_ids)[: len(prompt)] == prompt
    assert session.text.endswith("<|assistant|>    return" + chat.text)


def test_add_generation_prompt_false_leaves_the_turn_closed(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        chat = client.generate(build_request("", 4, messages=CONVERSATION, add_generation_prompt=False))
        session = client.get_session(chat.session_id)
    prompt = rendered_ids(pipeline, CONVERSATION, add_generation_prompt=False)
    assert list(session.token_ids)[: len(prompt)] == prompt and session.prompt_tokens == len(prompt)
    assert prompt != rendered_ids(pipeline, CONVERSATION, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "x"}, "only one of prompt, prompt_token_ids and messages"),
        ({"session_id": "chat-session"}, "leave session_id empty"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role: robot"),
        ({"continue_final_message": True, "add_generation_prompt": True}, "cannot open a turn"),
        (
            {"messages": [], "continue_final_message": True, "prompt": "x"},
            "continue_final_message needs messages",
        ),
        ({"messages": [{"role": "user", "content": "x" * 2_000_000}]}, "messages too long"),
    ],
)
def test_bad_conversations_are_invalid_argument(pipeline: Pipeline, changes: dict, message: str) -> None:
    fields = {"messages": CONVERSATION, **changes}
    prompt = fields.pop("prompt", "")
    request = build_request(prompt, 8, **fields)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")


def test_chat_template_flag_takes_a_file_or_the_template_itself(tmp_path) -> None:
    assert chat_template(str(CHAT_TEMPLATE)) == CHAT_TEMPLATE.read_text()
    assert chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    assert chat_template("") == ""
    from specpipe.cli import FlagError

    with pytest.raises(FlagError, match="cannot read"):
        chat_template(str(tmp_path / "missing.jinja"))


def test_chat_template_kwargs_reach_the_template(pipeline: Pipeline) -> None:
    """vLLM's chat_template_kwargs: more variables for the template, over HTTP and gRPC alike; the names the
    rendering sets itself are refused."""
    from tests.test_openai_api import post

    conversation = [{"role": "user", "content": "def parse(text):"}]
    status, body = post(
        pipeline, "/tokenize", {"messages": conversation, "chat_template_kwargs": {"greeting": "hi"}}
    )
    assert status == 200, body
    status, text = post(pipeline, "/detokenize", {"tokens": body["tokens"]})
    assert text["prompt"].startswith("<|greeting|>hi\n<|user|>def parse(text):")
    deep: object = "x"
    for _ in range(700):  # deeper than transformers' copy of the template's data can recurse
        deep = [deep]
    refusals = (
        ({"messages": []}, "may not set messages"),
        ({"conversations": 1, "namespace": 0}, "may not set conversations, namespace"),
        ([1], "an object"),
        ({"greeting": deep}, "the chat template failed on the request's values"),
    )
    for kwargs, message in refusals:
        status, body = post(
            pipeline, "/v1/chat/completions", {"messages": conversation, "chat_template_kwargs": kwargs}
        )
        assert status == 400 and message in body["error"]["message"], body
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        chat = build_request("", 4, messages=conversation, chat_template_kwargs={"greeting": "hi"})
        session = client.get_session(client.generate(chat).session_id)
        assert session.text.startswith("<|greeting|>hi\n<|user|>")
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(build_request("hello", 4, chat_template_kwargs={"greeting": "hi"}))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
