"""GenerateRequest.messages: a conversation rendered into a prompt by the served model's chat template.

The template is the tokenizer's own (the target worker sends it with the tokenizer files) unless the
coordinator was given one (--chat-template, as vLLM's). Rendering runs transformers' sandboxed Jinja
environment on the event loop, as a text prompt's encoding does, so the conversation's length is bounded the
same way first. The rendered text already holds the template's special tokens (a beginning-of-sequence token
among them), so it is encoded without adding them again, as vLLM encodes a chat prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from coordinator.tokenization import check_length
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.v1 import coordinator_pb2

MAX_MESSAGES = 1024
MAX_TOOLS = 128


def json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not JSON, or nested past the decoder's depth
        raise InvalidArgumentError(f"{what} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{what} must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an assistant's turn made; its arguments are a JSON object's text."""

    id: str
    name: str
    arguments: str

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.ToolCall, what: str) -> ToolCall:
        if not pb.name:
            raise InvalidArgumentError(f"{what}.name must not be empty")
        json_object(pb.arguments or "{}", f"{what}.arguments")
        return cls(pb.id, pb.name, pb.arguments or "{}")

    def for_template(self) -> dict[str, Any]:
        """As transformers' chat templates read a call: the arguments as an object (templates write them
        with `tojson`)."""
        function = {"name": self.name, "arguments": json.loads(self.arguments)}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function the model may call: its name, description and arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: str = ""  # JSON Schema text, "" = none given

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.ToolDefinition, index: int) -> ToolDefinition:
        if not pb.name:
            raise InvalidArgumentError(f"tools[{index}].name must not be empty")
        if pb.parameters_json:
            json_object(pb.parameters_json, f"tools[{index}].parameters")
        return cls(pb.name, pb.description, pb.parameters_json)

    def for_template(self) -> dict[str, Any]:
        """OpenAI's tool object, which transformers passes to the template as `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        if self.parameters:
            function["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": function}


# The template's variables that the rendering itself sets: a request's chat_template_kwargs may not.
# Jinja's and transformers' globals (namespace(), raise_exception()...) are not overridden either.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
     "tokenize", "return_dict", "return_tensors", "tokenizer_kwargs", "conversation", "conversations",
     "padding", "truncation", "max_length", "return_assistant_tokens_mask", "sanitize_control_tokens",
     "namespace", "raise_exception", "strftime_now", "range", "dict", "lipsum", "cycler", "joiner"}
)  # fmt: skip


def template_kwargs_from_pb(text: str) -> tuple[tuple[str, object], ...]:
    """GenerateRequest.chat_template_kwargs_json: the extra variables, in their order."""
    if not text:
        return ()
    kwargs = json_object(text, "chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidArgumentError(
            f"chat_template_kwargs may not set {', '.join(reserved)}: the request's fields or the rendering "
            "set them"
        )
    return tuple(kwargs.items())


def tools_from_pb(pbs: Sequence[coordinator_pb2.ToolDefinition]) -> tuple[ToolDefinition, ...]:
    if len(pbs) > MAX_TOOLS:
        raise InvalidArgumentError(f"tools may hold at most {MAX_TOOLS} functions, got {len(pbs)}")
    tools = tuple(ToolDefinition.from_pb(pb, index) for index, pb in enumerate(pbs))
    if len({tool.name for tool in tools}) < len(tools):
        raise InvalidArgumentError("tools must name each function once")
    return tools


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's turn that called functions
    tool_call_id: str = ""  # a "tool" message: the call it answers
    name: str = ""  # a "tool" message: the function's name

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.ChatMessage, index: int) -> ChatMessage:
        if not pb.role:
            raise InvalidArgumentError(f"messages[{index}].role must not be empty")
        calls = tuple(
            ToolCall.from_pb(call, f"messages[{index}].tool_calls[{number}]")
            for number, call in enumerate(pb.tool_calls)
        )
        return cls(pb.role, pb.content, calls, pb.tool_call_id, pb.name)

    def for_template(self) -> dict[str, Any]:
        """The message as transformers' chat templates read it: role and content, and the tool fields where
        set (a template tests for them with `in` or `is defined`)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


