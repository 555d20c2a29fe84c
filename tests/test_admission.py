"""The concurrency limit's waiting line (coordinator/admission.py), on asyncio alone: refusals, first come
first served, and a waiter that gives up (cancelled, past its deadline, or just granted) leaking no slot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from coordinator.admission import ConcurrencyLimit
from specpipe.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError


def no_deadline() -> float | None:
    return None


async def hold_until(
    limit: ConcurrencyLimit, slots: int, release: asyncio.Event, log: list[str], name: str
) -> None:
    async with limit.hold(slots, no_deadline):
        log.append(name)
        await release.wait()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_without_a_line_a_full_limit_refuses_at_once() -> None:
    async def test() -> None:
        limit, release, log = ConcurrencyLimit(2), asyncio.Event(), list[str]()
        running = asyncio.create_task(hold_until(limit, 2, release, log, "a"))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhaustedError, match="--max-concurrent-requests"):
            async with limit.hold(1, no_deadline):
                pass
        with pytest.raises(InvalidArgumentError, match="3 completions at once"):
            async with limit.hold(3, no_deadline):
                pass
        release.set()
        await running
        assert limit.running == 0

    run(test)


def test_waiters_are_served_first_come_first_served() -> None:
    async def test() -> None:
        limit, log = ConcurrencyLimit(2, max_waiting=2), list[str]()
        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(hold_until(limit, 1, first, log, "a"))]
        await asyncio.sleep(0)
        # b needs both slots: it waits, and c (one slot, which is free) waits behind it rather than passing.
        tasks.append(asyncio.create_task(hold_until(limit, 2, second, log, "b")))
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(hold_until(limit, 1, third, log, "c")))
        await asyncio.sleep(0.01)
        assert log == ["a"] and limit.waiting == 2
        with pytest.raises(ResourceExhaustedError, match="2 waiting"):  # the line is full
            async with limit.hold(1, no_deadline):
                pass
        first.set()
        await asyncio.sleep(0.01)
        assert log == ["a", "b"] and limit.waiting == 1 and limit.running == 2
        second.set()
        third.set()
        await asyncio.gather(*tasks)
        assert log == ["a", "b", "c"] and (limit.running, limit.waiting) == (0, 0)

    run(test)


def test_a_waiter_that_gives_up_leaves_no_slot_behind() -> None:
    async def test() -> None:
        limit, release, log = ConcurrencyLimit(1, max_waiting=3), asyncio.Event(), list[str]()
        holder = asyncio.create_task(hold_until(limit, 1, release, log, "a"))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(hold_until(limit, 1, asyncio.Event(), log, "cancelled"))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert limit.waiting == 0
        with pytest.raises(DeadlineExceededError):
            async with limit.hold(1, lambda: 0.01):
                pass
        assert limit.waiting == 0
        # Granted its slot, then cancelled before it ran: the slot goes on to the next in line.
        granted = asyncio.create_task(hold_until(limit, 1, asyncio.Event(), log, "granted"))
        after_release = asyncio.Event()
        await asyncio.sleep(0)
        after = asyncio.create_task(hold_until(limit, 1, after_release, log, "after"))
        await asyncio.sleep(0)
        release.set()  # a ends and hands its slot to "granted", which is cancelled before it resumes
        await asyncio.sleep(0)
        granted.cancel()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await granted
        await asyncio.sleep(0.01)
        assert "granted" not in log and log[-1] == "after" and limit.running == 1
        after_release.set()
        await after
        assert (limit.running, limit.waiting) == (0, 0)

    run(test)


def test_a_head_of_line_that_gives_up_lets_those_behind_it_in() -> None:
    """A large request at the head that leaves (its deadline) hands the free slots to the smaller ones
    behind it, rather than leaving them to wait for a running request to end."""

    async def test() -> None:
        limit, release, log = ConcurrencyLimit(4, max_waiting=2), asyncio.Event(), list[str]()
        running = asyncio.create_task(hold_until(limit, 2, release, log, "running"))
        await asyncio.sleep(0)
        big = asyncio.create_task(limit.hold(4, lambda: 0.05).__aenter__())
        await asyncio.sleep(0)
        small = asyncio.create_task(hold_until(limit, 1, asyncio.Event(), log, "small"))
        with pytest.raises(DeadlineExceededError):
            await big
        await asyncio.sleep(0.01)
        assert log == ["running", "small"] and (limit.running, limit.waiting) == (3, 0)
        small.cancel()
        release.set()
        await running
        with pytest.raises(asyncio.CancelledError):
            await small
        assert (limit.running, limit.waiting) == (0, 0)

    run(test)


def test_only_requests_that_never_held_their_slots_count_as_refused() -> None:
    """The servicer counts a refusal, a deadline or a cancellation met in line by outcome; a generation's own
    RESOURCE_EXHAUSTED (a worker's) is its request's outcome, counted once by the request's observer."""
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.request import RequestLimits
    from coordinator.servicer import CoordinatorServicer

    def count(servicer: CoordinatorServicer, outcome: str) -> float:
        return servicer.metrics.requests.labels(outcome=outcome)._value.get()

    async def test() -> None:
        limits = RequestLimits(max_new_tokens=16, max_speculative_tokens=4, default_speculative_tokens=None)
        servicer = CoordinatorServicer(limits, CoordinatorMetrics(), max_concurrent_requests=1)
        with pytest.raises(ResourceExhaustedError):
            async with servicer.admission(1, no_deadline):
                raise ResourceExhaustedError("a worker's: its KV cache budget")
        assert count(servicer, "RESOURCE_EXHAUSTED") == 0
        async with servicer.admission(1, no_deadline):
            with pytest.raises(ResourceExhaustedError):
                async with servicer.admission(1, no_deadline):
                    pass
        assert count(servicer, "RESOURCE_EXHAUSTED") == 1 and servicer.running == 0

    run(test)


def test_a_lower_priority_value_waits_ahead() -> None:
    """vLLM's request priority: lower values first, equal ones first come first served."""

    async def test() -> None:
        limit, release, log = ConcurrencyLimit(1, max_waiting=3), asyncio.Event(), list[str]()
        tasks = [asyncio.create_task(hold_until(limit, 1, release, log, "running"))]
        await asyncio.sleep(0)
        for name, priority in (("a", 0), ("urgent", -1), ("b", 0)):

            async def waiter(name: str = name, priority: int = priority) -> None:
                async with limit.hold(1, no_deadline, priority):
                    log.append(name)

            tasks.append(asyncio.create_task(waiter()))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        assert log == ["running", "urgent", "a", "b"]

    run(test)


def test_the_http_api_passes_a_bodys_priority_on() -> None:
    from coordinator.openai_api.requests import chat_call, completion_call

    body = {"messages": [{"role": "user", "content": "hi"}], "priority": -5}
    assert chat_call(body, 64).priority == -5
    call = completion_call({"prompt": ["a", "b"], "priority": 3}, 64, str, lambda text: [1])
    assert call.priority == 3 and {request.priority for request in call.requests} == {3}
    with pytest.raises(InvalidArgumentError, match="priority"):
        chat_call({**body, "priority": 2**40}, 64)
