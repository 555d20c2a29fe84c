"""A target's scoring of a turn's prompt tokens (TargetService.ScorePrompt), as the coordinator asks for it
and the target answers; the scoring itself is target_service/prompt_scoring.py."""

from __future__ import annotations

from dataclasses import dataclass

from specpipe.sampling.logprobs import TokenLogprob
from specpipe.v1 import target_pb2


@dataclass(frozen=True, slots=True)
class PromptScoring:
    session_id: str
    token_ids: tuple[int, ...]  # the session's whole history
    first_position: int  # the first token scored (>= 1)
    top_logprobs: int

    @classmethod
    def from_pb(cls, pb: target_pb2.ScorePromptRequest) -> PromptScoring:
        return cls(pb.session_id, tuple(pb.token_ids), pb.first_position, pb.top_logprobs)

    def to_pb(self) -> target_pb2.ScorePromptRequest:
        return target_pb2.ScorePromptRequest(
            session_id=self.session_id,
            token_ids=self.token_ids,
            first_position=self.first_position,
            top_logprobs=self.top_logprobs,
        )


@dataclass(frozen=True, slots=True)
class PromptScores:
    logprobs: tuple[TokenLogprob, ...]  # one per token from first_position on
    forward_ns: int
    cached_tokens: int

    @classmethod
    def from_pb(cls, pb: target_pb2.ScorePromptResponse) -> PromptScores:
        return cls(tuple(TokenLogprob.from_pb(p) for p in pb.logprobs), pb.forward_ns, pb.cached_tokens)

    def to_pb(self) -> target_pb2.ScorePromptResponse:
        return target_pb2.ScorePromptResponse(
            logprobs=[logprob.to_pb() for logprob in self.logprobs],
            forward_ns=self.forward_ns,
            cached_tokens=self.cached_tokens,
        )
