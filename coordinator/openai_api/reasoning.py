"""A reasoning model's thinking, split from its answer: vLLM's `--reasoning-parser` and `reasoning_content`.

Reasoning models write their thinking between `<think>` and `</think>`, then the answer. With a parser set,
the chat API returns the thinking as the message's (or a stream delta's) `reasoning_content` and the rest as
`content`, as vLLM does:

- `deepseek_r1`: the output starts inside the thinking (DeepSeek-R1's template opens `<think>` in the prompt;
  a leading `<think>` in the output is dropped too); everything before `</think>` is reasoning, and an output
  without `</think>` (cut short by max_tokens) is reasoning alone;
- `qwen3`: reasoning only where the output starts with `<think>` (Qwen3 writes it; with thinking turned off
  its template leaves the output without one): up to `</think>`, and the rest is content. A template that
  opens `<think>` in the prompt itself (Qwen3's thinking-only models of 2507) wants `deepseek_r1`.

A stream holds back an end of the text that could begin a tag, so a tag is never split between events. A
request whose output is constrained (a JSON schema, a regex, a choice, a tool choice of a function or
"required") is not split: its output is the constrained value.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def partial_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (held back: the next piece may finish it)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


@dataclass(slots=True)
class ReasoningSplit:
    """One choice's output, piece by piece, as (reasoning, content) pieces."""

    parser: str
    state: str = "start"  # start (an opening tag may come), reasoning, content
    held: str = ""  # text not classified yet: it may be the start of a tag

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and the content this piece of output adds (either may be "")."""
        self.held += text
        reasoning = content = ""
        if self.state == "start":
            stripped = self.held.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.held = stripped[len(THINK_OPEN) :]
                self.state = "reasoning"
            elif THINK_OPEN.startswith(stripped):
                return "", ""  # (all of it may still be the opening tag)
            else:
                self.state = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self.state == "reasoning":
            end = self.held.find(THINK_CLOSE)
            if end < 0:
                keep = partial_end(self.held, THINK_CLOSE)
                reasoning, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
                return reasoning, ""
            reasoning, self.held = self.held[:end], self.held[end + len(THINK_CLOSE) :]
            self.state = "content"
        content, self.held = self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output ended."""
        held, self.held = self.held, ""
        if self.state == "reasoning" or (self.state == "start" and self.parser == "deepseek_r1"):
            return held, ""
        return "", held


def split_reasoning(parser: str, text: str) -> tuple[str, str]:
    """A whole output's (reasoning, content)."""
    splitter = ReasoningSplit(parser)
    reasoning, content = splitter.push(text)
    tail_reasoning, tail_content = splitter.finish()
    return reasoning + tail_reasoning, content + tail_content
