"""What every discovery backend reports: the full current set of worker endpoints, on every change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One worker replica: its role ("draft" or "target"), gRPC address host:port, and pool name."""

    role: str
    address: str
    pool: str


class Discovery(Protocol):
    def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        """Yields the complete set of endpoints now, then again whenever it changes (never an unchanged
        set twice in a row). Transient failures of the source are logged and retried inside; the last
        good set stays in force meanwhile. Runs until cancelled."""
        ...
