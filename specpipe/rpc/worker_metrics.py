"""A worker's Prometheus metrics: its model forwards' durations, and its GetStats counters at scrape time.

The forward histogram is fed by the model runner (one observation per forward: a verify, or one draft step);
everything else is read from the servicer when Prometheus scrapes, so serving requests pays nothing for it.
Every metric carries the worker's `role` ("draft" or "target").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specpipe.errors import UnavailableError
from specpipe.rpc.worker_servicer import WorkerServicerBase
from specpipe.v1 import common_pb2

# Seconds: a draft step on a GPU (~1 ms) to a long prefill on a CPU.
FORWARD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# WorkerStats field -> (metric name, help); gauges are levels, counters only grow.
GAUGES = {
    "cached_sessions": ("specpipe_worker_cached_sessions", "Sessions whose KV cache the worker holds."),
    "cache_bytes": ("specpipe_worker_cache_bytes", "Bytes of KV cache held across sessions."),
    "open_streams": ("specpipe_worker_open_streams", "Session streams (and delegated calls) open now."),
    "cuda_graphs": ("specpipe_worker_cuda_graphs", "Workers with static KV slots: CUDA graphs captured."),
}
COUNTERS = {
    "evictions": ("specpipe_worker_cache_evictions", "Session caches evicted to respect the budget."),
    "shared_prefixes": (
        "specpipe_worker_shared_prefixes",
        "Prefix sharing: session caches started from another session's cached prefix.",
    ),
    "shared_prefix_tokens": (
        "specpipe_worker_shared_prefix_tokens",
        "Prefix sharing: positions copied from another session's cache rather than computed.",
    ),
    "kv_slot_takeovers": (
        "specpipe_worker_kv_slot_takeovers",
        "Workers with static KV slots: slots taken from a session that still held one (it is rebuilt).",
    ),
    "chained_verifies": ("specpipe_worker_chained_verifies", "Targets: chained blocks verified."),
    "chained_skips": (
        "specpipe_worker_chained_skips",
        "Targets: chained blocks skipped (assumption failed).",
    ),
    "direct_streams": ("specpipe_worker_direct_streams", "Targets: direct streams served."),
    "delegated_rounds": ("specpipe_worker_delegated_rounds", "Drafts: rounds run for delegated requests."),
    "batched_passes": (
        "specpipe_worker_batched_passes",
        "Workers with cross-session batching: passes the batcher ran.",
    ),
    "batched_blocks": (
        "specpipe_worker_batched_blocks",
        "Workers with cross-session batching: calls those passes served (verified or drafted blocks; over "
        "passes: the mean batch).",
    ),
}
ROLE_COUNTERS = {
    "target": ("chained_verifies", "chained_skips", "direct_streams", "batched_passes", "batched_blocks"),
    "draft": ("delegated_rounds", "batched_passes", "batched_blocks"),
}


class WorkerStatsCollector(Collector):
    """Reads the worker's stats at each scrape (nothing while the model loads)."""

    def __init__(self, role: str, stats: Callable[[], common_pb2.WorkerStats], model_jobs: Callable[[], int]):
        self.role = role
        self.stats = stats
        self.model_jobs = model_jobs

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats()
        except UnavailableError:
            return
        for field, (name, documentation) in GAUGES.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["role"])
            gauge.add_metric([self.role], float(getattr(stats, field)))
            yield gauge
        jobs = GaugeMetricFamily(
            "specpipe_worker_model_jobs", "Jobs queued for or running on the model thread.", labels=["role"]
        )
        jobs.add_metric([self.role], float(self.model_jobs()))
        yield jobs
        shared = ("shared_prefixes", "shared_prefix_tokens")
        for field in ("evictions", "kv_slot_takeovers", *shared, *ROLE_COUNTERS.get(self.role, ())):
            name, documentation = COUNTERS[field]
            counter = CounterMetricFamily(name, documentation, labels=["role"])
            counter.add_metric([self.role], float(getattr(stats, field)))
            yield counter


class WorkerMetrics:
    def __init__(
        self, role: str, stats: Callable[[], common_pb2.WorkerStats], model_jobs: Callable[[], int]
    ) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._forward_seconds = Histogram(
            "specpipe_worker_forward_seconds",
            "Model forward passes (a verify, a draft step, a prefill), as timed by the runner.",
            ["role"],
            buckets=FORWARD_BUCKETS,
            registry=self.registry,
        ).labels(role=role)
        self.registry.register(WorkerStatsCollector(role, stats, model_jobs))

    def observe_forward(self, forward_ns: int) -> None:
        """Called by the model runner after each forward, on the model thread (the histogram is
        thread-safe)."""
        self._forward_seconds.observe(forward_ns / 1e9)


def served_worker_metrics(
    role: str, servicer: WorkerServicerBase[Any], metrics_port: int
) -> WorkerMetrics | None:
    """The worker's metrics when it serves them (metrics_port >= 0), else None: then no observer runs on the
    forward."""
    if metrics_port < 0:
        return None
    return WorkerMetrics(role, servicer.stats, lambda: servicer.model_jobs)
