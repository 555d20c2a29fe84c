"""Static discovery: the replicas named in the cluster file (or by --draft-addr/--target-addr)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from coordinator.cluster_config import StaticReplica
from coordinator.discovery.base import Endpoint


class StaticDiscovery:
    """Reports a fixed set of endpoints once, then never changes."""

    def __init__(self, replicas: Sequence[StaticReplica]) -> None:
        self._endpoints = frozenset(Endpoint(r.role, r.address, r.pool) for r in replicas)

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        yield self._endpoints
        # Nothing can change, but the contract is "runs until cancelled": a consumer that treats the end
        # of the stream as the loss of its source must not see one.
        await asyncio.get_running_loop().create_future()
