"""A validated Generate request and the chunks it streams back (the public API's domain types)."""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.chat import Conversation
from coordinator.structured_requests import output_regex
from specpipe.errors import InvalidArgumentError
from specpipe.sampling.logprobs import TokenLogprob
from specpipe.sampling.params import MAX_BAD_WORDS, MAX_TOP_LOGPROBS, SamplingParams
from specpipe.v1 import coordinator_pb2

MAX_COMPLETIONS = 16  # GenerateRequest.n: each completion is a session and a speculation loop of its own
SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

FINISH_REASONS = {
    "length": coordinator_pb2.FINISH_REASON_LENGTH,
    "stop": coordinator_pb2.FINISH_REASON_STOP,
    "eos": coordinator_pb2.FINISH_REASON_EOS,
}


def completion_slots(pb: coordinator_pb2.GenerateRequest) -> int:
    """The concurrency slots a request takes: its n completions (an n out of range is refused by from_pb,
    with completions_asked's message)."""
    return min(max(pb.n, 1), MAX_COMPLETIONS)


def completions_asked(pb: coordinator_pb2.GenerateRequest) -> int:
    """GenerateRequest.n, checked: 1..MAX_COMPLETIONS, unset = 1."""
    n = pb.n if pb.HasField("n") else 1
    if not 1 <= n <= MAX_COMPLETIONS:
        raise InvalidArgumentError(f"n must be in [1, {MAX_COMPLETIONS}] (unset = 1), got {n}")
    return n


