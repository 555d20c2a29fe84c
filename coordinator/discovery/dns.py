"""DNS discovery: the A/AAAA records of headless Services, re-resolved periodically.

A Kubernetes headless Service (clusterIP: None) publishes one A/AAAA record per ready pod under its name,
so resolving it lists the replicas. Each configured name is one role and pool.

What a failed lookup means:

- "no such name" (EAI_NONAME, i.e. NXDOMAIN; or EAI_NODATA, the name exists without addresses) is an
  answer, not a failure: a headless Service with no ready pods is NXDOMAIN in cluster DNS, so the name
  contributes no replicas until it resolves again. Keeping the old addresses would route to pods that are
  gone or not ready.
- any other error (EAI_AGAIN, SERVFAIL, a timeout, ...) says nothing about the replicas: the name keeps the
  addresses of its last successful lookup and is retried at the next refresh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence

from coordinator.cluster_config import DnsName
from coordinator.discovery.base import Endpoint

log = logging.getLogger(__name__)

# (host, port) -> the IP addresses the host resolves to. Raises socket.gaierror as getaddrinfo does.
Resolver = Callable[[str, int], Awaitable[Collection[str]]]

# The gaierror codes that mean "this name has no addresses" rather than "the lookup failed".
# EAI_NODATA is glibc-only, hence the getattr.
_NO_ADDRESSES = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address bracketed so the port stays unambiguous (gRPC target syntax)."""
    try:
        is_v6 = ipaddress.ip_address(host.split("%", 1)[0]).version == 6
    except ValueError:
        is_v6 = False  # a hostname
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


async def resolve_host(host: str, port: int) -> list[str]:
    """The A and AAAA addresses of host through the system resolver (so /etc/hosts and the pod's search
    domains apply, as for any other client in the pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class DnsDiscovery:
    """Resolves every name each refresh_interval_s and reports the union of their addresses on change."""

    def __init__(
        self,
        names: Sequence[DnsName],
        refresh_interval_s: float,
        resolver: Resolver | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not refresh_interval_s > 0:
            raise ValueError(f"refresh_interval_s must be > 0, got {refresh_interval_s}")
        self._names = tuple(names)
        self._refresh_interval_s = refresh_interval_s
        self._resolver = resolver or resolve_host
        # The system resolver retries on its own (resolv.conf timeout x attempts); bound a round so one
        # unreachable DNS server cannot stall the refresh of every name.
        self._timeout_s = timeout_s

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        # Per configured name (by position: the same host may be listed twice), its current endpoints.
        current: list[frozenset[Endpoint]] = [frozenset() for _ in self._names]
        previous: frozenset[Endpoint] | None = None
        while True:
            results = await asyncio.gather(*(self._lookup(name) for name in self._names))
            for i, (name, result) in enumerate(zip(self._names, results, strict=True)):
                current[i] = self._apply(name, result, current[i])
            endpoints = frozenset().union(*current)
            if endpoints != previous:
                previous = endpoints
                yield endpoints
            await asyncio.sleep(self._refresh_interval_s)

    async def _lookup(self, name: DnsName) -> Collection[str] | Exception:
        try:
            return await asyncio.wait_for(self._resolver(name.host, name.port), self._timeout_s)
        except Exception as exc:  # any resolver failure is judged by _apply; cancellation passes through
            return exc

    @staticmethod
    def _apply(
        name: DnsName,
        result: Collection[str] | Exception,
        previous: frozenset[Endpoint],
    ) -> frozenset[Endpoint]:
        if isinstance(result, socket.gaierror) and result.errno in _NO_ADDRESSES:
            if previous:
                log.warning(
                    "%s no longer resolves (%s): no %s replicas in pool %s",
                    name.host,
                    result,
                    name.role,
                    name.pool,
                )
            return frozenset()
        if isinstance(result, Exception):
            log.warning(
                "resolving %s failed (%r); keeping its last %d address(es)", name.host, result, len(previous)
            )
            return previous
        endpoints = frozenset(Endpoint(name.role, host_port(ip, name.port), name.pool) for ip in result)
        if not endpoints and previous:
            log.warning(
                "%s resolves to no addresses: no %s replicas in pool %s", name.host, name.role, name.pool
            )
        return endpoints
