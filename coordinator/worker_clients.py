"""Clients for the draft and target workers; gRPC failures become domain errors naming the worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from specpipe import errors
from specpipe.rpc.server import server_options
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.sampling.params import SamplingParams
from specpipe.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.SpecpipeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
}


@dataclass(frozen=True, slots=True)
class Proposal:
    token_ids: list[int]
    draft_probs: Sequence[common_pb2.TokenDistribution]  # forwarded to the target as they came
    forward_ns: int


@dataclass(frozen=True, slots=True)
class Verification:
    num_accepted: int
    next_token_id: int
    forward_ns: int


class WorkerClient:
    role = "worker"

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=server_options())

    def _error(self, exc: grpc.aio.AioRpcError) -> errors.SpecpipeError:
        error_type = ERROR_BY_STATUS.get(exc.code(), errors.UnavailableError)
        return error_type(f"{self.role} worker at {self.address}: {exc.code().name}: {exc.details()}")

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

    async def close(self) -> None:
        await self.channel.close()


class DraftClient(WorkerClient):
    role = "draft"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)

    async def propose(
        self,
        session_id: str,
        token_ids: Sequence[int],
        num_tokens: int,
        sampling: SamplingParams,
        timeout_s: float,
    ) -> Proposal:
        request = draft_pb2.ProposeRequest(
            session_id=session_id, token_ids=token_ids, num_tokens=num_tokens, sampling=sampling.to_pb()
        )
        try:
            reply = await self.stub.Propose(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return Proposal(list(reply.token_ids), reply.draft_probs, reply.forward_ns)


class TargetClient(WorkerClient):
    role = "target"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.stub = target_pb2_grpc.TargetServiceStub(self.channel)

    async def verify(
        self,
        session_id: str,
        token_ids: Sequence[int],
        draft_token_ids: Sequence[int],
        draft_probs: Sequence[common_pb2.TokenDistribution],
        sampling: SamplingParams,
        timeout_s: float,
    ) -> Verification:
        request = target_pb2.VerifyRequest(
            session_id=session_id,
            token_ids=token_ids,
            draft_token_ids=draft_token_ids,
            draft_probs=draft_probs,
            sampling=sampling.to_pb(),
        )
        try:
            reply = await self.stub.Verify(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return Verification(reply.num_accepted, reply.next_token_id, reply.forward_ns)
