"""TargetService RPCs: decode protobuf, call the verifier on the model thread, encode the reply."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from specpipe.rpc.session_batcher import SessionBatcher
from specpipe.rpc.worker_servicer import WorkerServicerBase
from specpipe.runtime.stream_history import StreamHistory
from specpipe.speculation.prompt_scores import PromptScoring
from specpipe.v1 import common_pb2, target_pb2, target_pb2_grpc
from target_service.batching import verify_batch
from target_service.chain import ChainCounters, OpenChains, VerifyChain
from target_service.prompt_scoring import merge_scores, score_chunk, scoring_chunks, validate_scoring
from target_service.verifier import Verdict, Verifier, VerifyBlock


class TargetServicer(WorkerServicerBase[Verifier], target_pb2_grpc.TargetServiceServicer):
    def __init__(
        self, model_thread: ThreadPoolExecutor, max_batch_sessions: int = 1, max_batch_tokens: int = 512
    ) -> None:
        super().__init__(model_thread)
        self.chain_counters = ChainCounters()
        self.open_chains = OpenChains()
        # Cross-session batching, where asked for (specpipe/rpc/session_batcher.py, batching.py).
        self.batcher: SessionBatcher[tuple[VerifyChain, VerifyBlock], Verdict] | None = None
        if max_batch_sessions > 1:
            self.batcher = SessionBatcher(
                self.submit,
                lambda calls: verify_batch(self.engine, calls),
                max_batch_sessions,
                max_batch_tokens,
            )
        # Streams served without gRPC (specpipe/rpc/direct_server.py), where the worker has that listener.
        self.direct_streams: Callable[[], int] = lambda: 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the batcher's, for a direct stream's thread

    async def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        block = VerifyBlock.from_pb(request)
        await self.prepare(block)
        verdict = await self.on_model_thread(self.engine.verify, block)
        return verdict.to_pb()

    async def ScorePrompt(
        self, request: target_pb2.ScorePromptRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.ScorePromptResponse:
        scoring = PromptScoring.from_pb(request)
        runner = self.engine.runner
        validate_scoring(runner, scoring)
        # A job per chunk: other sessions' verifies run between them (target_service/prompt_scoring.py).
        parts = [
            await self.on_model_thread(score_chunk, runner, scoring, start, end)
            for start, end in scoring_chunks(scoring)
        ]
        return merge_scores(parts).to_pb()

    async def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        chain = VerifyChain(self.engine, self.chain_counters, self.open_chains)
        run = None
        if self.batcher is not None:
            batcher = self.batcher

            async def run(block: VerifyBlock, new_tokens: int) -> Verdict:
                if self.batching_now():
                    return await batcher.run(block.session_id, new_tokens, (chain, block))
                return await self.run_model(chain.verify, block, new_tokens)

        replies = self.serve_stream(request_iterator, VerifyBlock.from_pb, chain.verify, context, run)
        try:
            async with contextlib.aclosing(replies):
                async for reply in replies:
                    yield reply
        finally:
            with contextlib.suppress(RuntimeError):  # the model thread is gone at shutdown: nothing to forget
                self.submit(self.end_chain, chain)

    def verify_stream_blocking(
        self, requests: Iterator[target_pb2.VerifyRequest]
    ) -> Iterator[target_pb2.VerifyResponse]:
        """VerifyStream for a direct stream, on the connection's own thread (specpipe/rpc/direct_server.py):
        the same chain, history and cache rules, with each block verified on this thread under the model
        lock, or through the event loop's batcher while batching."""
        chain = VerifyChain(self.engine, self.chain_counters, self.open_chains)  # UNAVAILABLE while loading
        history = StreamHistory()
        session_id = ""
        completed = False
        self.count_stream(1)
        try:
            for request in requests:
                session_id = request.session_id
                block = VerifyBlock.from_pb(request, history)
                self.prepare_on_this_thread(block)
                yield self.verify_on_this_thread(chain, block, len(request.token_ids)).to_pb()
            completed = True
        finally:
            # Ended without END, broken, or failed: the session will not continue here.
            self.count_stream(-1)
            with self.model_lock:
                self.end_chain(chain)
                if not completed and session_id:
                    self.caches.release(session_id)

    def verify_on_this_thread(self, chain: VerifyChain, block: VerifyBlock, new_tokens: int) -> Verdict:
        if self.batcher is not None and self.loop is not None and self.batching_now():
            batched = self.batcher.run(block.session_id, new_tokens, (chain, block))
            return asyncio.run_coroutine_threadsafe(batched, self.loop).result()
        with self.model_lock:
            return chain.verify(block)

    def end_chain(self, chain: VerifyChain) -> None:
        """On the model thread, once a stream has ended. A session released while its stream was open is freed
        again: a block the stream verified after the release (one sent before it, by a request that was
        failing or cancelled) rebuilt the cache the release meant to free."""
        self.open_chains.forget(chain)
        if chain.released:
            self.caches.release(chain.session_id)

    async def ReleaseSession(
        self, request: common_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ReleaseSessionResponse:
        # On the model thread, in order with the verifications (see OpenChains).
        self.submit(self.open_chains.break_session, request.session_id)
        return await super().ReleaseSession(request, context)

    def stats(self, session_id: str = "") -> common_pb2.WorkerStats:
        stats = super().stats(session_id)
        stats.chained_verifies = self.chain_counters.verified
        stats.chained_skips = self.chain_counters.skipped
        stats.direct_streams = self.direct_streams()
        return stats
