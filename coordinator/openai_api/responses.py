"""Generate's chunks as OpenAI's objects: a whole (chat) completion, or the chunks of its event stream.

Choice i of a body with several prompts is prompt i // n's completion i % n, as OpenAI numbers them. A
finish reason of "eos" (the model ended) and "stop" (a stop string or stop token) are both OpenAI's "stop";
vLLM's `stop_reason` tells them apart (the stop string or token id, null for end-of-sequence).
Usage counts each prompt once and every completion's tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.openai_api.reasoning import ReasoningSplit, split_reasoning
from coordinator.openai_api.requests import ApiCall
from coordinator.openai_api.tools import ToolOutput
from coordinator.request import GenerationChunk
from specpipe.sampling.logprobs import TokenLogprob

# The lists of OpenAI's log-probs object, by whether it is chat's.
LOGPROB_LISTS = {True: ("content",), False: ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
# A token and its log-prob, or a bare token id: the prompt's first token, which has none.
Scored = TokenLogprob | int
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
LOWEST_LOGPROB = -9999.0  # for -inf (a token the masks ruled out), which JSON cannot hold; vLLM's value


def finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


@dataclass(slots=True)
class ChoiceState:
    """One choice so far: its text, log-probs and how it ended."""

    index: int
    echo: str
    started: bool = False  # a chunk of it was seen (the echo and a chat's role go with the first)
    texts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # each chunk's, as its event carries them
    text_offset: int = 0  # characters before the next token (completions' logprobs.text_offset)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    tools: ToolOutput | None = None  # chat under a tool choice: its output as calls
    reasoning: ReasoningSplit | None = None  # chat with a reasoning parser: thinking split from the answer


class ResponseBuilder:
    """Turns one ApiCall's chunks into OpenAI's response objects; `token_text` spells one token."""

    def __init__(self, call: ApiCall, model: str, token_text: Callable[[int], str]) -> None:
        self.call = call
        self.model = model
        self.token_text = token_text
        self.id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if call.chat else "text_completion"
        self.choices = {
            call.choice_index(prompt, completion): ChoiceState(call.choice_index(prompt, completion), echo)
            for prompt, echo in enumerate(call.echoes)
            for completion in range(call.n)
        }
        for choice in self.choices.values() if call.chat else ():
            if call.tool_choice.active:
                choice.tools = ToolOutput(call.tool_choice)
            if call.reasoning_parser:
                choice.reasoning = ReasoningSplit(call.reasoning_parser)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, request: int, chunk: GenerationChunk) -> dict[str, Any]:
        """Takes a chunk of request `request`; returns its choice's part, as a stream event carries it."""
        choice = self.choices[self.call.choice_index(request, chunk.index)]
        text = chunk.text
        entries: list[Scored] = list(chunk.logprobs)
        first = not choice.started
        if first:
            choice.started = True
            text = choice.echo + text
            first_prompt_token = self.call.first_prompt_tokens[request]
            if first_prompt_token is None:
                choice.text_offset = len(choice.echo)
            else:  # echo with logprobs: the prompt's tokens lead, from the start of the text
                entries = [first_prompt_token, *chunk.prompt_logprobs, *entries]
        choice.texts.append(text)
        logprobs = self.logprobs(choice, entries) if self.call.logprobs else None
        if logprobs is not None:
            choice.logprobs.append(logprobs)
        if chunk.usage is not None:
            self.completion_tokens += chunk.usage.generated_tokens
            if chunk.index == 0 and self.call.counts_prompt[request]:  # a prompt counts once, whatever n
                self.prompt_tokens += chunk.usage.prompt_tokens
        part: dict[str, Any] = {"index": choice.index}
        last = bool(chunk.finish_reason)
        reasoning = ""
        if choice.reasoning is not None:  # the answer's part of the text goes on as `text`
            reasoning, text = choice.reasoning.push(text)
            if last:
                held_reasoning, held_text = choice.reasoning.finish()
                reasoning, text = reasoning + held_reasoning, text + held_text
        if choice.tools is not None:
            part["delta"] = tool_delta(choice.tools, text, first, last)
        elif self.call.chat:
            part["delta"] = {"role": "assistant"} if first else {}
            if text or not reasoning:
                part["delta"]["content"] = text
        else:
            part["text"] = text
        if reasoning:
            part["delta"]["reasoning_content"] = reasoning
        part["logprobs"] = logprobs
        finish_reason = FINISH_REASONS.get(chunk.finish_reason)
        if choice.tools is not None and finish_reason:  # (after the last text reached the tool output)
            finish_reason = choice.tools.finish_reason(finish_reason)
        if finish_reason:
            choice.finish_reason, choice.stop_reason = finish_reason, chunk.stop_reason
        part["finish_reason"] = finish_reason
        part["stop_reason"] = chunk.stop_reason
        return part

    def event(self, part: dict[str, Any]) -> dict[str, Any]:
        """A stream event with one choice's part."""
        return {
            "id": self.id,
            "object": f"{self.object}.chunk" if self.call.chat else self.object,
            "created": self.created,
            "model": self.model,
            "choices": [part],
        }

    def usage_event(self) -> dict[str, Any]:
        """stream_options.include_usage: the last event, with no choices."""
        return {**self.event({}), "choices": [], "usage": self.usage()}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def response(self) -> dict[str, Any]:
        """The whole response, once every chunk was added."""
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            text = "".join(choice.texts) or choice.echo
            entry: dict[str, Any] = {"index": index}
            if choice.tools is not None:
                content, calls = choice.tools.final()
                entry["message"] = {"role": "assistant", "content": content}
                if calls:
                    entry["message"]["tool_calls"] = [call.to_openai() for call in calls]
            elif self.call.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            if self.call.chat and self.call.reasoning_parser:
                reasoning, answer = split_reasoning(self.call.reasoning_parser, text)
                message = entry["message"]
                if choice.tools is None:
                    message["content"] = answer
                message["content"] = message["content"] or None  # all thinking: no answer (yet)
                message["reasoning_content"] = reasoning or None
            entry["logprobs"] = self.whole_logprobs(choice) if self.call.logprobs else None
            entry["finish_reason"] = choice.finish_reason
            entry["stop_reason"] = choice.stop_reason
            choices.append(entry)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def whole_logprobs(self, choice: ChoiceState) -> dict[str, Any]:
        """A choice's log-probs: its chunks' joined (each list of them, one after the other)."""
        keys = LOGPROB_LISTS[self.call.chat]
        return {key: [item for part in choice.logprobs for item in part[key]] for key in keys}

    def logprobs(self, choice: ChoiceState, entries: Sequence[Scored]) -> dict[str, Any]:
        """OpenAI's log-probs of these tokens: chat's `content` list, or completions' parallel lists (where a
        bare token id, the prompt's first, has null for its log-prob and its top tokens)."""
        if self.call.chat:
            return {"content": [self.chat_logprob(e) for e in entries if isinstance(e, TokenLogprob)]}
        tokens, offsets, token_logprobs, top_logprobs = [], [], [], []
        for entry in entries:
            token = self.token_text(entry if isinstance(entry, int) else entry.token_id)
            tokens.append(token)
            offsets.append(choice.text_offset)
            choice.text_offset += len(token)
            if isinstance(entry, TokenLogprob):
                token_logprobs.append(finite(entry.logprob))
                # The chosen token and the likeliest others, as vLLM reports them.
                top = {self.token_text(token_id): finite(value) for token_id, value in entry.top}
                top_logprobs.append({token: finite(entry.logprob), **top})
            else:
                token_logprobs.append(None)
                top_logprobs.append(None)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def chat_logprob(self, logprob: TokenLogprob) -> dict[str, Any]:
        return {
            **self.token_entry(logprob.token_id, logprob.logprob),
            "top_logprobs": [self.token_entry(token_id, value) for token_id, value in logprob.top],
        }

    def token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.token_text(token_id)
        return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode("utf-8"))}


def tool_delta(tools: ToolOutput, text: str, first: bool, last: bool) -> dict[str, Any]:
    """A stream event's delta under a tool choice: what the output may show so far, and on its last chunk
    the calls (with any content held back ahead of them)."""
    delta = tools.stream_delta(text, first)
    if last:
        for key, value in tools.final_delta().items():
            delta[key] = delta.get(key, "") + value if key == "content" else value
    return delta
