"""The discovery backend a cluster config names."""

from __future__ import annotations

from coordinator.cluster_config import DiscoveryConfig
from coordinator.discovery.base import Discovery
from coordinator.discovery.dns import DnsDiscovery
from coordinator.discovery.static import StaticDiscovery


def make_discovery(config: DiscoveryConfig) -> Discovery:
    """The backend for config.backend. The Kubernetes one loads its credentials here (and raises
    kubernetes.config.ConfigException when there are none)."""
    if config.backend == "static":
        return StaticDiscovery(config.static)
    if config.backend == "dns":
        return DnsDiscovery(config.dns, config.refresh_interval_s)
    if config.backend == "kubernetes":
        # Imported only here: the kubernetes client takes a noticeable part of a second to import.
        from coordinator.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(config.kubernetes)
    raise ValueError(f"unknown discovery backend {config.backend!r}")
