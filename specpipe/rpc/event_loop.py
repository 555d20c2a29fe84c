"""The event loop a service runs on: uvloop where it is installed, else asyncio's own.

Every hop of a round (a verdict to the draft, a block to the target, a round to the coordinator) wakes an
event loop, reads a socket and resumes a task. On the 2-core CPU machines a one-way message over loopback
between two asyncio processes cost ~180 µs after a few idle milliseconds and ~90 µs back to back, against
~110 µs and ~35 µs with uvloop (libuv's loop, the one vLLM's API server runs on); grpc.aio runs on any
asyncio loop. `docs/benchmarks.md` ("uvloop") has the per-round figures.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(event_loop: str) -> str:
    """The loop to run for a requested one: "auto" is uvloop where it is installed."""
    if event_loop not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {EVENT_LOOPS}, got {event_loop!r}")
    if event_loop == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    if event_loop == "uvloop" and not uvloop_available():
        raise ValueError("event loop uvloop: the uvloop package is not installed")
    return event_loop


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """asyncio.run(main) on the chosen loop."""
    if resolve(event_loop) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
