"""Clients for the draft and target workers; gRPC failures become domain errors naming the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from specpipe import errors
from specpipe.rpc.direct_call import DirectStreamCall, split_address
from specpipe.rpc.server import server_options
from specpipe.runtime.kv_cache import common_prefix_length
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.delegation import DelegatedRequest, SpeculationRound
from specpipe.speculation.prompt_scores import PromptScores, PromptScoring
from specpipe.speculation.rounds import Proposal, Verification, read_report
from specpipe.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

logger = logging.getLogger(__name__)

# A direct-stream listener on the target's host answers a connection at once, or not at all (a firewall).
DIRECT_CONNECT_TIMEOUT_S = 2.0

ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.SpecpipeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
}


def call_timeout(worker_timeout_s: float, remaining_s: float | None) -> float:
    """Seconds one worker call may take: the worker timeout, or the time left to the request (None: no
    deadline) if less; DeadlineExceededError once that has run out."""
    if remaining_s is None:
        return worker_timeout_s
    if remaining_s <= 0:
        raise errors.DeadlineExceededError("the request deadline passed")
    return min(worker_timeout_s, remaining_s)


async def read_within(call: Any, timeout_s: float) -> Any:
    """The stream's next message, or TimeoutError after timeout_s. asyncio.timeout (3.11+) bounds the read
    without wrapping it in a task as wait_for does, which costs tens of microseconds per round."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await call.read()
    return await asyncio.wait_for(call.read(), timeout_s)


