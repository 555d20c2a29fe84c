"""Where a worker runs model calls: inline on the event loop only when nothing runs on the model thread and
no other thread (a direct stream's) holds the model lock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from specpipe.rpc.worker_servicer import INLINE_MAX_NEW_TOKENS, READ_AHEAD, WorkerServicerBase, read_ahead


def run(coro_fn: Callable[[WorkerServicerBase[object]], Awaitable[None]]) -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as model_thread:
        asyncio.run(coro_fn(WorkerServicerBase(model_thread)))


def caller_thread(_: object) -> str:
    return threading.current_thread().name


def test_small_requests_run_inline_and_large_ones_on_the_model_thread() -> None:
    async def scenario(servicer: WorkerServicerBase[object]) -> None:
        main = threading.current_thread().name
        assert await servicer.run_model(caller_thread, None, INLINE_MAX_NEW_TOKENS) == main
        assert (await servicer.run_model(caller_thread, None, INLINE_MAX_NEW_TOKENS + 1)).startswith("model")
        assert servicer.model_jobs == 0

    run(scenario)


def test_nothing_runs_inline_beside_a_model_thread_job_even_after_its_caller_gave_up() -> None:
    async def scenario(servicer: WorkerServicerBase[object]) -> None:
        release = threading.Event()
        order: list[str] = []

        def slow(_: object) -> None:
            release.wait(5.0)
            order.append("slow")

        def small(_: object) -> str:
            order.append("small")
            return threading.current_thread().name

        waiter = asyncio.ensure_future(servicer.run_model(slow, None, 1000))
        await asyncio.sleep(0.05)
        waiter.cancel()  # the stream went away; the forward itself still runs
        await asyncio.gather(waiter, return_exceptions=True)
        assert servicer.model_jobs == 1
        queued = asyncio.ensure_future(servicer.run_model(small, None, 1))  # small, but must queue
        await asyncio.sleep(0.05)
        assert order == []
        release.set()
        assert (await queued).startswith("model")
        assert order == ["slow", "small"]
        deadline = time.monotonic() + 5.0
        while servicer.model_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert servicer.model_jobs == 0
        assert await servicer.run_model(caller_thread, None, 1) == threading.current_thread().name

    run(scenario)


def test_a_queued_job_whose_caller_gave_up_never_runs_and_stops_counting() -> None:
    async def scenario(servicer: WorkerServicerBase[object]) -> None:
        release = threading.Event()
        ran: list[str] = []
        running = asyncio.ensure_future(servicer.run_model(lambda _: release.wait(5.0), None, 1000))
        queued = asyncio.ensure_future(servicer.run_model(ran.append, "queued", 1000))
        await asyncio.sleep(0.05)
        assert servicer.model_jobs == 2
        queued.cancel()  # its stream went away while it waited behind the running job
        await asyncio.gather(queued, return_exceptions=True)
        release.set()
        assert await running
        deadline = time.monotonic() + 5.0
        while servicer.model_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Counted out (else the inline path would stay off for good, and the jobs gauge would never fall).
        assert servicer.model_jobs == 0 and ran == []
        assert await servicer.run_model(caller_thread, None, 1) == threading.current_thread().name

    run(scenario)


class Requests:
    """A request stream that records how far it has been read and may fail after `fail_after` requests."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n, self.fail_after, self.read = n, fail_after, 0

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> int:
        await asyncio.sleep(0)
        if self.fail_after is not None and self.read == self.fail_after:
            raise RuntimeError("stream broke")
        if self.read == self.n:
            raise StopAsyncIteration
        self.read += 1
        return self.read


def test_a_held_model_lock_sends_small_requests_to_the_model_thread_which_waits_for_it() -> None:
    """A direct stream's thread verifies under the model lock: meanwhile a small gRPC request must not run
    inline beside it, and the model thread's job runs only once the lock is free."""

    async def scenario(servicer: WorkerServicerBase[object]) -> None:
        servicer.model_lock.acquire()  # as a direct stream's thread does around its verify
        try:
            queued = asyncio.ensure_future(servicer.run_model(caller_thread, None, 1))
            await asyncio.sleep(0.05)
            assert not queued.done()
        finally:
            servicer.model_lock.release()
        assert (await queued).startswith("model")
        assert not servicer.model_lock.locked()

    run(scenario)


def test_read_ahead_keeps_order_and_reads_at_most_a_few_requests_ahead() -> None:
    async def scenario() -> None:
        source = Requests(10)
        seen: list[int] = []
        async for request in read_ahead(source):
            await asyncio.sleep(0.01)  # answering: the reader runs meanwhile
            assert source.read <= request + READ_AHEAD
            seen.append(request)
        assert seen == list(range(1, 11))

    asyncio.run(scenario())


def test_read_ahead_raises_a_stream_failure_where_requests_are_taken() -> None:
    async def scenario() -> None:
        seen: list[int] = []
        try:
            async for request in read_ahead(Requests(10, fail_after=3)):
                seen.append(request)
        except RuntimeError as exc:
            assert str(exc) == "stream broke"
        else:
            raise AssertionError("the failure was swallowed")
        assert seen == [1, 2, 3]

    asyncio.run(scenario())


def test_closing_read_ahead_early_stops_its_reader() -> None:
    async def scenario() -> None:
        source = Requests(1000)
        ordered = read_ahead(source)
        assert await ordered.__anext__() == 1
        await ordered.aclose()
        read = source.read
        await asyncio.sleep(0.05)
        assert source.read == read <= 1 + READ_AHEAD

    asyncio.run(scenario())
