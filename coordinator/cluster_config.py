"""The coordinator's cluster file: worker pools, how replicas are discovered, how sessions are routed.

Written by hand for a static cluster or rendered by the Helm chart into a ConfigMap; loaded once by the
CLI (`specpipe serve coordinator --cluster-config FILE`). Without a file, `--draft-addr`/`--target-addr`
describe a one-replica static cluster in pool "default". Example (YAML; JSON is YAML too):

    pools:                  # capacity weight per pool: routing sends a pool this share of the load
      h100: {weight: 4}
      cpu: {weight: 1}
    discovery:
      backend: static       # static | dns | kubernetes
      static:
        - {role: target, address: "10.0.0.5:50062", pool: h100}
        - {role: draft, address: "10.0.0.9:50061", pool: cpu}
      dns:                  # one headless Service per role and pool, re-resolved every refresh_interval_s
        - {role: target, pool: h100, host: specpipe-target-h100.default.svc.cluster.local, port: 50062}
      refresh_interval_s: 10
      kubernetes:           # watch EndpointSlices; role and pool come from labels
        namespace: ""       # "" = the pod's own namespace (in-cluster) or the kubeconfig's
        label_selector: "app.kubernetes.io/name=specpipe,app.kubernetes.io/instance=my-release"
        role_label: app.kubernetes.io/component   # on the Service, copied to its EndpointSlices
        pool_label: specpipe.io/pool              # on the worker pods
        port_name: grpc
    routing:
      imbalance_factor: 2.0 # leave the affinity replica when its weighted load exceeds this x the least
    health:
      interval_s: 2.0       # grpc.health.v1 Check period per replica
      timeout_s: 1.0
      failure_threshold: 2  # consecutive failed checks that take a replica out
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROLES = ("draft", "target")
BACKENDS = ("static", "dns", "kubernetes")
DEFAULT_POOL = "default"


class ClusterConfigError(ValueError):
    """The cluster file is malformed; the message names the offending key."""


def _check_role(role: object, where: str) -> str:
    if role not in ROLES:
        raise ClusterConfigError(f"{where}.role must be one of {ROLES}, got {role!r}")
    return str(role)


def _check_address(address: object, where: str) -> str:
    if not isinstance(address, str) or ":" not in address or not address.rsplit(":", 1)[1].isdigit():
        raise ClusterConfigError(f"{where}.address must be host:port, got {address!r}")
    return address


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ClusterConfigError("a pool needs a name")
        if not self.weight > 0:
            raise ClusterConfigError(f"pools.{self.name}.weight must be > 0, got {self.weight}")


@dataclass(frozen=True, slots=True)
class StaticReplica:
    role: str
    address: str
    pool: str = DEFAULT_POOL

    def __post_init__(self) -> None:
        _check_role(self.role, "discovery.static[]")
        _check_address(self.address, "discovery.static[]")


@dataclass(frozen=True, slots=True)
class DnsName:
    """A headless Service name whose A/AAAA records are the replicas of one role and pool."""

    role: str
    host: str
    port: int
    pool: str = DEFAULT_POOL

    def __post_init__(self) -> None:
        _check_role(self.role, "discovery.dns[]")
        if not self.host:
            raise ClusterConfigError("discovery.dns[].host is required")
        if not 0 < self.port < 65536:
            raise ClusterConfigError(f"discovery.dns[].port must be in [1, 65535], got {self.port}")


@dataclass(frozen=True, slots=True)
class KubernetesDiscovery:
    namespace: str = ""
    label_selector: str = "app.kubernetes.io/name=specpipe"
    role_label: str = "app.kubernetes.io/component"
    pool_label: str = "specpipe.io/pool"
    port_name: str = "grpc"
    # Only for tests and out-of-cluster use: an explicit API server URL (no credentials), else the
    # in-cluster config or the kubeconfig is used.
    api_url: str = ""


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    backend: str = "static"
    static: tuple[StaticReplica, ...] = ()
    dns: tuple[DnsName, ...] = ()
    kubernetes: KubernetesDiscovery = field(default_factory=KubernetesDiscovery)
    refresh_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ClusterConfigError(f"discovery.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "static" and not self.static:
            raise ClusterConfigError("discovery.static must list at least one replica")
        if self.backend == "dns" and not self.dns:
            raise ClusterConfigError("discovery.dns must list at least one name")
        if not self.refresh_interval_s > 0:
            raise ClusterConfigError(
                f"discovery.refresh_interval_s must be > 0, got {self.refresh_interval_s}"
            )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    # Leave the session's affinity replica when its load per unit of pool weight exceeds this multiple
    # of the least loaded replica's (load = outstanding requests + 1).
    imbalance_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.imbalance_factor >= 1.0:
            raise ClusterConfigError(f"routing.imbalance_factor must be >= 1, got {self.imbalance_factor}")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 1.0
    # Consecutive failed checks that take a replica out of rotation (one slow answer on a loaded machine
    # must not); a request that sees the replica fail takes it out at once.
    failure_threshold: int = 2

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ClusterConfigError(f"health.{name} must be > 0, got {getattr(self, name)}")
        if self.failure_threshold < 1:
            raise ClusterConfigError(f"health.failure_threshold must be >= 1, got {self.failure_threshold}")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    discovery: DiscoveryConfig
    pools: tuple[PoolConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def pool_weight(self, pool: str) -> float:
        """A pool's capacity weight; pools the file does not name weigh 1."""
        for p in self.pools:
            if p.name == pool:
                return p.weight
        return 1.0

    @classmethod
    def single(cls, draft_addr: str, target_addr: str) -> ClusterConfig:
        """The --draft-addr/--target-addr case: comma-separated host:port lists, all in pool "default"."""
        replicas = [
            StaticReplica(role, address.strip())
            for role, addresses in (("draft", draft_addr), ("target", target_addr))
            for address in addresses.split(",")
            if address.strip()
        ]
        return cls(DiscoveryConfig(static=tuple(replicas)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterConfig:
        try:
            return _from_dict(data)
        except ClusterConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise ClusterConfigError(f"malformed cluster config: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, Mapping):
            raise ClusterConfigError(f"{path}: the cluster config must be a mapping")
        return cls.from_dict(data)


def _known(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key(s) {unknown}")


def _from_dict(data: Mapping[str, Any]) -> ClusterConfig:
    _known(data, {"pools", "discovery", "routing", "health"}, "cluster config")
    pools_raw = data.get("pools") or {}
    pools = tuple(
        PoolConfig(str(name), float((spec or {}).get("weight", 1.0))) for name, spec in pools_raw.items()
    )
    disc = dict(data.get("discovery") or {})
    _known(disc, {"backend", "static", "dns", "kubernetes", "refresh_interval_s"}, "discovery")
    static = tuple(
        StaticReplica(str(r.get("role")), r.get("address"), str(r.get("pool", DEFAULT_POOL)))
        for r in disc.get("static") or ()
    )
    dns = tuple(
        DnsName(
            str(r.get("role")),
            str(r.get("host", "")),
            int(r.get("port", 0)),
            str(r.get("pool", DEFAULT_POOL)),
        )
        for r in disc.get("dns") or ()
    )
    k8s_raw = dict(disc.get("kubernetes") or {})
    _known(k8s_raw, set(KubernetesDiscovery.__dataclass_fields__), "discovery.kubernetes")
    discovery = DiscoveryConfig(
        backend=str(disc.get("backend", "static")),
        static=static,
        dns=dns,
        kubernetes=KubernetesDiscovery(**{k: str(v) for k, v in k8s_raw.items()}),
        refresh_interval_s=float(disc.get("refresh_interval_s", 10.0)),
    )
    routing_raw = dict(data.get("routing") or {})
    _known(routing_raw, {"imbalance_factor"}, "routing")
    health_raw = dict(data.get("health") or {})
    _known(health_raw, {"interval_s", "timeout_s", "failure_threshold"}, "health")
    return ClusterConfig(
        discovery=discovery,
        pools=pools,
        routing=RoutingConfig(**{k: float(v) for k, v in routing_raw.items()}),
        health=HealthConfig(
            **{k: int(v) if k == "failure_threshold" else float(v) for k, v in health_raw.items()}
        ),
    )
