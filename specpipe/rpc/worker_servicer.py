"""What the draft and target servicers share: the model thread, info, cache release, stats, streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import grpc

from specpipe.errors import UnavailableError
from specpipe.rpc.session_batcher import SessionBatcher
from specpipe.runtime.graphed_forward import GraphedForward
from specpipe.runtime.kv_cache import SessionKVCacheStore
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.stream_history import StreamHistory
from specpipe.sampling.structured_output import OutputAutomata
from specpipe.v1 import common_pb2

EngineT = TypeVar("EngineT")

# A stream request carrying at most this many new tokens runs on the event loop itself when the model thread
# is idle: a steady-state round (a few accepted tokens plus a block) takes forwards of a few milliseconds,
# and the two thread hand-offs it saves cost 0.3-0.5 ms per exchange on a 2-core machine. A stream's first
# request carries the whole history (a prefill) and goes to the model thread, so long forwards do not stall
# the event loop (health checks, other streams); only a session evicted mid-stream rebuilds inline.
INLINE_MAX_NEW_TOKENS = 32


# Requests a stream reads ahead of the one being answered (gRPC's flow control still bounds the rest).
READ_AHEAD = 2


async def read_ahead(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's requests, with the read of the next one always posted while the current one is answered.

    A request answered inline blocks the event loop for its forward pass; with the next read already posted,
    gRPC receives a request that arrives meanwhile (a chained block, target_service/chain.py) on its own
    threads, and it is at hand when the reply has gone out instead of one more event-loop wake-up later.
    """
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()  # bounded by `room`
    room = asyncio.Semaphore(READ_AHEAD)
    end = object()

    async def pump() -> None:
        error: BaseException | None = None
        try:
            while True:
                await room.acquire()
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    return
                queue.put_nowait((request, None))
        except Exception as exc:  # the stream failed: raised where the requests are taken
            error = exc
        except BaseException as exc:  # cancelled
            error = exc
            raise
        finally:
            queue.put_nowait((end, error))

    reader = asyncio.ensure_future(pump())
    try:
        while True:
            request, error = await queue.get()
            if error is not None:
                raise error
            if request is end:
                return
            room.release()
            yield request
    finally:
        reader.cancel()


