"""The worker replicas of one role, as discovery reports them, health-checked and routed to.

A replica enters rotation once `grpc.health.v1` says SERVING and its model info passes the pairing check
(same tokenizer and vocabulary as the pair the coordinator started with). It leaves rotation when a health
check fails or a request sees it fail (UNAVAILABLE, or no answer within the worker timeout), and comes back
when its health check says SERVING again. Sessions on a replica that left are routed elsewhere; the new
replica rebuilds their KV caches from the history the coordinator sends, so no token changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import routing
from coordinator.cluster_config import ClusterConfig
from coordinator.discovery.base import Endpoint
from specpipe.errors import SpecpipeError, UnavailableError
from specpipe.rpc.worker_clients import WorkerClient
from specpipe.runtime.model_info import WorkerModelInfo

logger = logging.getLogger(__name__)

# Replica states.
NEW = "new"  # discovered, not yet checked
HEALTHY = "healthy"  # in rotation
DOWN = "down"  # failed a check or a request; checked again every interval
INCOMPATIBLE = "incompatible"  # serving a model the coordinator cannot pair with; re-checked too


@dataclass(slots=True)
class Replica:
    endpoint: Endpoint
    client: WorkerClient
    weight: float
    state: str = NEW
    info: WorkerModelInfo | None = None
    outstanding: int = 0
    failed_checks: int = 0  # consecutive
    retired: bool = False  # no longer discovered: closed once its last request ends

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def pool(self) -> str:
        return self.endpoint.pool

    def candidate(self) -> routing.Candidate:
        return routing.Candidate(self.address, self.weight, self.outstanding)


# Returns why a worker cannot join (empty when it can).
Compatibility = Callable[[WorkerModelInfo], str]


class ReplicaSet:
    def __init__(self, role: str, make_client: Callable[[str], WorkerClient], cluster: ClusterConfig) -> None:
        self.role = role
        self.make_client = make_client
        self.cluster = cluster
        self.replicas: dict[str, Replica] = {}
        # Until the coordinator has paired its first draft and target, any serving worker may join.
        self.compatibility: Compatibility = lambda info: ""
        self.changed = asyncio.Event()  # set whenever a replica enters rotation
        self._tasks: set[asyncio.Future[None]] = set()

    # ---- membership -------------------------------------------------------------------------------
    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Makes the set match discovery's report: new replicas are checked at once, gone ones retire."""
        wanted = {e.address: e for e in endpoints if e.role == self.role}
        for address, replica in list(self.replicas.items()):
            if address not in wanted or wanted[address].pool != replica.pool:
                del self.replicas[address]
                replica.retired = True
                logger.info("%s replica %s (pool %s) removed by discovery", self.role, address, replica.pool)
                if replica.outstanding == 0:
                    self._spawn(replica.client.close())
        for address, endpoint in wanted.items():
            if address not in self.replicas:
                replica = Replica(
                    endpoint, self.make_client(address), self.cluster.pool_weight(endpoint.pool)
                )
                self.replicas[address] = replica
                logger.info("%s replica %s (pool %s) discovered", self.role, address, endpoint.pool)
                self._spawn(self.check(replica))

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == HEALTHY]

    def clients(self) -> list[WorkerClient]:
        return [r.client for r in self.healthy()]

    # ---- routing ----------------------------------------------------------------------------------
    def pick(self, session_id: str, exclude: Iterable[str] = ()) -> Replica:
        """The replica for this session (affinity with load-aware fallback); UnavailableError if none."""
        excluded = set(exclude)
        candidates = {r.address: r for r in self.healthy() if r.address not in excluded}
        if not candidates:
            known = ", ".join(f"{r.address} ({r.state})" for r in self.replicas.values()) or "none discovered"
            raise UnavailableError(f"no healthy {self.role} worker (replicas: {known})")
        chosen = routing.choose(
            session_id,
            [r.candidate() for r in candidates.values()],
            self.cluster.routing.imbalance_factor,
        )
        return candidates[chosen.key]

    async def pick_or_recheck(self, session_id: str) -> Replica:
        """`pick`, but with none in rotation, checks every replica once first: a worker that came back since
        the last periodic check is used at once rather than after the health interval."""
        try:
            return self.pick(session_id)
        except UnavailableError:
            await self.check_all()
            return self.pick(session_id)

    @contextlib.contextmanager
    def lease(self, replica: Replica) -> Iterator[Replica]:
        """Counts a request as outstanding on the replica while it runs."""
        replica.outstanding += 1
        try:
            yield replica
        finally:
            replica.outstanding -= 1
            if replica.retired and replica.outstanding == 0:
                self._spawn(replica.client.close())

    def mark_down(self, replica: Replica, reason: object) -> None:
        """Takes a replica out of rotation after a request saw it fail; health checks bring it back."""
        if replica.state == HEALTHY:
            logger.warning(
                "%s replica %s (pool %s) taken out: %s", self.role, replica.address, replica.pool, reason
            )
        replica.state = DOWN

    # ---- health -----------------------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        """One health check; a replica (re)entering rotation has its model info read and checked."""
        timeout = self.cluster.health.timeout_s
        try:
            stub = health_pb2_grpc.HealthStub(replica.client.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            serving = False
        if not serving:
            replica.failed_checks += 1
            if replica.state == HEALTHY and replica.failed_checks < self.cluster.health.failure_threshold:
                return  # one miss on a loaded machine; the next check decides
            if replica.state == HEALTHY:
                logger.warning(
                    "%s replica %s (pool %s) failed %d health checks",
                    self.role, replica.address, replica.pool, replica.failed_checks,
                )  # fmt: skip
            if replica.state != INCOMPATIBLE:
                replica.state = DOWN
            replica.info = None  # a restarted worker may serve another model: read its info again
            return
        replica.failed_checks = 0
        if replica.state == HEALTHY:
            return
        try:
            # Model loading and warm-up precede SERVING, so this answers at once.
            info = await replica.client.model_info(False, timeout_s=max(timeout, 5.0))
        except SpecpipeError as exc:
            replica.state = DOWN
            logger.debug("%s replica %s: no model info: %s", self.role, replica.address, exc)
            return
        replica.info = info
        reason = self.compatibility(info)
        if reason:
            if replica.state != INCOMPATIBLE:
                logger.error(
                    "%s replica %s (pool %s) refused: %s", self.role, replica.address, replica.pool, reason
                )
            replica.state = INCOMPATIBLE
            return
        replica.state = HEALTHY
        logger.info(
            "%s replica %s (pool %s, weight %g) in rotation: %s",
            self.role, replica.address, replica.pool, replica.weight, info.model_name,
        )  # fmt: skip
        self.changed.set()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))

    def recheck(self, compatibility: Compatibility) -> None:
        """Installs the pairing check and applies it to the replicas already in rotation."""
        self.compatibility = compatibility
        for replica in self.replicas.values():
            if replica.state == HEALTHY and replica.info is not None:
                reason = compatibility(replica.info)
                if reason:
                    logger.error("%s replica %s refused: %s", self.role, replica.address, reason)
                    replica.state = INCOMPATIBLE

    async def run_health_checks(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.health.interval_s)
            await self.check_all()

    async def wait_healthy(self, timeout_s: float) -> Replica:
        """The first replica in rotation, waiting up to timeout_s for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            healthy = self.healthy()
            if healthy:
                return min(healthy, key=lambda r: r.address)
            remaining = deadline - loop.time()
            if remaining <= 0:
                known = ", ".join(f"{r.address} ({r.state})" for r in self.replicas.values()) or "none"
                raise TimeoutError(f"no {self.role} worker became ready (replicas: {known})")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                await self.check_all()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(r.client.close() for r in self.replicas.values()), return_exceptions=True)
