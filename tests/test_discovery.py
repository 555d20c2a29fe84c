"""Discovery backends: static, DNS (fake resolver and a real lookup), Kubernetes (a fake API server that
serves recorded EndpointSlice list/watch responses and pods in the real API's JSON format)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from coordinator.cluster_config import (
    DiscoveryConfig,
    DnsName,
    KubernetesDiscovery,
    StaticReplica,
)
from coordinator.discovery.base import Endpoint
from coordinator.discovery.dns import DnsDiscovery, host_port
from coordinator.discovery.factory import make_discovery
from coordinator.discovery.static import StaticDiscovery
from tests.fake_kube_api import NAMESPACE, SLICES_PATH, STEP_S, FakeKubeApi, load_events, load_json

# As the Helm chart renders it: the release's slices, the coordinator's included (its role is ignored).
SELECTOR = "app.kubernetes.io/name=specpipe,app.kubernetes.io/instance=rel"

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout_s)

    return asyncio.run(bounded())


async def next_set(updates: AsyncIterator[frozenset[Endpoint]]) -> frozenset[Endpoint]:
    return await asyncio.wait_for(anext(updates), STEP_S)


def draft(address: str, pool: str = "default") -> Endpoint:
    return Endpoint("draft", address, pool)


def target(address: str, pool: str = "default") -> Endpoint:
    return Endpoint("target", address, pool)


# The ready worker endpoints of endpointslices-list.json: w9lmx is still starting, the coordinator's slice
# is no worker role, and the draft pod carries no pool label.
LISTED = {
    draft("10.244.1.17:50061"),
    target("10.244.2.31:50062", "h100"),
    target("10.244.3.12:50062", "a10g"),
}


# --- static ---------------------------------------------------------------------------------------


def test_static_yields_its_replicas_once_and_then_waits() -> None:
    replicas = [
        StaticReplica("target", "10.0.0.5:50062", "h100"),
        StaticReplica("draft", "10.0.0.9:50061"),
    ]

    async def main() -> None:
        updates = StaticDiscovery(replicas).watch()
        assert await next_set(updates) == {target("10.0.0.5:50062", "h100"), draft("10.0.0.9:50061")}
        pending = asyncio.ensure_future(anext(updates))
        done, _ = await asyncio.wait({pending}, timeout=0.2)
        assert not done, "a static set never changes"
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending

    run(main)


# --- DNS ------------------------------------------------------------------------------------------


def test_host_port_brackets_ipv6_only() -> None:
    assert host_port("10.1.2.3", 50062) == "10.1.2.3:50062"
    assert host_port("fd00::12", 50062) == "[fd00::12]:50062"
    assert host_port("fe80::1%eth0", 1) == "[fe80::1%eth0]:1"
    assert host_port("worker-0.example", 50062) == "worker-0.example:50062"


class ScriptedResolver:
    """Answers each host from a script, one entry per lookup; the last entry repeats."""

    def __init__(self, script: dict[str, Sequence[Sequence[str] | BaseException]]) -> None:
        self.script = {host: list(steps) for host, steps in script.items()}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        steps = self.script[host]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(step, BaseException):
            raise step
        return step


def nxdomain() -> socket.gaierror:
    return socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_dns_follows_records_keeps_addresses_on_errors_and_empties_on_nxdomain() -> None:
    h100 = "rel-specpipe-target-h100.specpipe.svc.cluster.local"
    cpu = "rel-specpipe-draft.specpipe.svc.cluster.local"
    resolver = ScriptedResolver(
        {
            h100: [
                ["10.244.2.31"],
                ["10.244.2.31"],  # unchanged: nothing is reported
                ["10.244.2.31", "10.244.2.40", "fd00::2:28"],  # scale-up, dual-stack
                socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),  # keeps its set
                TimeoutError(),  # keeps its set
                ["10.244.2.40"],
                nxdomain(),  # no ready pods left: no replicas
                ["10.244.2.52"],
            ],
            cpu: [["10.244.1.17"]],
        }
    )
    names = [DnsName("target", h100, 50062, "h100"), DnsName("draft", cpu, 50061)]
    cpu_draft = draft("10.244.1.17:50061")

    async def main() -> list[frozenset[Endpoint]]:
        discovery = DnsDiscovery(names, refresh_interval_s=0.01, resolver=resolver)
        async with contextlib.aclosing(discovery.watch()) as updates:
            return [await next_set(updates) for _ in range(5)]

    sets = run(main)
    assert sets == [
        {target("10.244.2.31:50062", "h100"), cpu_draft},
        {
            target("10.244.2.31:50062", "h100"),
            target("10.244.2.40:50062", "h100"),
            target("[fd00::2:28]:50062", "h100"),
            cpu_draft,
        },
        {target("10.244.2.40:50062", "h100"), cpu_draft},
        {cpu_draft},
        {target("10.244.2.52:50062", "h100"), cpu_draft},
    ]
    assert (h100, 50062) in resolver.calls and (cpu, 50061) in resolver.calls


def test_dns_name_that_never_resolved_contributes_nothing_until_it_does() -> None:
    resolver = ScriptedResolver(
        {
            "a": [socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), ["10.0.0.1"]],
            "b": [nxdomain(), nxdomain(), ["10.0.0.2"]],
        }
    )
    names = [DnsName("target", "a", 1), DnsName("draft", "b", 2)]

    async def main() -> list[frozenset[Endpoint]]:
        discovery = DnsDiscovery(names, refresh_interval_s=0.01, resolver=resolver)
        async with contextlib.aclosing(discovery.watch()) as updates:
            return [await next_set(updates) for _ in range(3)]

    assert run(main) == [
        frozenset(),
        {target("10.0.0.1:1")},
        {target("10.0.0.1:1"), draft("10.0.0.2:2")},
    ]


def test_dns_lookup_that_hangs_times_out_and_keeps_the_last_addresses() -> None:
    calls = 0

    async def resolver(host: str, port: int) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 2:
            await asyncio.sleep(3600)  # a DNS server that never answers
        return ["10.0.0.1"] if calls < 4 else ["10.0.0.2"]

    async def main() -> list[frozenset[Endpoint]]:
        discovery = DnsDiscovery([DnsName("target", "t", 1)], 0.01, resolver=resolver, timeout_s=0.05)
        async with contextlib.aclosing(discovery.watch()) as updates:
            return [await next_set(updates) for _ in range(2)]

    assert run(main) == [{target("10.0.0.1:1")}, {target("10.0.0.2:1")}]
    assert calls >= 4


def test_dns_resolves_localhost_through_the_system_resolver() -> None:
    async def main() -> frozenset[Endpoint]:
        discovery = DnsDiscovery([DnsName("target", "localhost", 50062, "local")], refresh_interval_s=60)
        async with contextlib.aclosing(discovery.watch()) as updates:
            return await next_set(updates)

    endpoints = run(main)
    addresses = {e.address for e in endpoints}
    assert "127.0.0.1:50062" in addresses
    assert addresses <= {"127.0.0.1:50062", "[::1]:50062"}
    assert {(e.role, e.pool) for e in endpoints} == {("target", "local")}


# --- Kubernetes: a fake API server ----------------------------------------------------------------


@pytest.fixture
def kube_api() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    yield api
    api.close()


def k8s_discovery(url: str, **kwargs: Any) -> Any:
    from coordinator.discovery.kubernetes import KubernetesDiscovery as Backend

    config = KubernetesDiscovery(namespace=NAMESPACE, label_selector=SELECTOR, api_url=url)
    return Backend(config, watch_timeout_s=60, request_timeout_s=2.0, backoff_initial_s=0.05, **kwargs)


def discovery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "specpipe-k8s-discovery"]


def wait_for_no_discovery_threads() -> None:
    deadline = time.monotonic() + STEP_S
    while discovery_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not discovery_threads(), "cancelling watch() must end its thread"


# --- Kubernetes: the tests ------------------------------------------------------------------------


def test_kubernetes_lists_then_follows_watch_events(kube_api: FakeKubeApi) -> None:
    kube_api.lists.put((200, load_json("endpointslices-list.json")))
    kube_api.lists.put((200, load_json("endpointslices-relist.json")))
    watch_1 = load_events("watch-from-48213.jsonl")
    watch_2 = load_events("watch-from-48390.jsonl")

    async def main() -> None:
        async with contextlib.aclosing(k8s_discovery(kube_api.url).watch()) as updates:
            # The list: ready endpoints only (w9lmx is still starting); the coordinator's slice is not a
            # worker role; pools from the pods' labels, "default" for the draft pod, which has none (it
            # is behind a hand-written Service, not one of the chart's per-pool ones).
            assert await next_set(updates) == LISTED
            stream = await kube_api.next_watch()
            assert stream.request.query == {
                "labelSelector": SELECTOR,
                "watch": "true",
                "resourceVersion": "48213",
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "60",
            }
            stream.send(watch_1[0])  # scale-up: the starting h100 replica becomes ready
            assert await next_set(updates) == {
                draft("10.244.1.17:50061"),
                target("10.244.2.31:50062", "h100"),
                target("10.244.2.40:50062", "h100"),
                target("10.244.3.12:50062", "a10g"),
            }
            stream.send(watch_1[1])  # qz4wm terminates: ready false
            assert await next_set(updates) == {
                draft("10.244.1.17:50061"),
                target("10.244.2.40:50062", "h100"),
                target("10.244.3.12:50062", "a10g"),
            }
            stream.send(watch_1[2])  # a bookmark: no change, but the watch resumes from it
            stream.end()
            stream = await kube_api.next_watch()
            assert stream.request.query["resourceVersion"] == "48390"
            stream.send(watch_2[0])  # the hand-written draft Service is deleted, and its slice
            assert await next_set(updates) == {
                target("10.244.2.40:50062", "h100"),
                target("10.244.3.12:50062", "a10g"),
            }
            stream.send(watch_2[1])  # 410 Gone: re-list (now with the chart's draft pool), watch from it
            assert await next_set(updates) == {
                draft("10.244.1.23:50061", "cpu"),
                target("10.244.2.40:50062", "h100"),
                target("10.244.3.12:50062", "a10g"),
            }
            stream = await kube_api.next_watch()
            assert stream.request.query["resourceVersion"] == "48911"
        wait_for_no_discovery_threads()

    run(main)
    requests = kube_api.slice_requests()
    assert [(r.is_watch, r.query.get("resourceVersion")) for r in requests] == [
        (False, None),
        (True, "48213"),
        (True, "48390"),
        (False, None),
        (True, "48911"),
    ]
    assert all(r.query["labelSelector"] == SELECTOR for r in requests)
    assert all(r.authorization is None for r in kube_api.requests)
    # Each pod is read once, when one of its endpoints is first ready; the re-list reuses the cache.
    assert sorted(kube_api.pod_gets()) == [
        "rel-specpipe-draft-cpu-7d9f8c6b5-k2x8q",
        "rel-specpipe-draft-cpu-7d9f8c6b5-m4pzt",
        "rel-specpipe-target-a10g-6c9b7d8f4-r7tnp",
        "rel-specpipe-target-h100-5b8d6f7c9-qz4wm",
        "rel-specpipe-target-h100-5b8d6f7c9-w9lmx",
    ]


def test_kubernetes_retries_server_errors_and_keeps_the_last_set(kube_api: FakeKubeApi) -> None:
    status_500 = load_json("status-500.json")
    listed = load_json("endpointslices-list.json")
    kube_api.lists.put((500, status_500))  # the first list fails
    kube_api.lists.put((200, listed))
    kube_api.lists.put((200, listed))
    kube_api.watch_failures.put((500, status_500))  # so does the first watch

    async def main() -> None:
        async with contextlib.aclosing(k8s_discovery(kube_api.url).watch()) as updates:
            assert await next_set(updates) == LISTED
            # The failed watch is followed by a re-list of the same slices (not reported again) and a
            # watch whose first event is the next set the consumer sees.
            stream = await kube_api.next_watch()
            stream.send(load_events("watch-a10g-not-ready.jsonl")[0])
            assert await next_set(updates) == {
                draft("10.244.1.17:50061"),
                target("10.244.2.31:50062", "h100"),
            }
        wait_for_no_discovery_threads()

    run(main)
    assert [r.is_watch for r in kube_api.slice_requests()] == [False, False, True, False, True]


def test_kubernetes_endpoint_of_a_deleted_pod_is_left_out(kube_api: FakeKubeApi) -> None:
    del kube_api.pods["rel-specpipe-target-a10g-6c9b7d8f4-r7tnp"]
    kube_api.lists.put((200, load_json("endpointslices-list.json")))

    async def main() -> frozenset[Endpoint]:
        async with contextlib.aclosing(k8s_discovery(kube_api.url).watch()) as updates:
            return await next_set(updates)

    assert run(main) == {draft("10.244.1.17:50061"), target("10.244.2.31:50062", "h100")}


def test_kubernetes_uses_the_kubeconfig_credentials_and_namespace(
    kube_api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.discovery import kubernetes as k8s_backend

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": kube_api.url}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [
                    {"name": "dev", "context": {"cluster": "fake", "user": "tester", "namespace": NAMESPACE}}
                ],
                "current-context": "dev",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(k8s_backend, "NAMESPACE_FILE", str(tmp_path / "no-such-file"))
    kube_api.lists.put((200, load_json("endpointslices-list.json")))
    discovery = make_discovery(
        DiscoveryConfig(backend="kubernetes", kubernetes=KubernetesDiscovery(label_selector=SELECTOR))
    )
    assert isinstance(discovery, k8s_backend.KubernetesDiscovery)
    assert discovery.namespace == NAMESPACE

    async def main() -> frozenset[Endpoint]:
        async with contextlib.aclosing(discovery.watch()) as updates:
            return await next_set(updates)

    assert len(run(main)) == 3
    assert kube_api.requests[0].path == SLICES_PATH
    assert {r.authorization for r in kube_api.requests} == {"Bearer test-token"}


def test_kubernetes_namespace_falls_back_to_the_service_account_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.discovery import kubernetes as k8s_backend

    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("workers\n")
    monkeypatch.setattr(k8s_backend, "NAMESPACE_FILE", str(namespace_file))
    config = KubernetesDiscovery(api_url="http://127.0.0.1:1")
    assert k8s_backend.KubernetesDiscovery(config).namespace == "workers"
    assert (
        k8s_backend.KubernetesDiscovery(KubernetesDiscovery(namespace="ns", api_url="http://x")).namespace
        == "ns"
    )
    monkeypatch.setattr(k8s_backend, "NAMESPACE_FILE", str(tmp_path / "absent"))
    assert k8s_backend.KubernetesDiscovery(config).namespace == "default"


def test_slice_endpoints_readiness_ports_addresses_and_pools() -> None:
    from coordinator.discovery.kubernetes import slice_endpoints

    pools = {"p1": "h100"}

    def pool_of(ref: dict[str, Any] | None) -> str | None:
        if ref is None or ref.get("kind") != "Pod":
            return "default"
        return pools.get(ref["name"], "default")

    slice_ = {
        "metadata": {"name": "s", "labels": {"app.kubernetes.io/component": "target"}},
        "addressType": "IPv6",
        "endpoints": [
            {
                "addresses": ["fd00::1"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": "p1"},
            },
            {"addresses": ["fd00::2"], "conditions": {}},  # ready absent: "interpreted as true"
            {"addresses": ["fd00::3"], "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": ["fd00::4"], "targetRef": {"kind": "Node", "name": "n1"}},
        ],
        "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50062, "protocol": "TCP"}],
    }
    role_label = "app.kubernetes.io/component"
    assert slice_endpoints(slice_, role_label, "grpc", pool_of) == {
        target("[fd00::1]:50062", "h100"),
        target("[fd00::2]:50062"),
        target("[fd00::4]:50062"),
    }
    assert slice_endpoints(slice_, role_label, "http", pool_of) == set()
    unnamed = {**slice_, "ports": [{"port": 7000}]}
    assert len(slice_endpoints(unnamed, role_label, "", pool_of)) == 3
    other_role = {**slice_, "metadata": {"labels": {role_label: "coordinator"}}}
    assert slice_endpoints(other_role, role_label, "grpc", pool_of) == set()


# --- factory --------------------------------------------------------------------------------------


def test_make_discovery_picks_the_backend() -> None:
    static = DiscoveryConfig(static=(StaticReplica("target", "10.0.0.5:50062"),))
    assert isinstance(make_discovery(static), StaticDiscovery)
    dns = DiscoveryConfig(backend="dns", dns=(DnsName("target", "localhost", 50062),))
    assert isinstance(make_discovery(dns), DnsDiscovery)