class WorkerServicerBase(Generic[EngineT]):
    """Holds the loaded engine (a drafter or a verifier, each with a `runner`) once warm-up attaches it."""

    def __init__(self, model_thread: ThreadPoolExecutor) -> None:
        self.model_thread = model_thread
        # The model and its caches are not thread-safe: whatever uses them holds this lock (the model thread's
        # jobs, a call run inline on the event loop, a direct stream's thread).
        self.model_lock = threading.Lock()
        self._loaded: tuple[EngineT, WorkerModelInfo] | None = None
        # open_streams is counted on the event loop and on direct streams' threads.
        self._streams_lock = threading.Lock()
        self.open_streams = 0
        # Model-thread jobs not finished yet (counted on the event loop): the model may run inline only at 0.
        self.model_jobs = 0
        # Cross-session batching of the model calls, where the role's servicer sets one up.
        self.batcher: SessionBatcher[Any, Any] | None = None

    def attach(self, engine: EngineT, info: WorkerModelInfo) -> None:
        """Called once the model is loaded; until then every RPC answers UNAVAILABLE."""
        self._loaded = (engine, info)

    @property
    def engine(self) -> EngineT:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[0]

    @property
    def info(self) -> WorkerModelInfo:
        if self._loaded is None:
            raise UnavailableError("the model is still loading")
        return self._loaded[1]

    @property
    def caches(self) -> SessionKVCacheStore:
        """The engine's per-session caches (empty for a model-free drafter)."""
        return self.engine.caches  # type: ignore[attr-defined]

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Runs fn on the model thread; the job counts as running until fn has returned, even if the
        caller stops waiting (a cancelled stream), so nothing runs inline beside it. A job whose caller stops
        waiting before it started never runs, and stops counting then."""
        loop = asyncio.get_running_loop()  # always called on the event loop, which alone runs work inline

        def job() -> Any:
            try:
                with self.model_lock:
                    return fn(*args)
            finally:
                loop.call_soon_threadsafe(self._job_finished)

        def dropped(queued: concurrent.futures.Future[Any]) -> None:
            # Cancelled while queued (the caller's future was cancelled): job() never runs, so its finally
            # cannot count it out; a running job cannot be cancelled, and counts itself out.
            if queued.cancelled():
                loop.call_soon_threadsafe(self._job_finished)

        self.model_jobs += 1
        try:
            queued = self.model_thread.submit(job)
        except BaseException:
            self.model_jobs -= 1
            raise
        queued.add_done_callback(dropped)
        return asyncio.wrap_future(queued, loop=loop)

    def _job_finished(self) -> None:
        self.model_jobs -= 1

    def batching_now(self) -> bool:
        """Whether a model call goes to the batcher: there is one, and another stream is open or a batched
        pass runs or waits. A lone stream keeps the unbatched path (inline when the model thread is idle):
        there is nothing to batch it with, and the hand-over to the model thread costs 0.3-0.5 ms."""
        return self.batcher is not None and (self.open_streams > 1 or not self.batcher.idle)

    def automaton_to_build(self, decoded: Any) -> tuple[OutputAutomata, str] | None:
        """The engine's automata and the request's regex, where its structured output's automaton is not
        built yet (building one takes a while for a large vocabulary: seconds for a JSON schema at 50k)."""
        sampling = getattr(decoded, "sampling", None)
        automata = getattr(self.engine, "automata", None)
        regex = sampling.output_regex if sampling is not None else ""
        if not regex or automata is None or automata.is_built(regex):
            return None
        return automata, regex

    async def prepare(self, decoded: Any) -> None:
        """Builds the request's automaton off the model thread before its model call: built inside it, the
        build would hold up every session's calls (the model lock), and could outlast the coordinator's
        worker timeout."""
        pending = self.automaton_to_build(decoded)
        if pending is not None:
            await asyncio.to_thread(pending[0].automaton, pending[1])

    def prepare_on_this_thread(self, decoded: Any) -> None:
        """`prepare` for a direct stream's thread, before it takes the model lock."""
        pending = self.automaton_to_build(decoded)
        if pending is not None:
            pending[0].automaton(pending[1])

    async def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.submit(fn, *args)

    async def run_model(self, fn: Callable[..., Any], arg: Any, new_tokens: int) -> Any:
        """fn(arg) inline when it is small and the model is idle (see INLINE_MAX_NEW_TOKENS), else on the
        model thread."""
        if new_tokens <= INLINE_MAX_NEW_TOKENS and self.model_jobs == 0 and self.model_lock.acquire(False):
            try:
                return fn(arg)
            finally:
                self.model_lock.release()
        return await self.submit(fn, arg)

    def count_stream(self, change: int) -> None:
        with self._streams_lock:
            self.open_streams += change

    async def serve_stream(
        self,
        requests: AsyncIterator[Any],
        decode: Callable[[Any, StreamHistory], Any],
        handle: Callable[[Any], Any],
        context: grpc.aio.ServicerContext,
        run: Callable[[Any, int], Awaitable[Any]] | None = None,
    ) -> AsyncIterator[Any]:
        """Answers a session stream in order. A stream that is cancelled (client gone, request aborted)
        frees its session's KV cache at once; one closed normally keeps it warm for the next turn.

        Each decoded request is answered by `run(request, new_tokens)` where given (a batching worker's),
        else by `handle(request)` through `run_model`."""
        history = StreamHistory()
        session_id = ""
        completed = False
        self.count_stream(1)
        try:
            # gRPC passes a request that arrives during an inline forward to the event loop only if a read is
            # posted (read_ahead).
            async with contextlib.aclosing(read_ahead(requests)) as ordered:  # closed here: stops its reader
                async for request in ordered:
                    session_id = request.session_id
                    decoded = decode(request, history)
                    await self.prepare(decoded)
                    if run is not None:
                        result = await run(decoded, len(request.token_ids))
                    else:
                        result = await self.run_model(handle, decoded, len(request.token_ids))
                    yield result.to_pb()
            # A cancelled call can also look like the end of the requests.
            completed = not context.cancelled()
        finally:
            # Cancelled, closed at a yield (GeneratorExit) or failed: the session will not continue here.
            self.count_stream(-1)
            if not completed and session_id:
                self.submit(self.caches.release, session_id)

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self.info.to_pb(include_tokenizer_files=request.include_tokenizer_files)

    async def ReleaseSession(
        self, request: common_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ReleaseSessionResponse:
        released = await self.on_model_thread(self.caches.release, request.session_id)
        return common_pb2.ReleaseSessionResponse(released=released)

    async def GetStats(
        self, request: common_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerStats:
        return self.stats(request.session_id)

    def stats(self, session_id: str = "") -> common_pb2.WorkerStats:
        """The worker's counters (GetStats, and /metrics from its own thread: plain reads of ints and sizes).
        Roles add theirs."""
        caches = self.caches
        stats = common_pb2.WorkerStats(
            cached_sessions=len(caches),
            cache_bytes=caches.total_bytes,
            evictions=caches.evictions,
            shared_prefixes=getattr(caches, "shared_prefixes", 0),
            shared_prefix_tokens=getattr(caches, "shared_tokens", 0),
            session_cached=bool(session_id) and session_id in caches,
            open_streams=self.open_streams,
        )
        runner = getattr(self.engine, "runner", None)  # none for a model-free drafter
        if runner is not None and isinstance(graphed := runner.lean, GraphedForward):
            stats.kv_slot_takeovers = graphed.pool.takeovers
            stats.cuda_graphs = graphed.captured
        if self.batcher is not None:
            counters = self.batcher.counters
            stats.batched_passes = counters.passes
            stats.batched_blocks = counters.calls
            stats.largest_batch = counters.largest
        return stats
