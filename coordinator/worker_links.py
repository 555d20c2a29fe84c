"""A request's links to its draft and target replicas, which may fail and be replaced mid-request.

Each link holds one bidirectional stream to the replica routing chose for the session. A stream to a new
replica starts from the whole history, so the new replica rebuilds the session's KV cache from the committed
tokens and answers exactly what the failed one would have: the verify and propose results depend only on
the history, the block and the request's seed, never on which replica computed them.

- Target: a failed verify (UNAVAILABLE, or no answer within the worker timeout while the request still has
  time) takes the replica out of rotation and repeats the same verify on another replica. Only when no
  healthy target is left does the request fail with UNAVAILABLE; the client resumes the session later.
- Chained blocks (target_service/chain.py) are an optimisation on one stream: a chained block whose
  stream failed, or which the target skipped, is verified again as an ordinary request.
- Draft: a failed propose moves to another draft replica and repeats the same propose there, so the block
  boundaries (and with them seeded sampled tokens) are unchanged. With no draft replica left, the request
  goes on with plain target decoding (k = 0) and tries again every `retry_s`; greedy output never depends
  on the draft.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from coordinator.replicas import Replica, ReplicaSet
from specpipe.errors import DeadlineExceededError, UnavailableError
from specpipe.rpc.worker_clients import (
    DraftStream,
    Proposal,
    TargetClient,
    TargetStream,
    Verification,
    WorkerClient,
    WorkerStream,
    call_timeout,
)
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.prompt_scores import PromptScores, PromptScoring
from specpipe.v1 import common_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Replicas one call tries before giving up (each failed one leaves rotation, so a retry never repeats one).
MAX_ATTEMPTS = 3


class WorkerLink:
    def __init__(
        self,
        replicas: ReplicaSet,
        session_id: str,
        time_remaining: Callable[[], float | None],  # the request's deadline (None: no deadline)
        worker_timeout_s: float,  # upper bound on one worker call
    ) -> None:
        self.replicas = replicas
        self.session_id = session_id
        self.time_remaining = time_remaining
        self.worker_timeout_s = worker_timeout_s
        self.stream_timeout_s = time_remaining()  # a stream lives as long as the request may
        self.replica: Replica | None = None
        self.stream: WorkerStream | None = None
        self.used: set[WorkerClient] = set()  # every replica this request touched (to free its caches)
        self._lease = contextlib.ExitStack()

    def call_timeout(self) -> float:
        """Seconds one worker call may take (specpipe/rpc/worker_clients.py: call_timeout)."""
        return call_timeout(self.worker_timeout_s, self.time_remaining())

    def replica_failed(self, exc: Exception) -> bool:
        """Whether an error blames the replica (rather than the request's own deadline)."""
        if isinstance(exc, UnavailableError):
            return True
        remaining = self.time_remaining()
        return isinstance(exc, DeadlineExceededError) and (remaining is None or remaining > 0.05)

    async def choose(self) -> Replica:
        """The session's replica, leased for this request; UnavailableError when none is in rotation."""
        if self.replica is None:
            replica = await self.replicas.pick_or_recheck(self.session_id)
            self._lease.enter_context(self.replicas.lease(replica))
            self.replica = replica
            self.used.add(replica.client)
        return self.replica

    async def connect(self) -> None:
        """Opens a stream to the session's replica (chosen now if not yet)."""
        replica = await self.choose()
        self.stream = replica.client.open_stream(self.stream_timeout_s)

    def disconnect(self, completed: bool) -> None:
        """Ends the stream: a finished one keeps the replica's cache warm, a failed one frees it."""
        if self.stream is not None and not completed:
            self.stream.cancel()
        self.stream = None
        self.replica = None
        self._lease.close()
        self._lease = contextlib.ExitStack()

    def fail_over(self, exc: Exception) -> None:
        """Takes the current replica out of rotation and drops its stream."""
        assert self.replica is not None
        self.replicas.mark_down(self.replica, exc)
        self.disconnect(completed=False)

    async def close(self, completed: bool) -> None:
        if self.stream is not None and completed:
            await self.stream.finish()
        self.disconnect(completed)


class TargetLink(WorkerLink):
    async def connect(self) -> None:
        """Opens a session stream to the session's target: a direct stream where the target serves them
        (specpipe/rpc/direct_frames.py), else gRPC's VerifyStream."""
        replica = await self.choose()
        assert isinstance(replica.client, TargetClient)
        self.stream = await replica.client.connect_stream(self.call_timeout())

    async def verify(
        self,
        history: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
    ) -> Verification:
        async def verify_once() -> Verification:
            if self.stream is None:
                await self.connect()  # UnavailableError: no healthy target left, or this one is down
            assert isinstance(self.stream, TargetStream)
            return await self.stream.verify(
                self.session_id, history, draft_token_ids, draft_probs, sampling, self.call_timeout()
            )

        return await self._on_replicas(verify_once, self.replica_failed)

    async def _on_replicas(
        self, call: Callable[[], Awaitable[T]], blames_replica: Callable[[Exception], bool]
    ) -> T:
        """call() on the session's replica, then on another one each time it fails in a way that
        blames_replica, up to MAX_ATTEMPTS replicas."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await call()
            except (UnavailableError, DeadlineExceededError) as exc:
                if self.replica is None or not blames_replica(exc) or attempt == MAX_ATTEMPTS - 1:
                    raise  # no replica was chosen (none in rotation), the request's own deadline, or the last
                self._move_to_another_replica(exc)
        raise AssertionError("unreachable")

    def _move_to_another_replica(self, exc: Exception) -> None:
        assert self.replica is not None
        failed = self.replica.address
        self.fail_over(exc)
        logger.warning("session %s: target %s failed, continuing on another replica: %s",
                       self.session_id, failed, exc)  # fmt: skip

    async def score_prompt(
        self, history: Sequence[int], first_position: int, top_logprobs: int
    ) -> PromptScores:
        """The log-probabilities of history[first_position:] (target_service/prompt_scoring.py), scored on the
        session's replica, whose cache then holds the history for the first verify; on another replica if
        that one is unreachable. A scoring that runs out of time is not blamed on the replica, unlike a
        verify: a long prompt may take longer than one worker timeout on a healthy target, and blaming it
        would take healthy replicas out of rotation one after another."""
        scoring = PromptScoring(self.session_id, tuple(history), first_position, top_logprobs)

        async def score_once() -> PromptScores:
            replica = await self.choose()
            assert isinstance(replica.client, TargetClient)
            return await replica.client.score_prompt(scoring, self.call_timeout())

        return await self._on_replicas(score_once, lambda exc: isinstance(exc, UnavailableError))

    async def send_chained(
        self,
        history: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
    ) -> TargetStream | None:
        """Queues a chained block (target_service/chain.py) behind the verify in flight; returns the stream
        its verdict will come on, or None if it could not be sent (then it is verified the ordinary way)."""
        stream = self.stream
        # Only directly behind the one verify in flight (not, after a fail-over, ahead of its repetition).
        if (
            not isinstance(stream, TargetStream)
            or stream.broken
            or stream.awaited != stream.unwanted_replies + 1
        ):
            return None
        try:
            await stream.send(self.session_id, history, draft_token_ids, draft_probs, sampling, chained=True)
        except (UnavailableError, DeadlineExceededError):
            return None  # the stream is broken now: the verify in flight fails over
        return stream

    async def verify_chained(
        self,
        chained_on: TargetStream,
        history: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
    ) -> Verification:
        """The verdict of a block sent with send_chained. If that stream is gone (a fail-over) or skipped the
        block, it is verified now as an ordinary request: the same history and block give the same verdict."""
        if chained_on is self.stream and not chained_on.broken:
            try:
                verdict = await chained_on.receive(self.call_timeout())
            except (UnavailableError, DeadlineExceededError) as exc:
                if not self.replica_failed(exc):
                    raise
                self._move_to_another_replica(exc)
            else:
                if verdict is not None:
                    return verdict
                logger.debug("session %s: the target skipped a chained block", self.session_id)
        return await self.verify(history, draft_token_ids, draft_probs, sampling)

    def drop_chained(self, chained_on: TargetStream) -> None:
        """The chained block's assumption failed: its (skip) reply is read and dropped before the next."""
        if chained_on is self.stream:
            chained_on.unwanted_replies += 1


class DraftLink(WorkerLink):
    def __init__(
        self,
        replicas: ReplicaSet,
        session_id: str,
        time_remaining: Callable[[], float | None],
        worker_timeout_s: float,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__(replicas, session_id, time_remaining, worker_timeout_s)
        self.retry_s = retry_s
        self.retry_at = 0.0

    async def available(self) -> bool:
        if self.stream is None and time.monotonic() >= self.retry_at:
            try:
                await self.connect()
            except UnavailableError:
                self.retry_at = time.monotonic() + self.retry_s
        return self.stream is not None

    async def propose(
        self,
        history: Sequence[int],
        k: int,
        sampling: SamplingParams,
        first_is_bonus_guess: bool = False,
    ) -> Proposal | None:
        """The proposal, or None when no draft replica could make it (the caller decodes without it)."""
        for _ in range(MAX_ATTEMPTS):
            if not await self.available():
                return None
            assert isinstance(self.stream, DraftStream) and self.replica is not None
            try:
                return await self.stream.propose(
                    self.session_id, history, k, sampling, self.call_timeout(), first_is_bonus_guess
                )
            except (UnavailableError, DeadlineExceededError) as exc:
                if not self.replica_failed(exc):
                    # The request's own deadline: the replica is fine, but this stream's state is unknown.
                    self.disconnect(completed=False)
                    self.retry_at = time.monotonic() + self.retry_s
                    return None
                logger.warning("session %s: draft %s failed: %s", self.session_id, self.replica.address, exc)
                self.fail_over(exc)
        logger.warning("session %s: no draft replica answered, continuing with plain target decoding",
                       self.session_id)  # fmt: skip
        return None