def opens_generation_prompt(continue_final_message: bool, add_generation_prompt: bool | None) -> bool:
    """Whether the assistant's turn is opened after the messages: unless asked not to, or continuing the last
    message (which asking for both contradicts)."""
    if continue_final_message:
        if add_generation_prompt:
            raise InvalidArgumentError(
                "continue_final_message continues the last message: add_generation_prompt cannot open a turn"
            )
        return False
    return True if add_generation_prompt is None else add_generation_prompt


def messages_from_pb(pbs: Sequence[coordinator_pb2.ChatMessage]) -> tuple[ChatMessage, ...]:
    if len(pbs) > MAX_MESSAGES:
        raise InvalidArgumentError(f"messages may hold at most {MAX_MESSAGES} messages, got {len(pbs)}")
    return tuple(ChatMessage.from_pb(pb, index) for index, pb in enumerate(pbs))


@dataclass(frozen=True, slots=True)
class Conversation:
    """GenerateRequest.messages and what goes with them: all the chat template renders."""

    messages: tuple[ChatMessage, ...]
    continue_final_message: bool = False  # the last message is continued rather than a new turn opened
    add_generation_prompt: bool = True  # the assistant's turn is opened after the messages
    tools: tuple[ToolDefinition, ...] = ()  # functions the template describes to the model
    template_kwargs: tuple[tuple[str, object], ...] = ()  # more variables for the template

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.GenerateRequest) -> Conversation | None:
        """The request's conversation, None where it has no messages (then the fields that only go with
        messages are refused)."""
        if pb.continue_final_message and not pb.messages:
            raise InvalidArgumentError("continue_final_message needs messages")
        if pb.tools and not pb.messages:
            raise InvalidArgumentError("tools are for messages (the chat template describes them)")
        if pb.chat_template_kwargs_json and not pb.messages:
            raise InvalidArgumentError("chat_template_kwargs are for messages (the chat template reads them)")
        add_generation_prompt = opens_generation_prompt(
            pb.continue_final_message,
            pb.add_generation_prompt if pb.HasField("add_generation_prompt") else None,
        )
        if not pb.messages:
            return None
        return cls(
            messages_from_pb(pb.messages),
            pb.continue_final_message,
            add_generation_prompt,
            tools_from_pb(pb.tools),
            template_kwargs_from_pb(pb.chat_template_kwargs_json),
        )


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """Renders conversations with `template`, or the tokenizer's own where it is empty."""

    tokenizer: PreTrainedTokenizerBase
    template: str = ""

    @property
    def available(self) -> bool:
        return bool(self.template or self.tokenizer.chat_template)

    def render(self, conversation: Conversation, max_context: int) -> str:
        if not self.available:
            raise FailedPreconditionError(
                "the served model has no chat template: send a prompt instead of messages, or start the "
                "coordinator with --chat-template"
            )
        messages, tools = conversation.messages, conversation.tools
        # The texts a template prints: the messages, the calls, the tools and any extra variables.
        check_length(
            "".join(
                [m.role + m.content + "".join(c.arguments for c in m.tool_calls) for m in messages]
                + [t.description + t.parameters for t in tools]
                + [json.dumps(value) for _, value in conversation.template_kwargs]
            ),
            max_context,
            "messages",
        )
        try:
            rendered = self.tokenizer.apply_chat_template(
                [message.for_template() for message in messages],
                tools=[tool.for_template() for tool in tools] or None,
                chat_template=self.template or None,
                tokenize=False,
                add_generation_prompt=conversation.add_generation_prompt
                and not conversation.continue_final_message,
                continue_final_message=conversation.continue_final_message,
                **dict(conversation.template_kwargs),
            )
        except (TemplateError, ValueError) as exc:  # the template's raise_exception ("roles must alternate")
            raise InvalidArgumentError(f"messages: the chat template refused them: {exc}") from exc
        except (TypeError, RecursionError) as exc:  # a chat_template_kwargs value the template cannot use
            raise InvalidArgumentError(f"the chat template failed on the request's values: {exc}") from None
        assert isinstance(rendered, str)
        return rendered

    def token_ids(self, conversation: Conversation, max_context: int) -> list[int]:
        """The rendered conversation's tokens, encoded without adding special tokens: the template wrote
        those it wants."""
        text = self.render(conversation, max_context)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InvalidArgumentError("messages render to no tokens")
        return ids