def validate_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.match(session_id):
        raise InvalidArgumentError("session_id must be 1-128 characters of letters, digits, '_', '.' or '-'")
    return session_id


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_new_tokens: int
    max_speculative_tokens: int
    # None = the adaptive policy chooses k each round.
    default_speculative_tokens: int | None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: str
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    session_id: str  # empty = new session
    num_speculative_tokens: int | None  # None = adaptive
    ignore_eos: bool = False  # generate past end-of-sequence tokens, up to max_new_tokens
    stop_token_ids: frozenset[int] = frozenset()  # end after any of these, as after EOS (finish "stop")
    # Set: the first chunk carries this turn's prompt tokens' log-probs, with this many top alternatives.
    prompt_logprobs: int | None = None
    # Words never generated, as text (the coordinator adds their token sequences to the sampling's).
    bad_words: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the text ends with the stop string rather than before it
    skip_special_tokens: bool = True  # special tokens' text is left out of the text
    n: int = 1  # completions of the prompt, each a new session (coordinator/completions.py)
    # A conversation the chat template renders into the prompt (coordinator/chat.py), instead of one.
    conversation: Conversation | None = None
    # No next turn (the HTTP API's requests, whose clients cannot name a session): the session is deleted
    # and the workers' caches freed once the request ends. Not a wire field.
    ephemeral: bool = False

    @classmethod
    def from_pb(cls, pb: coordinator_pb2.GenerateRequest, limits: RequestLimits) -> GenerationRequest:
        if not pb.prompt and not pb.prompt_token_ids and not pb.messages and not pb.session_id:
            raise InvalidArgumentError(
                "prompt must not be empty (set prompt, prompt_token_ids or messages, "
                "or session_id to continue a session)"
            )
        if sum(map(bool, (pb.prompt, pb.prompt_token_ids, pb.messages))) > 1:
            raise InvalidArgumentError("set only one of prompt, prompt_token_ids and messages")
        if pb.messages and pb.session_id:
            raise InvalidArgumentError(
                "messages start a new conversation: leave session_id empty (a session's next turn is a "
                "prompt)"
            )
        conversation = Conversation.from_pb(pb)
        if not 1 <= pb.max_new_tokens <= limits.max_new_tokens:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {pb.max_new_tokens}"
            )
        if any(not s for s in pb.stop):
            raise InvalidArgumentError("stop strings must not be empty")
        if any(not word.strip() for word in pb.bad_words):
            raise InvalidArgumentError("bad_words must not be empty")
        if len(pb.bad_words) > MAX_BAD_WORDS:
            raise InvalidArgumentError(
                f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(pb.bad_words)}"
            )
        n = completions_asked(pb)
        if pb.session_id:
            validate_session_id(pb.session_id)
            if n > 1:
                raise InvalidArgumentError(
                    "n > 1 starts n new sessions, one per completion: leave session_id empty"
                )
        k = limits.default_speculative_tokens
        if pb.HasField("num_speculative_tokens"):
            k = pb.num_speculative_tokens
            if k > limits.max_speculative_tokens:
                raise InvalidArgumentError(
                    f"num_speculative_tokens must be in [0, {limits.max_speculative_tokens}], got {k}"
                )
        regex = output_regex(pb.structured_output) if pb.HasField("structured_output") else ""
        if regex and pb.sampling.output_regex:
            raise InvalidArgumentError("set only one of structured_output and sampling.output_regex")
        prompt_logprobs = pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None
        if prompt_logprobs is not None and prompt_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgumentError(
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (unset = none), got {prompt_logprobs}"
            )
        sampling = SamplingParams.from_pb(pb.sampling)
        if not pb.sampling.HasField("seed") and not sampling.is_greedy:
            # No seed: a fresh one, so repeated requests sample afresh (and this one's rounds, fail-overs
            # included, still share it).
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(64))
        if regex:  # structured_output, compiled (coordinator/structured_requests.py)
            sampling = dataclasses.replace(sampling, output_regex=regex)
        return cls(
            prompt=pb.prompt,
            prompt_token_ids=tuple(pb.prompt_token_ids),
            max_new_tokens=pb.max_new_tokens,
            sampling=sampling,
            stop=tuple(pb.stop),
            session_id=pb.session_id,
            num_speculative_tokens=k,
            ignore_eos=pb.ignore_eos,
            stop_token_ids=frozenset(pb.stop_token_ids),
            prompt_logprobs=prompt_logprobs,
            bad_words=tuple(pb.bad_words),
            include_stop_str_in_output=pb.include_stop_str_in_output,
            skip_special_tokens=pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True,
            n=n,
            conversation=conversation,
        )


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0
    target_forward_ns: int = 0
    draft_forward_ns: int = 0

    def to_pb(self) -> coordinator_pb2.Usage:
        return coordinator_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted_tokens,
            target_passes=self.target_passes,
            target_forward_ns=self.target_forward_ns,
            draft_forward_ns=self.draft_forward_ns,
        )


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    session_id: str
    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "", "length", "stop" or "eos"
    usage: Usage | None = field(default=None)
    logprobs: Sequence[TokenLogprob] = ()  # one per token where the request's sampling asks
    prompt_logprobs: Sequence[TokenLogprob] = ()  # the first chunk's, where the request asks
    index: int = 0  # which of the request's n completions
    # What stopped a "stop" finish: the stop string, or the stop token id (vLLM's stop_reason).
    stop_reason: str | int | None = None

    def to_pb(self) -> coordinator_pb2.GenerateResponse:
        stop = (
            {"stop_string": self.stop_reason}
            if isinstance(self.stop_reason, str)
            else {"stop_token_id": self.stop_reason}
            if self.stop_reason is not None
            else {}
        )
        return coordinator_pb2.GenerateResponse(
            session_id=self.session_id,
            token_ids=self.token_ids,
            text=self.text,
            finish_reason=FINISH_REASONS.get(self.finish_reason, coordinator_pb2.FINISH_REASON_UNSPECIFIED),
            usage=self.usage.to_pb() if self.usage is not None else None,
            logprobs=[logprob.to_pb() for logprob in self.logprobs],
            prompt_logprobs=[logprob.to_pb() for logprob in self.prompt_logprobs],
            index=self.index,
            **stop,
        )
