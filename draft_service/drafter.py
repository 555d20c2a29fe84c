"""Drafting with a small causal LM: k autoregressive steps on the session's KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specpipe.errors import InvalidArgumentError, SpecpipeError
from specpipe.runtime.kv_cache import SessionKVCacheStore
from specpipe.runtime.model_runner import CausalLMRunner, ForwardResult, in_vocab
from specpipe.runtime.stream_history import StreamHistory, resolve_history
from specpipe.sampling.adjustments import adjust_logits
from specpipe.sampling.coupled import coupled_sample
from specpipe.sampling.draft_sampling import compact_supports, sample_draft_token
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.penalties import SequencePenalties
from specpipe.sampling.processing import greedy_token_ids, sampling_probs
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs
from specpipe.sampling.structured_output import OutputAutomata
from specpipe.v1 import common_pb2, draft_pb2


@dataclass(frozen=True, slots=True)
class DraftRequest:
    session_id: str
    token_ids: tuple[int, ...]
    num_tokens: int
    sampling: SamplingParams
    # The first token guesses the target's bonus token (see ProposeRequest.first_is_bonus_guess).
    first_is_bonus_guess: bool = False

    @classmethod
    def from_pb(cls, pb: draft_pb2.ProposeRequest, history: StreamHistory | None = None) -> DraftRequest:
        return cls(
            session_id=pb.session_id,
            token_ids=resolve_history(pb.start_position, pb.token_ids, history),
            num_tokens=pb.num_tokens,
            sampling=SamplingParams.from_pb(pb.sampling),
            first_is_bonus_guess=pb.first_is_bonus_guess,
        )


@dataclass(frozen=True, slots=True)
class DraftProposal:
    token_ids: list[int]
    # q per proposed token as (support ids, probs); None when every proposal is a point mass (greedy).
    draft_probs: list[tuple[list[int], torch.Tensor]] | None
    forward_ns: int
    cached_tokens: int

    def wire_probs(self) -> list[common_pb2.TokenDistribution]:
        """q as the target takes it (empty for point masses)."""
        return [
            # Packed little-endian float32: far cheaper to encode and decode than a repeated float field.
            common_pb2.TokenDistribution(token_ids=ids, packed_probs=values.numpy().astype("<f4").tobytes())
            for ids, values in self.draft_probs or []
        ]

    def to_pb(self) -> draft_pb2.ProposeResponse:
        return draft_pb2.ProposeResponse(
            token_ids=self.token_ids,
            draft_probs=self.wire_probs(),
            forward_ns=self.forward_ns,
            cached_tokens=self.cached_tokens,
        )


def validate_request(request: DraftRequest, max_draft_tokens: int, vocab_size: int, max_context: int) -> None:
    """The checks every drafter makes before proposing; max_context 0 means the context is not known."""
    if not request.session_id:
        raise InvalidArgumentError("session_id must not be empty")
    if not request.token_ids:
        raise InvalidArgumentError("token_ids must not be empty")
    if not 1 <= request.num_tokens <= max_draft_tokens:
        raise InvalidArgumentError(f"num_tokens must be in [1, {max_draft_tokens}], got {request.num_tokens}")
    if not in_vocab(request.token_ids, vocab_size):
        raise InvalidArgumentError(f"token_ids must be in [0, {vocab_size})")
    # The last proposal is sampled, never fed, so the context must hold history + k - 1 tokens.
    needed = len(request.token_ids) + request.num_tokens - 1
    if max_context and needed > max_context:
        raise InvalidArgumentError(
            f"token_ids ({len(request.token_ids)}) + num_tokens ({request.num_tokens}) exceed the draft "
            f"context of {max_context}"
        )


# steer(history, model's argmax) -> the token a greedy draft proposes after `history`.
GreedySteer = Callable[[Sequence[int], int], int]


class Drafter(Protocol):
    """What a draft worker serves: a named proposer with (possibly empty) per-session caches."""

    name: str

    @property
    def caches(self) -> SessionKVCacheStore: ...

    def propose(self, request: DraftRequest) -> DraftProposal: ...


class ModelDrafter:
    """Proposes tokens with the draft LM, sampling with the request's params keyed by (seed, position)."""

    name = "model"

    def __init__(
        self, runner: CausalLMRunner, max_draft_tokens: int, steer: GreedySteer | None = None
    ) -> None:
        self.runner = runner
        self.automata = OutputAutomata(runner.tokenizer)  # structured output's, built per regex on first use
        self.max_draft_tokens = max_draft_tokens
        # Greedy requests only: replaces the model's argmax after each step, for cost profiling with a chosen
        # acceptance rate (draft_service/controlled.py). The forwards still run; exactness is the target's.
        self.steer = steer

    @property
    def caches(self) -> SessionKVCacheStore:
        return self.runner.caches

    def propose(self, request: DraftRequest) -> DraftProposal:
        validate_request(request, self.max_draft_tokens, self.runner.vocab_size, self.runner.max_context)
        drafting = _Drafting(request, self.steer, self.automata)
        steps = request.num_tokens
        result = self.runner.decode(request.session_id, request.token_ids, steps, drafting.choose)
        drafting.cached_tokens, drafting.forward_ns = result.cached_tokens, result.forward_ns
        return drafting.proposal()

    def propose_many(self, requests: Sequence[DraftRequest]) -> list[DraftProposal | Exception]:
        """`propose` for requests of distinct sessions, each step one forward pass for every session still
        drafting (packed where the runner packs sessions: `CausalLMRunner.forward_many`). A request that fails
        validation gets its error and the others still run; a failed pass fails the requests in it."""
        outcomes: list[DraftProposal | Exception | None] = [None] * len(requests)
        active: list[tuple[int, _Drafting]] = []
        for index, request in enumerate(requests):
            try:
                validate_request(
                    request, self.max_draft_tokens, self.runner.vocab_size, self.runner.max_context
                )
                active.append((index, _Drafting(request, self.steer, self.automata)))
            except InvalidArgumentError as exc:
                outcomes[index] = exc
        while active:
            calls = [(drafting.request.session_id, drafting.ids, 1) for _, drafting in active]
            try:
                results = self.runner.forward_many(calls)
            except Exception as exc:
                for index, _ in active:
                    outcomes[index] = exc
                break
            still: list[tuple[int, _Drafting]] = []
            for (index, drafting), result in zip(active, results, strict=True):
                try:
                    drafting.take(result)
                except SpecpipeError as exc:  # this request's own (its constraint), not the batch's
                    outcomes[index] = exc
                    continue
                if drafting.done:
                    outcomes[index] = drafting.proposal()
                else:
                    still.append((index, drafting))
            active = still
        return [outcome for outcome in outcomes if outcome is not None]


