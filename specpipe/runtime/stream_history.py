"""The history a worker stream's requests describe incrementally (only unseen tokens travel)."""

from __future__ import annotations

from collections.abc import Sequence

from specpipe.errors import FailedPreconditionError, InvalidArgumentError


class StreamHistory:
    """Token ids of one session as told by one stream: each request cuts at start_position and appends."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    def apply(self, start_position: int, token_ids: Sequence[int]) -> tuple[int, ...]:
        if start_position > len(self.token_ids):
            raise FailedPreconditionError(
                f"start_position {start_position} is beyond the {len(self.token_ids)} tokens "
                "this stream holds"
            )
        del self.token_ids[start_position:]
        self.token_ids.extend(token_ids)
        return tuple(self.token_ids)


def resolve_history(
    start_position: int, token_ids: Sequence[int], history: StreamHistory | None
) -> tuple[int, ...]:
    """The full history of a request: unary requests carry it whole, stream requests as a delta."""
    if history is None:
        if start_position:
            raise InvalidArgumentError("start_position must be 0 outside a stream (send the whole history)")
        return tuple(token_ids)
    return history.apply(start_position, token_ids)
