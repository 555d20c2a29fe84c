"""GenerateRequest.n: n completions of one prompt, each its own request with n = 1, streamed interleaved.

Completion i is the request with seed + i (so it is exactly what that single request returns, and can be
replayed or resumed alone) and a new session of its own; only completion 0 scores the prompt (its log-probs
are the same for all). The completions run concurrently, each its own speculation loop, as n clients' requests
would: the workers see n sessions. The first failure fails the call and cancels the others; the completions
that already committed rounds keep them in their sessions, as an interrupted request does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable, Sequence

from coordinator.request import GenerationChunk, GenerationRequest
from specpipe.errors import UnavailableError

SEED_MODULUS = 2**64  # SamplingParams.seed is a uint64

__all__ = ["completion_requests", "interleaved", "interleaved_completions"]


def completion_requests(request: GenerationRequest) -> list[GenerationRequest]:
    """The n single requests a request with n completions stands for."""
    return [
        dataclasses.replace(
            request,
            n=1,
            sampling=dataclasses.replace(request.sampling, seed=(request.sampling.seed + i) % SEED_MODULUS),
            prompt_logprobs=request.prompt_logprobs if i == 0 else None,
        )
        for i in range(request.n)
    ]


async def interleaved_completions(
    generate: Callable[[GenerationRequest], AsyncIterator[GenerationChunk]],
    requests: Sequence[GenerationRequest],
) -> AsyncIterator[GenerationChunk]:
    """Each request's chunks, tagged with its index, as they come; in order within each completion."""
    streams = [functools.partial(generate, request) for request in requests]
    async for index, chunk in interleaved(streams):
        yield dataclasses.replace(chunk, index=index)


async def interleaved(
    streams: Sequence[Callable[[], AsyncIterator[GenerationChunk]]],
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """The streams run concurrently; each chunk comes as it is made, with its stream's index, in order within
    each stream. The first failure ends the iteration with it and cancels the other streams."""
    queue: asyncio.Queue[tuple[int, GenerationChunk] | BaseException | None] = asyncio.Queue()

    async def run(index: int, stream: Callable[[], AsyncIterator[GenerationChunk]]) -> None:
        try:
            async for chunk in stream():
                queue.put_nowait((index, chunk))
        except BaseException as exc:
            # The caller raises it, a CancelledError too (one the completion's own calls raised, where the
            # caller did not cancel it): every completion ends with an item, so the caller never waits on
            # a completion that is gone.
            queue.put_nowait(exc)
            raise
        queue.put_nowait(None)

    tasks = [asyncio.create_task(run(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, asyncio.CancelledError):
                # Not this call's cancellation (that would have ended the wait above): a completion's own
                # call was cancelled under it.
                raise UnavailableError("a completion's call was cancelled") from item
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
