"""The speculation loop: draft k tokens, verify them in one target pass, commit, stream.

Each round:
  1. the draft worker proposes k tokens (and q, unless greedy) for the committed history;
  2. the target worker scores history + block in ONE forward pass and returns how many leading draft
     tokens it accepted plus the next token (recovered after a rejection, bonus after full acceptance);
  3. the accepted tokens (truncated at EOS, a stop string, max_new_tokens or the context) are committed to
     the session store atomically (a stale version is rejected) and only then streamed to the client.
Exactness lives in the target's acceptance rule; this loop only moves tokens, so any k (including 0, plain
decoding) yields the target's own output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from coordinator.chat import ChatTemplate
from coordinator.delegation_backoff import DelegationBackoff
from coordinator.replicas import ReplicaSet
from coordinator.request import GenerationChunk, GenerationRequest, Usage
from coordinator.tokenization import check_length, encode_bad_words
from coordinator.worker_links import DraftLink, TargetLink
from specpipe.errors import FailedPreconditionError, InvalidArgumentError, SpecpipeError, UnavailableError
from specpipe.rpc.worker_clients import TargetStream, WorkerClient
from specpipe.runtime.model_runner import in_vocab
from specpipe.sampling.logprobs import TokenLogprob
from specpipe.sampling.params import MAX_BAD_WORDS, SamplingParams
from specpipe.sampling.structured_output import OutputAutomata
from specpipe.speculation.adaptive_k import CostProfile, DraftLengthPolicy
from specpipe.speculation.delegation import DelegatedRequest, DraftSchedule
from specpipe.speculation.limits import ModelLimits
from specpipe.speculation.rounds import NO_PROPOSAL, Proposal, QueuedBlock, RoundPlanner, Verification
from specpipe.store.session_store import CommittedRound, SessionStats, SessionStore
from specpipe.text.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenSession:
    session_id: str
    history: list[int]  # committed tokens plus this turn's prompt
    prompt_ids: list[int]  # this turn's prompt
    version: int | None  # None until the first commit of a new session
    is_new: bool
    persisted: bool = False
    # The history when the request began: what a new session is created with, whatever the rounds that
    # ran since (commits overlap the next round, so `history` may already be ahead).
    opening_history: list[int] = field(default_factory=list)
    # Where the output begins: the history's length after the latest prompt, for a resumed session the one
    # its interrupted request began at, so the presence and frequency penalties count the same tokens.
    output_start: int = -1
    # The latest commit's task, whichever loop started it: an ephemeral session is deleted only after it.
    commit_task: asyncio.Task[Any] | None = None

    def __post_init__(self) -> None:
        self.opening_history = list(self.history)
        if self.output_start < 0:
            self.output_start = len(self.history)

    def still_held(self, min_tokens: int) -> int:
        """How many of the request's tokens min_tokens holds back (ending tokens, stop strings): it counts the
        turn's output, a resumed request's included."""
        return min_tokens - (len(self.opening_history) - self.output_start)


class SpeculativeGenerator:
    def __init__(
        self,
        drafts: ReplicaSet,
        targets: ReplicaSet,
        store: SessionStore,
        tokenizer: PreTrainedTokenizerBase,
        limits: ModelLimits,
        worker_timeout_s: float,
        owner: str,
        max_speculative_tokens: int,
        costs: CostProfile | None,
        pipelining: bool,
        chaining: bool = True,
        delegation: bool = False,
        heuristic_start: int | None = None,
        chat_template: str = "",
    ) -> None:
        self.drafts = drafts
        self.targets = targets
        self.store = store
        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer, chat_template)  # renders GenerateRequest.messages
        self.automata = OutputAutomata(tokenizer)  # structured output's, to check a request's regex early
        self.limits = limits
        self.worker_timeout_s = worker_timeout_s
        self.owner = owner
        self.max_speculative_tokens = max_speculative_tokens
        self.costs = costs  # None = no adaptive k: requests without a k use max_speculative_tokens
        self.pipelining = pipelining
        self.chaining = chaining  # queue pipelined blocks on the target before the verdict (see draft_ahead)
        self.delegation = delegation  # run the rounds on the draft worker (_delegated_rounds)
        # Set: requests without a k follow Hugging Face's +2/-1 rule from this k instead of the costs.
        self.heuristic_start = heuristic_start
        self.delegation_backoff = DelegationBackoff()
        self._background: set[asyncio.Future[None]] = set()  # keeps fire-and-forget tasks referenced

    def check_in_vocab(self, token_ids: Collection[int], field_name: str) -> None:
        if not in_vocab(token_ids, self.limits.vocab_size):
            raise InvalidArgumentError(f"{field_name} must be in [0, {self.limits.vocab_size})")

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            self.check_in_vocab(ids, "prompt_token_ids")
            return ids
        if request.conversation is not None:
            return self.chat.token_ids(request.conversation, self.limits.target_context)
        if not request.prompt:
            return []  # a continued session without a new turn
        ids = self.encode_prompt(request.prompt)
        if not ids:
            raise InvalidArgumentError("prompt encodes to no tokens")
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt's tokens, as Generate encodes it (the HTTP API's echo with logprobs too); its length
        checked first, as the tokenizer runs on the event loop."""
        check_length(text, self.limits.target_context, "prompt")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def open_session(self, request: GenerationRequest) -> OpenSession:
        self.check_in_vocab(request.stop_token_ids, "stop_token_ids")
        biased_ids = [token_id for token_id, _ in request.sampling.logit_bias]
        self.check_in_vocab(biased_ids, "sampling.logit_bias ids")
        self.check_in_vocab(request.sampling.allowed_token_ids, "sampling.allowed_token_ids")
        bad_word_ids = [token_id for word in request.sampling.bad_words for token_id in word]
        self.check_in_vocab(bad_word_ids, "sampling.bad_words ids")
        prompt_ids = self.prompt_ids(request)
        if request.session_id:
            state = await self.store.load(request.session_id)  # NotFoundError names the id
            session = OpenSession(
                request.session_id, [*state.token_ids, *prompt_ids], prompt_ids, state.version, is_new=False
            )
            # No new prompt: continue the history as it is (resume); the first commit needs no prompt write.
            session.persisted = not prompt_ids
            if not prompt_ids:
                session.output_start = state.prompt_len
        else:
            await self.store.ping()  # fail fast (UNAVAILABLE) before any model work
            session = OpenSession(uuid.uuid4().hex, list(prompt_ids), prompt_ids, None, is_new=True)
        still_held = session.still_held(request.sampling.min_tokens)  # what is left must fit
        if still_held > request.max_new_tokens:
            raise InvalidArgumentError(
                f"sampling.min_tokens ({request.sampling.min_tokens}) leaves {still_held} tokens to "
                f"generate, more than max_new_tokens ({request.max_new_tokens})"
            )
        if len(session.history) >= self.limits.target_context:
            raise InvalidArgumentError(
                f"prompt too long: {len(session.history)} tokens (session history included) leave no room "
                f"in the target context of {self.limits.target_context} tokens"
            )
        return session

    async def commit(
        self, session: OpenSession, request: GenerationRequest, new_ids: list[int], delta: SessionStats
    ) -> None:
        session.commit_task = asyncio.current_task()
        if not session.persisted:
            # The session (or this turn's prompt) is written with the first round, in one store write, so a
            # request that fails before producing a token leaves nothing behind.
            sampling = request.sampling.to_dict()
            first_round = CommittedRound(tuple(new_ids), delta)
            if session.is_new:
                state = await self.store.create(
                    session.session_id,
                    session.opening_history,
                    len(session.opening_history),
                    sampling,
                    self.owner,
                    first_round,
                )
            else:
                assert session.version is not None
                state = await self.store.append_prompt(
                    session.session_id, session.version, session.prompt_ids, sampling, first_round
                )
            session.version = state.version
            session.persisted = True
            return
        assert session.version is not None
        session.version = await self.store.commit_round(session.session_id, session.version, new_ids, delta)

    async def generate(
        self, request: GenerationRequest, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[GenerationChunk]:
        request = await self.with_token_constraints(request)
        session = await self.open_session(request)
        if request.sampling.output_regex and session.output_start < len(session.history):
            # A resume: its committed output must fit the constraint the rounds continue under.
            output = session.history[session.output_start :]
            await asyncio.to_thread(self.automata.check_output, request.sampling.output_regex, output)
        async for chunk in self._rounds(request, session, time_remaining):
            yield chunk

    async def with_token_constraints(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its bad words in its sampling as token sequences, as the workers apply them, and
        its structured output's automaton built here first."""
        if request.bad_words:
            encoded = request.sampling.bad_words + encode_bad_words(self.tokenizer, request.bad_words)
            if len(encoded) > MAX_BAD_WORDS:
                raise InvalidArgumentError(
                    f"bad_words and sampling.bad_words come to {len(encoded)} token sequences (a word is one "
                    f"or two), more than {MAX_BAD_WORDS}"
                )
            sampling = dataclasses.replace(request.sampling, bad_words=encoded)
            request = dataclasses.replace(request, sampling=sampling)
        if request.sampling.output_regex:
            # Built here first: a regex the vocabulary cannot match is INVALID_ARGUMENT before any session
            # work (a large JSON schema's automaton takes a while: off the event loop).
            await asyncio.to_thread(self.automata.automaton, request.sampling.output_regex)
        return request

    async def _rounds(
        self, request: GenerationRequest, session: OpenSession, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[GenerationChunk]:
        limits = self.request_limits(request)
        # Every worker call carries where the output begins (the window of the presence and frequency
        # penalties and of min_tokens) and, for min_tokens, the tokens that would end this request.
        end_token_ids = tuple(sorted(limits.eos_token_ids)) if request.sampling.min_tokens else ()
        request = dataclasses.replace(
            request,
            sampling=dataclasses.replace(
                request.sampling, output_start=session.output_start, end_token_ids=end_token_ids
            ),
        )
        sampling = request.sampling
        sid = session.session_id
        # min_tokens holds back stop strings too.
        stops_from = session.still_held(sampling.min_tokens)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            stop=request.stop,
            skip_special_tokens=request.skip_special_tokens,
            stops_from_token=stops_from,
            include_stop=request.include_stop_str_in_output,
        )
        progress = RequestProgress(Usage(prompt_tokens=len(session.history)), detokenizer, limits)
        usage, generated = progress.usage, progress.generated
        policy = DraftLengthPolicy(
            request.num_speculative_tokens,
            self.costs,
            self.max_speculative_tokens,
            pipelined=self.pipelining,
            heuristic_k=self.heuristic_start,
        )
        planner: RoundPlanner[TargetStream] = self.planner(policy, progress.limits)
        # The previous round's commit and chunk: the commit overlaps this round's first worker call, and
        # the chunk is sent only once its commit succeeded.
        pending: PendingChunk | None = None
        speculative: asyncio.Future[tuple[Proposal | None, QueuedBlock[TargetStream] | None]] | None = None
        draft = DraftLink(self.drafts, sid, time_remaining, self.worker_timeout_s)
        target = TargetLink(self.targets, sid, time_remaining, self.worker_timeout_s)
        completed = False
        try:
            # No target in rotation: UNAVAILABLE before any work. The stream opens with the first verify the
            # coordinator makes itself (a delegated request may never make one).
            await target.choose()
            if request.prompt_logprobs is not None:
                progress.prompt_logprobs = await self.score_prompt(request, session, target, usage)
            if self.delegates(request):
                async for chunk in self._delegated_rounds(
                    request, session, progress, planner, draft, target, time_remaining
                ):
                    yield chunk
            while not progress.finish_reason:
                history = session.history
                remaining = request.max_new_tokens - len(generated)
                plan = planner.block(history, remaining)
                k, proposal = plan.k, plan.prepared or NO_PROPOSAL
                if k > 0 and plan.queued is None and not await draft.available():
                    k, proposal = 0, NO_PROPOSAL
                elif k > 0 and plan.prepared is None:
                    drafting = asyncio.ensure_future(draft.propose(history, k, sampling))
                    if pending is not None:
                        yield await pending.flush()
                        pending = None
                    proposal = await drafting or NO_PROPOSAL  # None: the draft failed, k = 0
                    usage.draft_forward_ns += proposal.forward_ns
                draft_ids = proposal.token_ids[:k]
                k = len(draft_ids)
                if plan.queued is not None:
                    verify = asyncio.ensure_future(
                        target.verify_chained(
                            plan.queued.handle, history, draft_ids, proposal.draft_probs, sampling
                        )
                    )
                else:
                    verify = asyncio.ensure_future(
                        target.verify(history, draft_ids, proposal.draft_probs, sampling)
                    )
                ahead = planner.ahead(len(history), draft_ids, remaining)
                if ahead > 0 and await draft.available():
                    speculative = asyncio.ensure_future(
                        self.draft_ahead(
                            planner, draft, target, verify, [*history, *draft_ids], ahead, sampling
                        )
                    )
                if pending is not None:
                    yield await pending.flush()
                    pending = None
                verdict = await verify
                guess: Proposal | None = None
                queued: QueuedBlock[TargetStream] | None = None
                if speculative is not None:
                    guess, queued = await speculative
                    speculative = None
                unwanted = planner.settle(k, verdict, guess, queued)
                if unwanted is not None:
                    target.drop_chained(unwanted.handle)
                logger.debug(
                    "round: k=%d accepted=%d alpha=%.2f", k, verdict.num_accepted, policy.acceptance.alpha
                )
                pending = self.settle(request, session, progress, draft_ids, verdict)
            if pending is not None:
                yield await pending.flush()
                pending = None
            completed = True
        finally:
            if speculative is not None:
                speculative.cancel()
            if pending is not None:
                pending.cancel()
            # A finished request keeps the workers' caches warm for the next turn; a cancelled or failed
            # one frees them at once (the workers release a session whose stream is cancelled), and so does
            # an ephemeral one, which has no next turn.
            keep = completed and not request.ephemeral
            await draft.close(keep)
            await target.close(keep)
            if not keep:
                # Explicitly too: the workers cannot always tell a cancelled stream from a finished one.
                self.in_background(self.release_worker_caches(sid, draft.used | target.used))
            if request.ephemeral and session.is_new:
                self.in_background(self.forget(sid, session.commit_task))

    def settle(
        self,
        request: GenerationRequest,
        session: OpenSession,
        progress: RequestProgress,
        draft_ids: list[int],
        verdict: Verification,
    ) -> PendingChunk:
        """A verified round's tokens (cut after EOS, a stop string, max_new_tokens or the context), the
        session's commit of them, and the chunk streamed once that commit succeeded."""
        generated, usage, detokenizer = progress.generated, progress.usage, progress.detokenizer
        history = session.history
        remaining = request.max_new_tokens - len(generated)
        new_ids, finish_reason = progress.limits.round_tokens(
            draft_ids, verdict.num_accepted, verdict.next_token_id, remaining, len(history)
        )
        # The token that ended the output (EOS, or one of stop_token_ids) is kept, but its text is not
        # shown unless include_stop_str_in_output asks for it, as vLLM's detokenizer leaves it out (with
        # skip_special_tokens off, EOS would otherwise end the text as "</s>").
        hides_end = finish_reason == "eos" and not request.include_stop_str_in_output
        text_ids = new_ids[:-1] if hides_end else new_ids
        if finish_reason == "eos" and new_ids[-1] in request.stop_token_ids:
            finish_reason = "stop"  # a stop token id: kept, and the text before it flushed, as after EOS
        if verdict.repetition_penalty != request.sampling.repetition_penalty:
            # A worker from before the penalty drops it (a draft worker on the way to the target, or the
            # target): its tokens are not the ones asked for, so none of them reach the client.
            raise FailedPreconditionError(
                "sampling.repetition_penalty was not applied by the workers (a worker older than the "
                "coordinator?)"
            )
        if request.sampling.needs_applied_echo and verdict.applied_sampling != request.sampling:
            # A worker older than a field of the sampling (min_p, the penalties, the bias) drops it: the
            # tokens come from another distribution than the one asked for, so none reach the client.
            raise FailedPreconditionError(
                "the workers did not apply the request's sampling (sampling.min_p, presence_penalty, "
                "frequency_penalty, logit_bias, min_tokens, allowed_token_ids, bad_words or output_regex): a "
                "worker older than the coordinator?"
            )
        if request.sampling.logprobs is not None and len(verdict.logprobs) < len(new_ids):
            # A worker from before log-probs drops the field it does not know: say so rather than stream
            # chunks without them.
            raise FailedPreconditionError(
                "sampling.logprobs was asked for but the workers returned none (a worker older than the "
                "coordinator?)"
            )
        first_chunk = not generated
        text = detokenizer.push(text_ids)
        if detokenizer.stopped:
            # Keep the tokens up to the one that completed the stop string.
            new_ids = new_ids[: detokenizer.stop_token_index - len(generated)]
            finish_reason = "stop"
        if finish_reason and not detokenizer.stopped:  # a stop string cuts the text; anything else flushes it
            text += detokenizer.finish()
            if detokenizer.stopped:
                # The flush completed a stop string (its end was an incomplete character until then): the
                # tokens end with it too, as for one found by push.
                new_ids = new_ids[: detokenizer.stop_token_index - len(generated)]
                finish_reason = "stop"

        delta = SessionStats(
            generated_tokens=len(new_ids),
            draft_tokens=len(draft_ids),
            accepted_tokens=verdict.num_accepted,
            target_passes=1,
            rounds=1,
        )
        commit = self.commit(session, request, new_ids, delta)
        session.history = [*history, *new_ids]
        generated.extend(new_ids)
        usage.generated_tokens = len(generated)
        usage.draft_tokens += len(draft_ids)
        usage.accepted_tokens += verdict.num_accepted
        usage.target_passes += 1
        usage.target_forward_ns += verdict.forward_ns
        progress.finish_reason = finish_reason
        stop_reason: str | int | None = None
        if detokenizer.stopped:
            stop_reason = detokenizer.stop_string
        elif finish_reason == "stop":  # (a stop token id: a stop string would have stopped the text)
            stop_reason = new_ids[-1]
        chunk = GenerationChunk(
            session.session_id,
            new_ids,
            text,
            finish_reason,
            usage if finish_reason else None,
            verdict.logprobs[: len(new_ids)],
            progress.prompt_logprobs if first_chunk else (),
            stop_reason=stop_reason,
        )
        return PendingChunk(commit, chunk)

    async def score_prompt(
        self, request: GenerationRequest, session: OpenSession, target: TargetLink, usage: Usage
    ) -> tuple[TokenLogprob, ...]:
        """This turn's prompt tokens' log-probs, each given the history before it: a continued session's first
        prompt token has one, a new session's first token none. The target keeps the prompt in the session's
        cache, so the first verify does not compute it again."""
        assert request.prompt_logprobs is not None
        history = session.opening_history
        first_position = max(1, len(history) - len(session.prompt_ids))
        if first_position >= len(history):
            return ()  # no prompt this turn (a resumed session), or a one-token new session
        scores = await target.score_prompt(history, first_position, request.prompt_logprobs)
        usage.target_forward_ns += scores.forward_ns
        return scores.logprobs

    def planner(
        self, policy: DraftLengthPolicy, limits: ModelLimits | None = None
    ) -> RoundPlanner[TargetStream]:
        return RoundPlanner(policy, limits or self.limits, self.costs, self.pipelining, self.chaining)

    def request_limits(self, request: GenerationRequest) -> ModelLimits:
        """The pair's limits as a request sees them: its stop token ids end it as end-of-sequence tokens do,
        and the model's end-of-sequence tokens do not when it ignores them (the rounds then stop at
        max_new_tokens, a stop string or the context, wherever they run)."""
        if not request.ignore_eos and not request.stop_token_ids:
            return self.limits
        eos = frozenset() if request.ignore_eos else self.limits.eos_token_ids
        return dataclasses.replace(self.limits, eos_token_ids=eos | request.stop_token_ids)

    def delegates(self, request: GenerationRequest) -> bool:
        """Whether the request's rounds run on the draft worker (one that never drafts would gain nothing)."""
        return self.delegation and request.num_speculative_tokens != 0 and self.max_speculative_tokens > 0

    async def _delegated_rounds(
        self,
        request: GenerationRequest,
        session: OpenSession,
        progress: RequestProgress,
        planner: RoundPlanner[TargetStream],
        draft: DraftLink,
        target: TargetLink,
        time_remaining: Callable[[], float | None],
    ) -> AsyncIterator[GenerationChunk]:
        """Runs the request's rounds on a draft replica (specpipe/speculation/delegation.py), which sends its
        blocks straight to the session's target replica; each round is settled (committed, then streamed)
        here as it arrives. If the call fails, the caller's loop continues from the committed rounds: the
        policy has recorded each of them, so the rounds that follow are the ones the draft would have run."""
        assert target.replica is not None
        try:
            replica = await self.drafts.pick_or_recheck(session.session_id)
        except SpecpipeError:
            return  # no draft replica: the caller's loop decodes plainly and retries drafts
        if not self.delegation_backoff.allowed(replica.address, target.replica.address):
            return  # this pair's last delegated call failed at once: the coordinator runs the rounds
        draft.used.add(replica.client)
        delegated = DelegatedRequest(
            session_id=session.session_id,
            token_ids=tuple(session.history),
            max_new_tokens=request.max_new_tokens - len(progress.generated),
            sampling=request.sampling,
            target_address=target.replica.address,
            schedule=DraftSchedule.of(planner.policy, self.chaining),
            limits=progress.limits,
            worker_timeout_s=self.worker_timeout_s,
        )
        with self.drafts.lease(replica):
            call = replica.client.speculate(delegated, time_remaining())
            received = 0
            try:
                while not progress.finish_reason:
                    try:
                        speculation_round = await call.next_round(draft.call_timeout())
                        if speculation_round is None:
                            raise UnavailableError("the delegated call ended before the request finished")
                    except SpecpipeError as exc:
                        remaining = time_remaining()
                        if remaining is not None and remaining <= 0:
                            raise
                        if received == 0 and not isinstance(exc, InvalidArgumentError):
                            # (INVALID_ARGUMENT is most likely the request's own: say, masks that leave no
                            # token. The rounds here meet it again, and the pair stays delegating.)
                            self.delegation_backoff.failed(replica.address, target.replica.address)
                        logger.warning(
                            "session %s: delegated rounds on draft %s failed after %d tokens, "
                            "continuing here: %s",
                            session.session_id, replica.address, len(progress.generated), exc,
                        )  # fmt: skip
                        return
                    received += 1
                    draft_ids = list(speculation_round.draft_token_ids)
                    verdict = Verification(
                        speculation_round.num_accepted,
                        speculation_round.next_token_id,
                        speculation_round.target_forward_ns,
                        tuple(speculation_round.logprobs),  # the round's tokens': a prefix of the verdict's
                        speculation_round.repetition_penalty,
                        speculation_round.applied_sampling,
                    )
                    try:
                        pending = self.settle(request, session, progress, draft_ids, verdict)
                    except FailedPreconditionError as exc:
                        if received > 1:
                            raise
                        # The draft worker predates a field of the request (a rolling upgrade) and dropped it
                        # on the way to the target: nothing was committed, and the coordinator's own rounds,
                        # whose requests to the target carry every field, can serve it.
                        self.delegation_backoff.failed(replica.address, target.replica.address)
                        logger.warning(
                            "session %s: delegated rounds on draft %s refused, continuing here: %s",
                            session.session_id, replica.address, exc,
                        )  # fmt: skip
                        return
                    planner.policy.record(len(draft_ids), verdict.num_accepted)
                    progress.usage.draft_forward_ns += speculation_round.draft_forward_ns
                    # Only the delegated call's failures are continued here: a failed commit fails the request
                    # as in the coordinator's own loop (the session's state must not run ahead of the store).
                    yield await pending.flush()
            finally:
                call.cancel()  # stops the draft's rounds (a stop string, a failure, the client left)

    async def draft_ahead(
        self,
        planner: RoundPlanner[TargetStream],
        draft: DraftLink,
        target: TargetLink,
        verify: asyncio.Future[Any],
        assumed_history: list[int],
        num_tokens: int,
        sampling: SamplingParams,
    ) -> tuple[Proposal | None, QueuedBlock[TargetStream] | None]:
        """Drafts a bonus guess and the next block of num_tokens for history + the block being verified,
        and queues that block on the target behind the verify when chaining is on and the verdict has not
        come yet (target_service/chain.py): if the guess holds, the target verifies it without waiting."""
        guess = await draft.propose(assumed_history, num_tokens + 1, sampling, first_is_bonus_guess=True)
        if guess is None or not planner.worth_queueing(guess, verify.done()):
            return guess, None
        history = [*assumed_history, guess.token_ids[0]]
        block = guess.after_guess()
        stream = await target.send_chained(history, block.token_ids, block.draft_probs, sampling)
        return guess, None if stream is None else QueuedBlock(history, stream)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs `work` after the request, kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def forget(self, session_id: str, last_commit: asyncio.Task[Any] | None) -> None:
        """Deletes an ephemeral request's session from the store, once its latest commit (cancelled in flight,
        perhaps, by either loop) has ended; a write Redis already received may still land after, and the
        session then ages out with its TTL."""
        if last_commit is not None and not last_commit.done():
            await asyncio.wait([last_commit])
        try:
            await self.store.delete(session_id)
        except SpecpipeError as exc:
            logger.warning("could not delete ephemeral session %s: %s", session_id, exc)

    async def settle_background(self, timeout_s: float) -> None:
        """Waits (at shutdown) for the work requests left behind: cache releases, ephemeral sessions'
        deletions."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)

    async def release_worker_caches(self, session_id: str, workers: set[WorkerClient]) -> None:
        for worker in workers:
            try:
                await worker.release_session(session_id, timeout_s=2.0)
            except SpecpipeError as exc:
                logger.debug("could not free %s's cache for %s: %s", worker.role, session_id, exc)


@dataclass(slots=True)
class RequestProgress:
    """What a request has produced so far, whichever loop runs its rounds."""

    usage: Usage
    detokenizer: IncrementalDetokenizer
    limits: ModelLimits  # the pair's limits as this request sees them (SpeculativeGenerator.request_limits)
    generated: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # where the request asks: sent with the first chunk


@dataclass(slots=True)
class PendingChunk:
    """A round's chunk and its session commit, which must succeed before the chunk reaches the client.

    The commit starts only in `flush`, which the loop calls right after it has started the next round's
    first worker call: tasks start in creation order, so that call, which is on the critical path, goes out
    before the commit's store round trip, which overlaps the worker's forward.
    """

    commit: Coroutine[Any, Any, None]
    chunk: GenerationChunk
    task: asyncio.Future[None] | None = None

    async def flush(self) -> GenerationChunk:
        if self.task is None:
            self.task = asyncio.ensure_future(self.commit)
        await self.task
        return self.chunk

    def cancel(self) -> None:
        if self.task is None:
            self.commit.close()  # never started: nothing was written
        else:
            self.task.cancel()