class _Drafting:
    """One request's drafting, a forward pass at a time: the token each step's logits give, and its q."""

    def __init__(
        self, request: DraftRequest, steer: GreedySteer | None = None, automata: OutputAutomata | None = None
    ) -> None:
        self.request = request
        self.steer = steer
        self.automata = automata
        self.ids = list(request.token_ids)  # the history, then each drafted token
        self.proposed: list[int] = []
        self.q_rows: list[torch.Tensor] = []  # [vocab_size] each: q of each drafted token (Leviathan rule)
        self.forward_ns = 0
        self.cached_tokens = 0
        self._penalties: SequencePenalties | None = None  # the sequence so far, where penalties apply

    @property
    def done(self) -> bool:
        return len(self.proposed) == self.request.num_tokens

    def take(self, result: ForwardResult) -> None:
        """The next token from the logits of a forward over `ids`."""
        if not self.proposed:
            self.cached_tokens = result.cached_tokens
        self.forward_ns += result.forward_ns
        self.choose(result.logits)

    def choose(self, logits: torch.Tensor) -> int:  # logits [1, vocab_size]: the step after `ids`
        """The next token (and its q), appended to `ids`."""
        sampling = self.request.sampling
        step = len(self.proposed)
        position = len(self.ids)
        # As the target's verify does.
        # A step the masks leave no token (after a guess the target will reject, or where the target will
        # refuse the request) proposes from zeros: the verdict decides (AdjustedLogits).
        logits = adjust_logits(
            logits, self.ids, (), sampling, self._penalized, self.automata, self.request.session_id
        ).logits
        if sampling.is_greedy:
            token = greedy_token_ids(logits)[0]
            if self.steer is not None:
                token = self.steer(self.ids, token)
        elif sampling.acceptance == "coupled":
            # The target needs no q under the coupled rule: it compares with its own coupled sample.
            token = coupled_sample(sampling_probs(logits, sampling)[0], sampling.seed, position)
        else:
            probs = sampling_probs(logits, sampling)[0]  # [vocab_size]
            if step == 0 and self.request.first_is_bonus_guess:
                # Not a proposal: a guess of the target's bonus draw at this position, made with the same
                # uniform (stream TARGET_SAMPLE) on q, so it lands on the same token wherever q and p
                # agree. It is only compared with the bonus token, never accepted by the rule.
                token = sample_from_probs(
                    probs, keyed_uniform(sampling.seed, position, RandomStream.TARGET_SAMPLE)
                )
            else:
                token = sample_draft_token(probs, position, sampling.seed, is_greedy=False)
            self.q_rows.append(probs)
        self.proposed.append(token)
        self.ids.append(token)
        if self._penalties is not None:
            self._penalties.append(token)
        return token

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:  # [1, vocab_size] float32, a copy
        """The step's logits with the penalties over `ids` (specpipe/sampling/penalties.py), as the target
        applies them to the same position."""
        if self._penalties is None:
            self._penalties = SequencePenalties(self.ids, logits.shape[-1], self.request.sampling)
        scores = logits.to(torch.float32).clone()
        self._penalties.apply(scores[0])
        return scores

    def proposal(self) -> DraftProposal:
        sampling = self.request.sampling
        draft_probs: list[tuple[list[int], torch.Tensor]] | None = None
        if self.q_rows:
            # Untruncated q is dense (softmax leaves no zeros worth dropping): skip the support search.
            unmasked = not sampling.masks_tokens
            if sampling.top_k == 0 and sampling.top_p >= 1.0 and sampling.min_p == 0.0 and unmasked:
                draft_probs = [([], q) for q in self.q_rows]
            else:
                draft_probs = compact_supports(torch.stack(self.q_rows))  # one search for the block
        return DraftProposal(
            token_ids=self.proposed,
            draft_probs=draft_probs,
            forward_ns=self.forward_ns,
            cached_tokens=self.cached_tokens,
        )
