"""The coordinator follows Kubernetes discovery end to end: real workers, a fake API server serving their
EndpointSlices; a target added by a watch event takes sessions, one that turns not-ready stops getting them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from specpipe.client import CoordinatorClient, build_request
from specpipe.launcher import ServiceProcess, free_port, stop_all
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, service_env, target_holders, worker_process
from tests.fake_kube_api import NAMESPACE, STEP_S, FakeKubeApi
from tests.prompts import PROMPTS

SELECTOR = "app.kubernetes.io/name=specpipe,app.kubernetes.io/instance=rel"


def pod(name: str, role: str, pool: str) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "specpipe",
        "app.kubernetes.io/instance": "rel",
        "app.kubernetes.io/component": role,
        "specpipe.io/pool": pool,
    }
    return {"metadata": {"name": name, "namespace": NAMESPACE, "uid": str(uuid.uuid4()), "labels": labels}}


def endpoint_slice(
    service: ServiceProcess, pod_doc: dict[str, Any], version: int, ready: bool = True
) -> dict[str, Any]:
    """The EndpointSlice the controller keeps for a one-pod headless Service of this worker."""
    host, port = service.address.rsplit(":", 1)
    meta = pod_doc["metadata"]
    role = meta["labels"]["app.kubernetes.io/component"]
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"{meta['name']}-slice",
            "namespace": NAMESPACE,
            "resourceVersion": str(version),
            "labels": {
                "app.kubernetes.io/name": "specpipe",
                "app.kubernetes.io/instance": "rel",
                "app.kubernetes.io/component": role,
                "kubernetes.io/service-name": f"rel-specpipe-{role}-{meta['labels']['specpipe.io/pool']}",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [host],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": {
                    "kind": "Pod",
                    "namespace": NAMESPACE,
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        ],
        "ports": [{"name": "grpc", "port": int(port), "protocol": "TCP"}],
    }


@pytest.fixture
def kube_api() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    yield api
    api.close()


def test_coordinator_follows_endpointslice_events(
    model_pair: ModelPair, redis_server: RedisServerProcess, kube_api: FakeKubeApi, tmp_path: Path
) -> None:
    draft = worker_process("draft", model_pair.draft_dir, tmp_path, "draft-cpu-0")
    targets = [worker_process("target", model_pair.target_dir, tmp_path, f"target-{i}") for i in range(2)]
    pods = [pod("rel-draft-cpu-0", "draft", "cpu"), pod("rel-target-h100-0", "target", "h100"),
            pod("rel-target-l4-0", "target", "l4")]  # fmt: skip
    kube_api.pods = {p["metadata"]["name"]: p for p in pods}
    kube_api.lists.put(
        (
            200,
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": "100"},
                "items": [endpoint_slice(draft, pods[0], 90), endpoint_slice(targets[0], pods[1], 91)],
            },
        )
    )
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(
        yaml.safe_dump(
            {
                "pools": {"h100": {"weight": 4}, "l4": {"weight": 1}},
                "discovery": {
                    "backend": "kubernetes",
                    "kubernetes": {
                        "namespace": NAMESPACE,
                        "label_selector": SELECTOR,
                        "api_url": kube_api.url,
                    },
                },
                "health": {"interval_s": 0.5},
            }
        )
    )
    port = free_port()
    coordinator = ServiceProcess(
        "coordinator",
        f"127.0.0.1:{port}",
        ["--port", str(port), "--cluster-config", str(cluster_file), "--redis-url", redis_server.url],
        tmp_path / "coordinator.log",
    )
    services = [draft, *targets, coordinator]
    try:
        for service in (draft, *targets):
            service.start(service_env())
        for service in (draft, *targets):
            service.wait_serving(120)
        coordinator.start(service_env())
        coordinator.wait_serving(120)
        with CoordinatorClient(coordinator.address) as client:

            def new_session_home() -> list[int]:
                result = client.generate(build_request(PROMPTS[0], 4), 60)
                return target_holders(targets, result.session_id)

            assert all(new_session_home() == [0] for _ in range(4))  # only target 0 is discovered

            # Scale-up: the second target's slice appears; its pool comes from its pod's label.
            watch = kube_api.watches.get(timeout=STEP_S)
            watch.send({"type": "ADDED", "object": endpoint_slice(targets[1], pods[2], 101)})
            deadline = time.monotonic() + 30
            while new_session_home() != [1]:
                assert time.monotonic() < deadline, coordinator.log_tail()
            assert f"target replica {targets[1].address} (pool l4" in coordinator.log_tail(200)

            # Target 0's pod turns not-ready: it leaves rotation, every new session goes to target 1.
            watch.send({"type": "MODIFIED", "object": endpoint_slice(targets[0], pods[1], 102, ready=False)})
            deadline = time.monotonic() + 30
            while "removed by discovery" not in coordinator.log_tail(200):
                assert time.monotonic() < deadline, coordinator.log_tail()
                time.sleep(0.1)
            assert all(new_session_home() == [1] for _ in range(4))
    finally:
        stop_all(services)
