"""The coordinator's view of its workers: discovery feeds two replica sets, which health-check themselves."""

from __future__ import annotations

import asyncio
import logging

from coordinator.cluster_config import ClusterConfig
from coordinator.discovery.base import Discovery
from coordinator.replicas import ReplicaSet
from specpipe.rpc.worker_clients import DraftClient, TargetClient

logger = logging.getLogger(__name__)


class Cluster:
    def __init__(self, config: ClusterConfig, discovery: Discovery) -> None:
        self.discovery = discovery
        self.drafts = ReplicaSet("draft", DraftClient, config)
        self.targets = ReplicaSet("target", TargetClient, config)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow_discovery(), name="discovery"),
            asyncio.create_task(self.drafts.run_health_checks(), name="draft-health"),
            asyncio.create_task(self.targets.run_health_checks(), name="target-health"),
        ]

    async def _follow_discovery(self) -> None:
        try:
            await self._apply_discovery()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Backends retry their own transient failures; reaching here is a bug. The replicas known so far
            # stay in rotation (health checks go on), so the coordinator keeps serving.
            logger.exception("discovery stopped; keeping the replicas known so far")

    async def _apply_discovery(self) -> None:
        async for endpoints in self.discovery.watch():
            logger.info(
                "discovery: %d draft and %d target replica(s)",
                sum(e.role == "draft" for e in endpoints),
                sum(e.role == "target" for e in endpoints),
            )
            self.drafts.update(endpoints)
            self.targets.update(endpoints)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(self.drafts.close(), self.targets.close(), return_exceptions=True)
