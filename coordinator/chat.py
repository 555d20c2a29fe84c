"""GenerateRequest.messages: a conversation rendered into a prompt by the served model's chat template.

The template is the tokenizer's own (the target worker sends it with the tokenizer files) unless the
coordinator was given one (--chat-template, as vLLM's). Rendering runs transformers' sandboxed Jinja
environment on the event loop, as a text prompt's encoding does, so the conversation's length is bounded the
same way first. The rendered text already holds the template's special tokens (a beginning-of-sequence token
among them), so it is encoded without adding them again, as vLLM encodes a chat prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from coordinator.tokenization import check_length
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.v1 import coordinator_pb2

MAX_MESSAGES = 1024


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.ChatMessage, index: int) -> ChatMessage:
        if not pb.role:
            raise InvalidArgumentError(f"messages[{index}].role must not be empty")
        return cls(pb.role, pb.content)


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
class ChatTemplate:
    """Renders conversations with `template`, or the tokenizer's own where it is empty."""

    tokenizer: PreTrainedTokenizerBase
    template: str = ""

    @property
    def available(self) -> bool:
        return bool(self.template or self.tokenizer.chat_template)

    def render(
        self,
        messages: Sequence[ChatMessage],
        continue_final_message: bool,
        max_context: int,
        add_generation_prompt: bool = True,
    ) -> str:
        if not self.available:
            raise FailedPreconditionError(
                "the served model has no chat template: send a prompt instead of messages, or start the "
                "coordinator with --chat-template"
            )
        check_length("".join(m.role + m.content for m in messages), max_context, "messages")
        try:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                chat_template=self.template or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
            )
        except (TemplateError, ValueError) as exc:  # the template's raise_exception ("roles must alternate")
            raise InvalidArgumentError(f"messages: the chat template refused them: {exc}") from exc
        assert isinstance(rendered, str)
        return rendered

    def token_ids(
        self,
        messages: Sequence[ChatMessage],
        continue_final_message: bool,
        max_context: int,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The rendered conversation's tokens, encoded without adding special tokens: the template wrote
        those it wants."""
        text = self.render(messages, continue_final_message, max_context, add_generation_prompt)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InvalidArgumentError("messages render to no tokens")
        return ids
