"""A request's link to the draft worker, which may fail and come back.

While the draft is unreachable the request goes on with plain target decoding (k = 0) and tries a new
stream every `retry_s`; a new stream starts from the whole history, so the worker (restarted or a
replica) rebuilds its cache from the committed tokens. Greedy output is unaffected: it never depends on
the draft.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from coordinator.worker_clients import DraftClient, DraftStream, Proposal
from specpipe.errors import DeadlineExceededError, UnavailableError
from specpipe.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


class DraftLink:
    def __init__(self, client: DraftClient, stream_timeout_s: float | None, retry_s: float = 1.0) -> None:
        self.client = client
        self.stream_timeout_s = stream_timeout_s
        self.retry_s = retry_s
        self.stream: DraftStream | None = client.open_stream(stream_timeout_s)
        self.retry_at = 0.0
        self.failures = 0

    def available(self) -> bool:
        if self.stream is None and time.monotonic() >= self.retry_at:
            self.stream = self.client.open_stream(self.stream_timeout_s)
        return self.stream is not None

    async def propose(
        self, session_id: str, history: Sequence[int], k: int, sampling: SamplingParams, timeout_s: float
    ) -> Proposal | None:
        """The proposal, or None when the draft failed (the caller decodes without it)."""
        if self.stream is None:
            return None
        try:
            return await self.stream.propose(session_id, history, k, sampling, timeout_s)
        except (UnavailableError, DeadlineExceededError) as exc:
            self.failures += 1
            logger.warning("draft unavailable, continuing with plain target decoding: %s", exc)
            self.stream.cancel()
            self.stream = None
            self.retry_at = time.monotonic() + self.retry_s
            return None

    async def close(self, completed: bool) -> None:
        if self.stream is None:
            return
        if completed:
            await self.stream.finish()
        else:
            self.stream.cancel()
