"""Per-request sampling parameters, shared by the draft and the target so both see identical p and q."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from specpipe.errors import InvalidArgumentError
from specpipe.v1 import common_pb2

ACCEPTANCE_RULES = ("leviathan", "coupled")
MAX_TOP_LOGPROBS = 20  # as OpenAI's API: each is a gather and a protobuf entry per generated token
MAX_OCCURRENCE_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's and vLLM's
MAX_LOGIT_BIAS = 100.0  # as OpenAI's: +-100 is as good as forcing or banning a token
MAX_LOGIT_BIAS_TOKENS = 1024  # each is an entry in every worker message of the request
MAX_ALLOWED_TOKEN_IDS = 4096  # each is an entry in every worker message of the request
MAX_BAD_WORDS = 256  # sequences; each is matched at every row of every draft step and verify
MAX_BAD_WORD_TOKENS = 32
MAX_OUTPUT_REGEX_CHARS = 65_536  # a JSON schema's regex is a few KB; the automaton's size follows it
MAX_MEMOIZED_BYTES = 512  # from_pb memoizes messages up to this size (all but long logit biases)
_RULE_TO_PB = {
    "leviathan": common_pb2.ACCEPTANCE_RULE_LEVIATHAN,
    "coupled": common_pb2.ACCEPTANCE_RULE_COUPLED,
}
_PB_TO_RULE = {value: key for key, value in _RULE_TO_PB.items()}


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean "off"; seed keys all randomness."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # "leviathan" (rejection sampling) or "coupled" (shared noise; see specpipe/sampling/coupled.py).
    acceptance: str = "leviathan"
    # Set: report each generated token's log-prob and this many top alternatives (sampling/logprobs.py).
    logprobs: int | None = None
    # CTRL's repetition penalty over the whole sequence (sampling/penalties.py); 1 = off.
    repetition_penalty: float = 1.0
    # Min-p: drop tokens below min_p times the top token's probability (sampling/processing.py); 0 = off.
    min_p: float = 0.0
    # OpenAI's penalties on tokens in the output so far (sampling/penalties.py); 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Where the output begins in the session's history (the coordinator sets it, for those penalties).
    output_start: int = 0
    # (token id, bias) pairs by id, added to the logits before the penalties (sampling/logit_bias.py).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Until the output holds min_tokens tokens, end_token_ids are never chosen (sampling/min_tokens.py); the
    # coordinator sets end_token_ids to the request's (end-of-sequence unless ignored, stop token ids).
    min_tokens: int = 0
    end_token_ids: tuple[int, ...] = ()
    # Only these tokens may be chosen (sampling/allowed_tokens.py); empty = off.
    allowed_token_ids: tuple[int, ...] = ()
    # Token sequences the output never completes (sampling/bad_words.py).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Structured output: the output must match this regular expression (sampling/structured_output.py);
    # "" = off. The coordinator compiles GenerateRequest.structured_output into it.
    output_regex: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise InvalidArgumentError(
                f"sampling.acceptance must be one of {ACCEPTANCE_RULES}, got {self.acceptance!r}"
            )
        if not 0 <= self.seed < 2**64:
            raise InvalidArgumentError(f"sampling.seed must fit in uint64, got {self.seed}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgumentError(
                f"sampling.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.min_p != 0.0 and (not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0):
            raise InvalidArgumentError(f"sampling.min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty") if self.penalizes_occurrences else ():
            value = getattr(self, name)
            if not math.isfinite(value) or not -MAX_OCCURRENCE_PENALTY <= value <= MAX_OCCURRENCE_PENALTY:
                raise InvalidArgumentError(
                    f"sampling.{name} must be in [-{MAX_OCCURRENCE_PENALTY:g}, {MAX_OCCURRENCE_PENALTY:g}] "
                    f"(0 = off), got {value}"
                )
        if self.logit_bias:
            self._check_logit_bias()
        if self.allowed_token_ids or self.bad_words:
            self._check_token_masks()
        if len(self.output_regex) > MAX_OUTPUT_REGEX_CHARS:
            raise InvalidArgumentError(
                f"sampling.output_regex must be at most {MAX_OUTPUT_REGEX_CHARS} characters, "
                f"got {len(self.output_regex)}"
            )
        if self.min_tokens < 0 or self.output_start < 0:
            raise InvalidArgumentError(
                f"sampling.min_tokens and output_start must be >= 0, "
                f"got {self.min_tokens} and {self.output_start}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgumentError(
                f"sampling.logprobs must be in [0, {MAX_TOP_LOGPROBS}] (unset = none), got {self.logprobs}"
            )

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidArgumentError(
                f"sampling.logit_bias may bias at most {MAX_LOGIT_BIAS_TOKENS} tokens, "
                f"got {len(self.logit_bias)}"
            )
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not math.isfinite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidArgumentError(
                    f"sampling.logit_bias maps token ids >= 0 to biases in [-{MAX_LOGIT_BIAS:g}, "
                    f"{MAX_LOGIT_BIAS:g}], got {token_id}: {bias}"
                )

    def _check_token_masks(self) -> None:
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS or min(self.allowed_token_ids, default=0) < 0:
            raise InvalidArgumentError(
                f"sampling.allowed_token_ids must be at most {MAX_ALLOWED_TOKEN_IDS} token ids >= 0, "
                f"got {len(self.allowed_token_ids)} (smallest {min(self.allowed_token_ids, default=0)})"
            )
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidArgumentError(
                f"sampling.bad_words may hold at most {MAX_BAD_WORDS} sequences, got {len(self.bad_words)}"
            )
        for word in self.bad_words:
            if not 1 <= len(word) <= MAX_BAD_WORD_TOKENS or min(word) < 0:
                raise InvalidArgumentError(
                    f"sampling.bad_words must be sequences of 1..{MAX_BAD_WORD_TOKENS} token ids >= 0, "
                    f"got {list(word)}"
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_applied_echo(self) -> bool:
        """Whether the sampling uses a field newer than the target's echo of the sampling it applied
        (VerifyResponse.applied_sampling): a worker older than such a field would drop it silently and
        sample from another distribution, so the target echoes what it applied and the coordinator checks it.
        (repetition_penalty, older than the echo, has an echo of its own.)"""
        # Greedy ignores min_p; a bias or a penalty moves even the argmax.
        filters = self.min_p > 0.0 and not self.is_greedy
        holds_back = self.min_tokens > 0 and bool(self.end_token_ids)  # the coordinator sets the ids
        biased = bool(self.logit_bias)
        return filters or self.penalizes_occurrences or biased or holds_back or self.masks_tokens

    @property
    def masks_tokens(self) -> bool:
        """Whether some tokens are never chosen at some positions (output_regex, allowed_token_ids,
        bad_words): a row may be left with no token, and q is mostly zeros."""
        return bool(self.output_regex) or bool(self.allowed_token_ids) or bool(self.bad_words)

    @property
    def penalizes_occurrences(self) -> bool:
        """Whether presence or frequency penalties apply."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def penalizes(self) -> bool:
        """Whether any penalty on the sequence so far applies (sampling/penalties.py)."""
        return self.repetition_penalty != 1.0 or self.penalizes_occurrences

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> SamplingParams:
        """The params a message holds; memoized by its bytes: every worker message carries its request's
        sampling, the same in all of the request's rounds, and building this frozen dataclass (16 fields,
        validated) costs ~4 us a message on the round's critical path, a hit ~0.5 us."""
        serialized = pb.SerializeToString()
        if len(serialized) > MAX_MEMOIZED_BYTES:
            return cls._build(pb)  # a long logit_bias: an entry would pin ~120 KB per 1024 ids
        return _from_wire(serialized)

    @classmethod
    def _build(cls, pb: common_pb2.SamplingParams) -> SamplingParams:
        top_p = pb.top_p if pb.HasField("top_p") else 1.0
        acceptance = _PB_TO_RULE.get(pb.acceptance)
        if acceptance is None:
            raise InvalidArgumentError(f"sampling.acceptance: unknown rule {pb.acceptance}")
        # The fields most requests leave unset are read only where set: every worker message carries a
        # SamplingParams, and its parse is on the round's critical path.
        extras: dict[str, Any] = {}
        if pb.min_p:
            extras["min_p"] = pb.min_p
        if pb.presence_penalty:
            extras["presence_penalty"] = pb.presence_penalty
        if pb.frequency_penalty:
            extras["frequency_penalty"] = pb.frequency_penalty
        if pb.output_start:
            extras["output_start"] = pb.output_start
        if pb.logit_bias:
            extras["logit_bias"] = tuple(sorted(pb.logit_bias.items()))
        if pb.min_tokens:
            extras["min_tokens"] = pb.min_tokens
        if pb.end_token_ids:
            extras["end_token_ids"] = tuple(pb.end_token_ids)
        if pb.allowed_token_ids:
            extras["allowed_token_ids"] = tuple(pb.allowed_token_ids)
        if pb.bad_words:
            extras["bad_words"] = tuple(tuple(word.token_ids) for word in pb.bad_words)
        if pb.output_regex:
            extras["output_regex"] = pb.output_regex
        return cls(
            temperature=pb.temperature,
            top_k=pb.top_k,
            top_p=top_p,
            seed=pb.seed,
            acceptance=acceptance,
            logprobs=pb.logprobs if pb.HasField("logprobs") else None,
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            **extras,
        )

    def to_pb(self) -> common_pb2.SamplingParams:
        pb = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            acceptance=_RULE_TO_PB[self.acceptance],
            logprobs=self.logprobs,
            repetition_penalty=None if self.repetition_penalty == 1.0 else self.repetition_penalty,
        )
        if self.min_p:
            pb.min_p = self.min_p
        if self.presence_penalty:
            pb.presence_penalty = self.presence_penalty
        if self.frequency_penalty:
            pb.frequency_penalty = self.frequency_penalty
        if self.output_start:
            pb.output_start = self.output_start
        if self.logit_bias:
            pb.logit_bias.update(self.logit_bias)
        if self.min_tokens:
            pb.min_tokens = self.min_tokens
        if self.end_token_ids:
            pb.end_token_ids.extend(self.end_token_ids)
        if self.allowed_token_ids:
            pb.allowed_token_ids.extend(self.allowed_token_ids)
        for word in self.bad_words:
            pb.bad_words.add(token_ids=word)
        if self.output_regex:
            pb.output_regex = self.output_regex
        return pb

    def to_dict(self) -> dict[str, object]:
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "acceptance": self.acceptance,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {str(token_id): bias for token_id, bias in self.logit_bias},
            "min_tokens": self.min_tokens,
            "allowed_token_ids": list(self.allowed_token_ids),
            "bad_words": [list(word) for word in self.bad_words],
            "output_regex": self.output_regex,
        }


@functools.lru_cache(maxsize=1024)
def _from_wire(serialized: bytes) -> SamplingParams:
    """SamplingParams.from_pb's memo (an error is raised again on each call: lru_cache keeps only results)."""
    return SamplingParams._build(common_pb2.SamplingParams.FromString(serialized))