class WorkerStream:
    """One session's bidirectional stream to a worker, answering requests in order.

    It mirrors the history the worker holds for this stream, so each request carries only the tokens the
    worker has not seen (from the first position where the new history differs). After any failure the
    stream is unusable: the caller opens a new one, which starts from the whole history again.
    """

    def __init__(self, client: WorkerClient, call: Any) -> None:
        self.client = client
        self.call = call
        self.sent: list[int] = []
        self.broken = False
        self.awaited = 0  # requests written whose replies are not read yet
        # Writes go out one at a time, in the order their deltas were taken (a chained request may be
        # written while an earlier request still waits for its reply).
        self._writing = asyncio.Lock()

    def delta(self, history: Sequence[int]) -> tuple[int, Sequence[int]]:
        start = common_prefix_length(self.sent, history)
        self.sent = list(history)
        return start, history[start:]

    def _unavailable(self, what: str) -> errors.UnavailableError:
        return errors.UnavailableError(f"{self.client.role} worker at {self.client.address}: {what}")

    async def write(self, build: Callable[[int, Sequence[int]], Any], history: Sequence[int]) -> None:
        """Sends build(start_position, new_token_ids) for `history`."""
        async with self._writing:
            self._check()
            request = build(*self.delta(history))
            with self._breaks_on_failure():
                try:
                    await self.call.write(request)
                    self.awaited += 1
                except grpc.aio.AioRpcError as exc:
                    raise self.client._error(exc) from exc
                except asyncio.InvalidStateError as exc:  # writing to a stream whose RPC already ended
                    raise self.client.error_for(await self.call.code(), await self.call.details()) from exc

    async def read(self, timeout_s: float) -> Any:
        """The next reply, in request order."""
        self._check()
        with self._breaks_on_failure():
            try:
                reply = await read_within(self.call, timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise self.client._error(exc) from exc
            except asyncio.TimeoutError as exc:
                raise errors.DeadlineExceededError(
                    f"{self.client.role} worker at {self.client.address} did not answer within "
                    f"{timeout_s:.1f}s"
                ) from exc
            if reply is grpc.aio.EOF:
                raise self._unavailable("closed the stream")
        self.awaited -= 1
        return reply

    def _check(self) -> None:
        if self.broken:
            raise self._unavailable("stream failed")

    @contextlib.contextmanager
    def _breaks_on_failure(self) -> Iterator[None]:
        """Any failure of a write or read, or being cancelled half way, breaks the stream: what the worker
        holds is unknown then."""
        try:
            yield
        except BaseException:
            self.broken = True
            raise

    async def finish(self) -> None:
        """Ends the stream normally: the worker keeps the session's cache warm for a next turn."""
        if not self.broken:
            try:
                await self.call.done_writing()
            except grpc.aio.AioRpcError:
                pass

    def cancel(self) -> None:
        """Aborts the stream: the worker frees the session's cache at once."""
        self.call.cancel()


class DraftStream(WorkerStream):
    async def propose(
        self,
        session_id: str,
        history: Sequence[int],
        num_tokens: int,
        sampling: SamplingParams,
        timeout_s: float,
        first_is_bonus_guess: bool = False,
    ) -> Proposal:
        def build(start: int, new_ids: Sequence[int]) -> draft_pb2.ProposeRequest:
            return draft_pb2.ProposeRequest(
                session_id=session_id,
                token_ids=new_ids,
                num_tokens=num_tokens,
                sampling=sampling.to_pb(),
                start_position=start,
                first_is_bonus_guess=first_is_bonus_guess,
            )

        await self.write(build, history)
        reply = await self.read(timeout_s)
        return Proposal(list(reply.token_ids), reply.draft_probs, reply.forward_ns)


class TargetStream(WorkerStream):
    def __init__(self, client: WorkerClient, call: Any) -> None:
        super().__init__(client, call)
        # Replies to chained requests nobody waits for any more (their assumption failed): read and dropped
        # before the next reply.
        self.unwanted_replies = 0

    async def send(
        self,
        session_id: str,
        history: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
        chained: bool = False,
    ) -> None:
        def build(start: int, new_ids: Sequence[int]) -> target_pb2.VerifyRequest:
            return target_pb2.VerifyRequest(
                session_id=session_id,
                token_ids=new_ids,
                draft_token_ids=draft_token_ids,
                draft_probs=draft_probs,
                sampling=sampling.to_pb(),
                start_position=start,
                chained=chained,
            )

        await self.write(build, history)

    async def receive(self, timeout_s: float) -> Verification | None:
        """The next verdict; None when its (chained) request was skipped."""
        while self.unwanted_replies:
            await self.read(timeout_s)
            self.unwanted_replies -= 1
        reply = await self.read(timeout_s)
        if reply.skipped:
            return None
        return Verification(reply.num_accepted, reply.next_token_id, reply.forward_ns, *read_report(reply))

    async def verify(
        self,
        session_id: str,
        history: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
        timeout_s: float,
    ) -> Verification:
        await self.send(session_id, history, draft_token_ids, draft_probs, sampling)
        return await self.receive_verdict(timeout_s)

    async def receive_verdict(self, timeout_s: float) -> Verification:
        """The verdict of a request that was not chained (the target never skips one)."""
        verdict = await self.receive(timeout_s)
        if verdict is None:
            raise self._unavailable("skipped a request that was not chained")
        return verdict


class WorkerClient:
    role = "worker"

    def __init__(self, address: str) -> None:
        self.address = address
        # Reconnect quickly after a worker restarts (gRPC's default backoff grows to two minutes).
        options = [
            *server_options(),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = grpc.aio.insecure_channel(address, options=options)

    def _error(self, exc: grpc.aio.AioRpcError) -> errors.SpecpipeError:
        return self.error_for(exc.code(), exc.details())

    def error_for(self, code: grpc.StatusCode, details: str | None) -> errors.SpecpipeError:
        error_type = ERROR_BY_STATUS.get(code, errors.UnavailableError)
        return error_type(f"{self.role} worker at {self.address}: {code.name}: {details}")

    async def model_info(self, include_tokenizer_files: bool, timeout_s: float) -> WorkerModelInfo:
        request = common_pb2.GetModelInfoRequest(include_tokenizer_files=include_tokenizer_files)
        try:
            reply = await self.stub.GetModelInfo(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return WorkerModelInfo.from_pb(reply)

    async def release_session(self, session_id: str, timeout_s: float) -> bool:
        try:
            reply = await self.stub.ReleaseSession(
                common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return reply.released

    async def stats(self, session_id: str = "", timeout_s: float = 5.0) -> common_pb2.WorkerStats:
        try:
            return await self.stub.GetStats(
                common_pb2.GetStatsRequest(session_id=session_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def close(self) -> None:
        await self.channel.close()


class DraftClient(WorkerClient):
    role = "draft"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)

    def open_stream(self, timeout_s: float | None) -> DraftStream:
        return DraftStream(self, self.stub.ProposeStream(timeout=timeout_s))

    def speculate(self, request: DelegatedRequest, timeout_s: float | None) -> DelegatedCall:
        """Starts a delegated request (DraftService.Speculate) on this draft worker."""
        return DelegatedCall(self, self.stub.Speculate(request.to_pb(), timeout=timeout_s))


class DelegatedCall:
    """The rounds of a request the draft worker runs (specpipe/speculation/delegation.py)."""

    def __init__(self, client: DraftClient, call: Any) -> None:
        self.client = client
        self.call = call

    async def next_round(self, timeout_s: float) -> SpeculationRound | None:
        """The next verified round; None once the call ended normally (after the finishing round)."""
        try:
            reply = await read_within(self.call, timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self.client._error(exc) from exc
        except asyncio.TimeoutError as exc:
            raise errors.DeadlineExceededError(
                f"draft worker at {self.client.address} sent no round within {timeout_s:.1f}s"
            ) from exc
        if reply is grpc.aio.EOF:
            return None
        return SpeculationRound.from_pb(reply)

    def cancel(self) -> None:
        self.call.cancel()


class TargetClient(WorkerClient):
    role = "target"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.stub = target_pb2_grpc.TargetServiceStub(self.channel)
        # The target's direct-stream port: None until asked (GetModelInfo), 0 = it has none.
        self._direct_port: int | None = None
        self._direct_closing: set[asyncio.Task[None]] = set()  # direct streams ending after END

    def open_stream(self, timeout_s: float | None) -> TargetStream:
        return TargetStream(self, self.stub.VerifyStream(timeout=timeout_s))

    async def score_prompt(self, scoring: PromptScoring, timeout_s: float) -> PromptScores:
        try:
            reply = await self.stub.ScorePrompt(scoring.to_pb(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A target older than the RPC: healthy (not to be taken out of rotation), but it cannot serve
                # this request as asked.
                raise errors.FailedPreconditionError(
                    f"target worker at {self.address} cannot score prompts (prompt_logprobs): "
                    "a worker older than the coordinator?"
                ) from exc
            raise self._error(exc) from exc
        return PromptScores.from_pb(reply)

    async def connect_stream(self, timeout_s: float) -> TargetStream:
        """A session stream over the target's direct-stream listener where it has one (fewer thread
        hand-offs per message than gRPC, specpipe/rpc/direct_frames.py), else over VerifyStream. A listener
        that does not take the connection is logged and skipped: the stream goes over gRPC, and the next one
        asks the target again (it may have restarted on another port)."""
        if self._direct_port is None:
            self._direct_port = (await self.model_info(False, timeout_s)).direct_stream_port
        if self._direct_port:
            host, _ = split_address(self.address)
            call = DirectStreamCall(
                host, self._direct_port, target_pb2.VerifyResponse.FromString, self._direct_closing
            )
            try:
                await call.connect(min(timeout_s, DIRECT_CONNECT_TIMEOUT_S))
                return TargetStream(self, call)
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning(
                    "target at %s: direct stream port %d refused (%s); using gRPC",
                    self.address, self._direct_port, exc or type(exc).__name__,
                )  # fmt: skip
                self._direct_port = None
        return self.open_stream(timeout_s)

    async def close(self) -> None:
        for task in self._direct_closing:
            task.cancel()
        await super().close()
