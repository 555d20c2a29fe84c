"""Verification: score the draft block in one target forward pass and apply the exact acceptance rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import torch

from specpipe.errors import InvalidArgumentError
from specpipe.runtime.kv_cache import SessionKVCacheStore
from specpipe.runtime.model_runner import CausalLMRunner, ForwardResult
from specpipe.runtime.stream_history import StreamHistory, resolve_history
from specpipe.sampling.adjustments import adjust_logits
from specpipe.sampling.coupled import verify_coupled
from specpipe.sampling.draft_sampling import expand_distributions
from specpipe.sampling.logprobs import TokenLogprob, token_logprobs
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.penalties import penalize_block
from specpipe.sampling.processing import sampling_probs
from specpipe.sampling.rejection_sampler import rejection_sample, verify_greedy
from specpipe.sampling.structured_output import OutputAutomata
from specpipe.speculation.rounds import report_fields
from specpipe.v1 import common_pb2, target_pb2


def distribution_values(distribution: common_pb2.TokenDistribution) -> torch.Tensor | tuple[float, ...]:
    """The probabilities of a TokenDistribution: the packed float32 bytes when set, else the floats."""
    if distribution.packed_probs:
        if len(distribution.packed_probs) % 4:
            raise InvalidArgumentError(
                "packed_probs must hold little-endian float32 values (a multiple of 4 bytes)"
            )
        packed = numpy.frombuffer(distribution.packed_probs, dtype="<f4")  # explicit byte order
        return torch.from_numpy(packed.astype(numpy.float32))
    return tuple(distribution.probs)


@dataclass(frozen=True, slots=True)
class VerifyBlock:
    session_id: str
    token_ids: tuple[int, ...]
    draft_token_ids: tuple[int, ...]
    # q per draft token as (support ids, probs) (empty ids = dense); None = point masses.
    draft_probs: tuple[tuple[tuple[int, ...], torch.Tensor | tuple[float, ...]], ...] | None
    sampling: SamplingParams
    # Sent before the previous verdict on its stream was known (see target_service/chain.py).
    chained: bool = False

    @classmethod
    def from_pb(cls, pb: target_pb2.VerifyRequest, history: StreamHistory | None = None) -> VerifyBlock:
        if pb.chained and history is None:
            raise InvalidArgumentError("chained requests continue a stream: use VerifyStream")
        probs = tuple((tuple(d.token_ids), distribution_values(d)) for d in pb.draft_probs) or None
        return cls(
            session_id=pb.session_id,
            token_ids=resolve_history(pb.start_position, pb.token_ids, history),
            draft_token_ids=tuple(pb.draft_token_ids),
            draft_probs=probs,
            sampling=SamplingParams.from_pb(pb.sampling),
            chained=pb.chained,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    num_accepted: int
    next_token_id: int
    recovered: bool
    forward_ns: int
    cached_tokens: int
    skipped: bool = False
    # Where the request's sampling asks: the accepted draft tokens' and the next token's (num_accepted + 1).
    logprobs: tuple[TokenLogprob, ...] = ()
    repetition_penalty: float = 1.0  # the penalty the verdict applied (echoed, so a dropped one shows)
    # The sampling the verdict applied, where it uses a field newer than this echo (needs_applied_echo).
    applied_sampling: SamplingParams | None = None

    @classmethod
    def skip(cls) -> Verdict:
        """The answer to a chained request whose assumption failed: nothing was verified."""
        return cls(
            num_accepted=0, next_token_id=0, recovered=False, forward_ns=0, cached_tokens=0, skipped=True
        )

    def to_pb(self) -> target_pb2.VerifyResponse:
        if self.skipped:
            return target_pb2.VerifyResponse(skipped=True)
        return target_pb2.VerifyResponse(
            num_accepted=self.num_accepted,
            next_token_id=self.next_token_id,
            recovered=self.recovered,
            forward_ns=self.forward_ns,
            cached_tokens=self.cached_tokens,
            **report_fields(self.logprobs, self.repetition_penalty, self.applied_sampling),
        )


class Verifier:
    def __init__(self, runner: CausalLMRunner) -> None:
        self.runner = runner
        self.automata = OutputAutomata(runner.tokenizer)  # structured output's, built per regex on first use

    @property
    def caches(self) -> SessionKVCacheStore:
        return self.runner.caches

    def validate(self, block: VerifyBlock) -> None:
        if not block.session_id:
            raise InvalidArgumentError("session_id must not be empty")
        if not block.token_ids:
            raise InvalidArgumentError("token_ids must not be empty")
        vocab = self.runner.vocab_size
        if not self.runner.in_vocab(block.token_ids):
            raise InvalidArgumentError(f"token_ids must be in [0, {vocab})")
        if not self.runner.in_vocab(block.draft_token_ids):
            raise InvalidArgumentError(f"draft_token_ids must be in [0, {vocab})")
        if block.draft_probs is not None and len(block.draft_probs) != len(block.draft_token_ids):
            raise InvalidArgumentError(
                f"draft_probs has {len(block.draft_probs)} entries "
                f"for {len(block.draft_token_ids)} draft tokens"
            )
        length = len(block.token_ids) + len(block.draft_token_ids)
        if length > self.runner.max_context:
            raise InvalidArgumentError(
                f"token_ids + draft_token_ids ({length}) exceed "
                f"the target context of {self.runner.max_context}"
            )

    def verify(self, block: VerifyBlock) -> Verdict:
        self.validate(block)
        result = self.runner.forward(*forward_call(block))
        return self.decide(block, result)

    def verify_many(self, blocks: Sequence[VerifyBlock]) -> list[Verdict | Exception]:
        """`verify` of blocks of distinct sessions, with one forward pass for all of them where the runner
        packs sessions. A block that fails validation gets its error and the others still run; a failed pass
        fails them all."""
        outcomes: list[Verdict | Exception | None] = [None] * len(blocks)
        valid: list[int] = []
        for index, block in enumerate(blocks):
            try:
                self.validate(block)
                valid.append(index)
            except InvalidArgumentError as exc:
                outcomes[index] = exc
        if valid:
            try:
                results = self.runner.forward_many([forward_call(blocks[i]) for i in valid])
            except Exception as exc:
                results = [exc] * len(valid)
            for index, result in zip(valid, results, strict=True):
                try:
                    outcomes[index] = (
                        result if isinstance(result, Exception) else self.decide(blocks[index], result)
                    )
                except Exception as exc:
                    outcomes[index] = exc
        return [outcome for outcome in outcomes if outcome is not None]

    def decide(self, block: VerifyBlock, result: ForwardResult) -> Verdict:
        """The verdict on a block from the target's logits at its k + 1 positions: the acceptance rule."""
        # [k + 1, vocab_size]: row i scores the position after history + draft[:i], and its penalties see
        # exactly those tokens.
        adjusted = adjust_logits(
            result.logits,
            block.token_ids,
            block.draft_token_ids,
            block.sampling,
            lambda rows: penalize_block(rows, block.token_ids, block.draft_token_ids, block.sampling),
            self.automata,
            block.session_id,
        )
        logits = adjusted.logits
        if block.sampling.is_greedy:
            # Only the argmax matters, and the logits' is the one-hot p's: skip building p.
            outcome = verify_greedy(logits, block.draft_token_ids)
        else:
            target_probs = sampling_probs(logits, block.sampling)  # [k + 1, vocab_size]
            if block.sampling.acceptance == "coupled":
                outcome = verify_coupled(
                    target_probs, list(block.draft_token_ids), len(block.token_ids), block.sampling.seed
                )
            else:
                draft_probs = None
                if block.draft_probs is not None:
                    draft_probs = expand_distributions(
                        block.draft_probs, self.runner.vocab_size
                    )  # [k, vocab]
                outcome = rejection_sample(
                    target_probs,
                    list(block.draft_token_ids),
                    draft_probs,
                    first_position=len(block.token_ids),
                    seed=block.sampling.seed,
                )
        adjusted.check_reached(outcome.num_accepted + 1)  # rows 0..num_accepted made the tokens
        logprobs: tuple[TokenLogprob, ...] = ()
        if block.sampling.logprobs is not None:
            emitted = [*block.draft_token_ids[: outcome.num_accepted], outcome.next_token_id]
            # [num_accepted + 1, vocab_size]: row i scored emitted[i]; the raw logits, before any penalty.
            rows = result.logits[: len(emitted)]
            logprobs = tuple(token_logprobs(rows, emitted, block.sampling.logprobs))
        return Verdict(
            num_accepted=outcome.num_accepted,
            next_token_id=outcome.next_token_id,
            recovered=outcome.recovered,
            forward_ns=result.forward_ns,
            cached_tokens=result.cached_tokens,
            logprobs=logprobs,
            repetition_penalty=block.sampling.repetition_penalty,
            applied_sampling=block.sampling if block.sampling.needs_applied_echo else None,
        )


def forward_call(block: VerifyBlock) -> tuple[str, list[int], int]:
    """The runner call that scores a block: its session, history + draft tokens, and the k + 1 last rows."""
    return block.session_id, [*block.token_ids, *block.draft_token_ids], len(block.draft_token_ids) + 1
