"""The Helm chart deploy/helm/specpipe, linted and rendered by the real Helm v4 engine (helm-python-sdk).

Offline and fast: no cluster, no helm binary. Every rendered manifest is validated (strict: unknown fields
fail) against the schemas of a pinned Kubernetes version with kubernetes-validate. helm_python and
kubernetes_validate are dev dependencies: a missing one fails these tests, it does not skip them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from coordinator.cluster_config import ClusterConfig

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "specpipe"
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
# The Kubernetes release the rendered manifests are validated against (kubernetes-validate ships it).
KUBE_VERSION = "1.35.0"
RELEASE = "demo"
NAMESPACE = "inference"
FULLNAME = f"{RELEASE}-specpipe"
VALUE_SETS = ["default", *CI_VALUES]
SPECPIPE_COMPONENTS = ("coordinator", "draft", "target")


# --- rendering -------------------------------------------------------------------------------------------


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def values_of(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / name).read_text(encoding="utf-8")) or {}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (hooks included, NOTES.txt excluded), in template order."""
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_template", template)
                docs.append(doc)
    return docs


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(values_of(name)))


def rendered(name: str) -> list[dict[str, Any]]:
    return list(_rendered(name))


def manifest(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_template"}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    )
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return (
        doc["metadata"]["labels"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]["labels"]
    )


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Pod")]


def container(doc: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(doc)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def args_of(c: dict[str, Any]) -> dict[str, str]:
    """--flag=value arguments as a mapping (bare flags map to "")."""
    out = {}
    for arg in c.get("args", []):
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            out[key] = value
    return out


def gpu_count(c: dict[str, Any]) -> tuple[Any, Any]:
    resources = c.get("resources", {})
    return (
        resources.get("requests", {}).get("nvidia.com/gpu"),
        resources.get("limits", {}).get("nvidia.com/gpu"),
    )


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def null_paths(node: Any, path: str = "") -> Any:
    """Where a manifest holds null (an empty `env:` or `volumes:` left by a template)."""
    if node is None:
        yield path
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from null_paths(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from null_paths(value, f"{path}[{i}]")


def schema_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return str(info.value)


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmRenderError) as info:
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return str(info.value)


# --- lint and validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_passes(value_set: str) -> None:
    report = helm_python.lint(
        str(CHART), values_of(value_set), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_ci_values_files_exist() -> None:
    assert {
        "cpu-single-pool-values.yaml",
        "two-gpu-pools-values.yaml",
        "external-redis-tls-values.yaml",
    } <= set(CI_VALUES)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates_against_kubernetes(value_set: str) -> None:
    docs = rendered(value_set)
    assert len(docs) >= 10
    for doc in docs:
        where = f"{doc['_template']}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["namespace"] == NAMESPACE, where
        nulls = list(null_paths(manifest(doc)))
        assert not nulls, f"{where}: null values at {nulls}"
        try:
            kubernetes_validate.validate(manifest(doc), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{value_set}: {where}: {exc.message} at {'.'.join(map(str, exc.path))}")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_object_names_are_unique_and_dns_labels(value_set: str) -> None:
    docs = rendered(value_set)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), keys
    for kind, name in keys:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, (kind, name)


# --- components ------------------------------------------------------------------------------------------


def test_default_values_describe_a_small_gpu_cluster() -> None:
    docs = rendered("default")
    deployments = {d["metadata"]["name"] for d in find(docs, "Deployment")}
    assert deployments == {f"{FULLNAME}-coordinator", f"{FULLNAME}-target-gpu", f"{FULLNAME}-draft-cpu"}

    target = one(docs, "Deployment", f"{FULLNAME}-target-gpu")
    c = container(target)
    assert gpu_count(c) == (1, 1)
    assert args_of(c)["--device"] == "cuda"
    assert c["image"] == "ghcr.io/specpipe/specpipe:0.1.0-cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(target)[
        "tolerations"
    ]

    draft = one(docs, "Deployment", f"{FULLNAME}-draft-cpu")
    c = container(draft)
    assert gpu_count(c) == (None, None)
    assert args_of(c)["--device"] == "cpu"
    assert c["image"] == "ghcr.io/specpipe/specpipe:0.1.0"
    assert "tolerations" not in pod_spec(draft)

    # The shipped demo pair inside the image: no model volume needed.
    assert args_of(container(target))["--model"].endswith("/specpipe/assets/demo-pair/target")
    assert args_of(container(draft))["--model"].endswith("/specpipe/assets/demo-pair/draft")
    assert not [v for v in pod_spec(target)["volumes"] if v["name"] == "models"]

    # The built-in session store, with a generated password the coordinator reads from a file.
    redis = one(docs, "StatefulSet", f"{FULLNAME}-redis")
    assert container(redis)["image"] == "valkey/valkey:8"
    one(docs, "Service", f"{FULLNAME}-redis")
    secret = one(docs, "Secret", f"{FULLNAME}-redis")
    assert secret["data"]["password"]
    coordinator = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert args_of(coordinator)["--redis-url"] == f"redis://{FULLNAME}-redis:6379/0"
    assert args_of(coordinator)["--redis-password-file"] == "/etc/specpipe/redis-auth/password"


def test_image_tag_defaults_to_app_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    for doc in workloads(rendered("default")):
        image = container(doc)["image"]
        if image.startswith("ghcr.io/specpipe/specpipe:"):
            assert image.split(":")[1] in (meta["appVersion"], meta["appVersion"] + "-cuda"), image


def test_gpu_pool_settings_land_on_the_right_deployments() -> None:
    docs = rendered("two-gpu-pools-values.yaml")
    h100 = one(docs, "Deployment", f"{FULLNAME}-target-h100")
    l4 = one(docs, "Deployment", f"{FULLNAME}-target-l4")
    draft = one(docs, "Deployment", f"{FULLNAME}-draft-cpu")

    spec = pod_spec(h100)
    assert h100["spec"]["replicas"] == 2
    assert spec["nodeSelector"] == {"specpipe.io/gpu": "h100"}
    assert {"key": "specpipe.io/gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["affinity"]["podAntiAffinity"]
    c = container(h100)
    assert gpu_count(c) == (1, 1)
    assert args_of(c)["--device"] == "cuda" and args_of(c)["--dtype"] == "bfloat16"
    assert args_of(c)["--model"] == "/models/qwen2.5-3b-instruct"
    assert c["resources"]["requests"]["cpu"] == "8"
    assert c["image"] == "registry.example.com/ml/specpipe:0.1.0-cuda"
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "specpipe-models", "readOnly": True}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True

    spec = pod_spec(l4)
    assert l4["spec"]["replicas"] == 3
    assert spec["nodeSelector"] == {"specpipe.io/gpu": "l4"}
    assert {"key": "specpipe.io/gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["runtimeClassName"] == "nvidia"
    assert "affinity" not in spec
    c = container(l4)
    assert gpu_count(c) == (1, 1)
    assert args_of(c)["--dtype"] == "bfloat16" and args_of(c)["--kv-cache-budget-mb"] == "8192"
    # The download source: an init container fills an emptyDir the server mounts read-only.
    (init,) = spec["initContainers"]
    init_env = env_of(init)
    assert init_env["SPECPIPE_MODEL_REPO"] == "Qwen/Qwen2.5-3B-Instruct"
    assert init_env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert init_env["HF_HUB_OFFLINE"] == "0"  # the image defaults to offline; this one downloads
    assert gpu_count(init) == (None, None)
    assert next(v for v in spec["volumes"] if v["name"] == "models")["emptyDir"] == {"sizeLimit": "20Gi"}
    assert args_of(c)["--model"] == init_env["SPECPIPE_MODEL_DIR"] == "/models"

    # The CPU draft pool gets none of the GPU settings.
    spec = pod_spec(draft)
    assert draft["spec"]["replicas"] == 2
    for key in ("nodeSelector", "tolerations", "runtimeClassName", "affinity", "initContainers"):
        assert key not in spec, key
    c = container(draft)
    assert gpu_count(c) == (None, None)
    assert args_of(c)["--device"] == "cpu" and args_of(c)["--threads"] == "4"
    assert c["image"] == "registry.example.com/ml/specpipe:0.1.0"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_only_gpu_pools_request_gpus(value_set: str) -> None:
    docs = rendered(value_set)
    for doc in workloads(docs):
        component = pod_labels(doc)["app.kubernetes.io/component"]
        for c in pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", []):
            requests, limits = gpu_count(c)
            if component in ("draft", "target") and c["name"] == component and requests:
                assert requests == limits >= 1
                assert args_of(c)["--device"] == "cuda"
            else:
                assert (requests, limits) == (None, None), (value_set, doc["metadata"]["name"], c["name"])
    coordinator = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert "nvidia.com/gpu" not in str(coordinator["resources"])
    assert "runtimeClassName" not in pod_spec(one(docs, "Deployment", f"{FULLNAME}-coordinator"))


def test_coordinator_cannot_request_a_gpu() -> None:
    message = render_error({"coordinator": {"resources": {"limits": {"nvidia.com/gpu": 1}}}})
    assert (
        "coordinator.resources.limits: the coordinator runs on CPU and never requests nvidia.com/gpu"
        in message
    )


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_specpipe_container_has_native_grpc_probes(value_set: str) -> None:
    docs = rendered(value_set)
    checked = 0
    for doc in find(docs, "Deployment"):
        component = pod_labels(doc)["app.kubernetes.io/component"]
        assert component in SPECPIPE_COMPONENTS
        c = container(doc, component)
        (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (component, probe)
            assert c[probe]["grpc"] == {"port": port}
        startup = c["startupProbe"]
        # Long enough for model loading and warm-up (coordinator: pairing with workers).
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, component
        checked += 1
    assert checked >= 3


def test_worker_ports_and_args() -> None:
    docs = rendered("default")
    for role, port in (("draft", 50061), ("target", 50062)):
        doc = next(
            d for d in find(docs, "Deployment") if pod_labels(d)["app.kubernetes.io/component"] == role
        )
        c = container(doc)
        assert c["args"][:2] == ["serve", role]
        args = args_of(c)
        assert args["--host"] == "0.0.0.0" and args["--port"] == str(port)
        assert args["--max-speculative-tokens"] == "16"
        assert c["ports"][0] == {"name": "grpc", "containerPort": port, "protocol": "TCP"}
        # Then metrics, and on targets direct streams (their own tests).
        assert [p["name"] for p in c["ports"]] == (
            ["grpc", "direct", "metrics"] if role == "target" else ["grpc", "metrics"]
        )
    c = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert c["args"][:2] == ["serve", "coordinator"]
    args = args_of(c)
    assert args["--port"] == "50051" and args["--cluster-config"] == "/etc/specpipe/cluster.yaml"
    assert "--adaptive-k" in args and "--pipelining" in args and "--chaining" in args
    assert "--delegation" in args and args["--adaptive-k-rule"] == "cost"
    heuristic = render({"coordinator": {"adaptiveKRule": "hf-heuristic"}})
    assert args_of(container(one(heuristic, "Deployment", f"{FULLNAME}-coordinator")))[
        "--adaptive-k-rule"
    ] == ("hf-heuristic")
    assert "adaptiveKRule" in schema_error({"coordinator": {"adaptiveKRule": "fastest"}})
    assert args["--max-concurrent-requests"] == "256"
    limited = render({"coordinator": {"maxConcurrentRequests": 32}})
    assert (
        args_of(container(one(limited, "Deployment", f"{FULLNAME}-coordinator")))["--max-concurrent-requests"]
        == "32"
    )
    assert "maxConcurrentRequests" in schema_error({"coordinator": {"maxConcurrentRequests": 0}})
    assert args["--max-waiting-requests"] == "0"
    waiting = render({"coordinator": {"maxWaitingRequests": 64}})
    assert (
        args_of(container(one(waiting, "Deployment", f"{FULLNAME}-coordinator")))["--max-waiting-requests"]
        == "64"
    )
    assert "maxWaitingRequests" in schema_error({"coordinator": {"maxWaitingRequests": -1}})


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_worker_services_are_headless_and_labelled_for_discovery(value_set: str) -> None:
    docs = rendered(value_set)
    workers = [
        d for d in find(docs, "Deployment") if pod_labels(d)["app.kubernetes.io/component"] != "coordinator"
    ]
    assert workers
    for deployment in workers:
        name = deployment["metadata"]["name"]
        labels = pod_labels(deployment)
        role, pool = labels["app.kubernetes.io/component"], labels["specpipe.io/pool"]
        assert name == f"{FULLNAME}-{role}-{pool}"
        assert labels["app.kubernetes.io/name"] == "specpipe"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = one(docs, "Service", name)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is False
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"):
            assert service["metadata"]["labels"][key] == labels[key]
        assert service["metadata"]["labels"]["specpipe.io/pool"] == pool
        (port,) = service["spec"]["ports"]
        assert port["name"] == "grpc" and port["targetPort"] == "grpc"
        assert port["port"] == (50061 if role == "draft" else 50062)


# --- the coordinator's cluster file ----------------------------------------------------------------------


def cluster_config(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], ClusterConfig]:
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-coordinator")
    raw = yaml.safe_load(configmap["data"]["cluster.yaml"])
    return raw, ClusterConfig.from_dict(raw)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_cluster_config_parses_and_names_every_pool(value_set: str) -> None:
    docs = rendered(value_set)
    _, config = cluster_config(docs)
    pools = {
        pod_labels(d)["specpipe.io/pool"]
        for d in find(docs, "Deployment")
        if pod_labels(d)["app.kubernetes.io/component"] in ("draft", "target")
    }
    assert {p.name for p in config.pools} == pools
    # The coordinator mounts the file at the path it is told to read.
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "cluster-config")
    assert mount["mountPath"] == args_of(container(deployment))["--cluster-config"]
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "cluster-config")
    assert volume["configMap"]["name"] == f"{FULLNAME}-coordinator"


def test_cluster_config_kubernetes_discovery() -> None:
    docs = rendered("two-gpu-pools-values.yaml")
    raw, config = cluster_config(docs)
    assert config.discovery.backend == "kubernetes"
    k8s = config.discovery.kubernetes
    assert k8s.namespace == NAMESPACE
    assert k8s.label_selector == f"app.kubernetes.io/name=specpipe,app.kubernetes.io/instance={RELEASE}"
    assert k8s.role_label == "app.kubernetes.io/component"
    assert k8s.pool_label == "specpipe.io/pool"
    assert k8s.port_name == "grpc"
    assert (
        config.pool_weight("h100") == 4 and config.pool_weight("l4") == 1 and config.pool_weight("cpu") == 1
    )
    assert config.routing.imbalance_factor == 1.5
    assert "dns" not in raw["discovery"]


def test_cluster_config_dns_discovery_lists_every_pool_service() -> None:
    docs = rendered("cpu-single-pool-values.yaml")
    _, config = cluster_config(docs)
    assert config.discovery.backend == "dns"
    names = {(d.role, d.pool): (d.host, d.port) for d in config.discovery.dns}
    assert names == {
        ("target", "cpu"): (f"{FULLNAME}-target-cpu.{NAMESPACE}.svc.cluster.local", 50062),
        ("draft", "cpu"): (f"{FULLNAME}-draft-cpu.{NAMESPACE}.svc.cluster.local", 50061),
    }
    for host, port in names.values():
        service = one(docs, "Service", host.split(".")[0])
        assert service["spec"]["ports"][0]["port"] == port
    # No Kubernetes API access without the kubernetes backend.
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    assert (
        pod_spec(one(docs, "Deployment", f"{FULLNAME}-coordinator"))["automountServiceAccountToken"] is False
    )


# --- RBAC, NetworkPolicy, security -----------------------------------------------------------------------


def test_role_grants_endpointslice_and_pod_watch_to_the_coordinator() -> None:
    docs = rendered("default")
    role = one(docs, "Role", f"{FULLNAME}-coordinator")
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules[("discovery.k8s.io", "endpointslices")] >= {"get", "list", "watch"}
    assert rules[("", "pods")] >= {"get", "list", "watch"}
    assert all(verbs <= {"get", "list", "watch"} for verbs in rules.values())
    binding = one(docs, "RoleBinding", f"{FULLNAME}-coordinator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    account = one(docs, "ServiceAccount", subject["name"])
    assert subject == {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    spec = pod_spec(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is True
    # Workers never get an API token.
    for doc in find(docs, "Deployment"):
        if pod_labels(doc)["app.kubernetes.io/component"] != "coordinator":
            assert pod_spec(doc)["automountServiceAccountToken"] is False


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policies_let_only_the_coordinator_reach_workers_and_redis(value_set: str) -> None:
    docs = rendered(value_set)
    policies = find(docs, "NetworkPolicy")
    assert policies
    coordinator_labels = pod_labels(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    test_labels = pod_labels(find(docs, "Pod")[0])
    for doc in workloads(docs):
        labels = pod_labels(doc)
        component = labels["app.kubernetes.io/component"]
        if component == "test":
            continue
        applying = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert applying, f"no NetworkPolicy selects {doc['metadata']['name']}"
        for policy in applying:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                peers = rule.get("from")
                if component == "coordinator":
                    if rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]:
                        continue  # the Prometheus port (its own test)
                    # The public APIs: gRPC and the OpenAI-compatible HTTP one.
                    assert rule["ports"] == [{"protocol": "TCP", "port": port} for port in ("grpc", "http")]
                    if peers:  # restricted: the helm test Pod stays allowed
                        assert any(_selects(p.get("podSelector", {}), test_labels) for p in peers)
                    continue
                if policy["metadata"]["name"] == f"{FULLNAME}-target-from-draft":
                    continue  # delegation: draft pods reach target pods (its own test)
                if rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]:
                    assert policy["metadata"]["name"] == f"{FULLNAME}-workers"
                    continue  # the Prometheus port (its own test)
                # Workers and Redis: only the coordinator's pods, never the test Pod or anything else.
                assert peers and all(set(p) == {"podSelector"} for p in peers), policy["metadata"]["name"]
                assert all(_selects(p["podSelector"], coordinator_labels) for p in peers)
                assert not any(_selects(p["podSelector"], test_labels) for p in peers)


def test_delegation_lets_draft_pods_reach_target_pods_and_nothing_more() -> None:
    """With coordinator.delegation (the default) the coordinator gets --delegation and target pods (only
    they) also accept gRPC and direct streams from draft pods, which send their blocks to the targets
    themselves; without it, neither."""
    docs = render({"coordinator": {"delegation": False}})
    assert "--no-delegation" in args_of(container(one(docs, "Deployment", f"{FULLNAME}-coordinator")))
    assert not find(docs, "NetworkPolicy", f"{FULLNAME}-target-from-draft")
    docs = rendered("default")
    assert "--delegation" in args_of(container(one(docs, "Deployment", f"{FULLNAME}-coordinator")))
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-target-from-draft")
    draft_labels = pod_labels(one(docs, "Deployment", f"{FULLNAME}-draft-cpu"))
    target_labels = pod_labels(one(docs, "Deployment", f"{FULLNAME}-target-gpu"))
    coordinator_labels = pod_labels(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert _selects(policy["spec"]["podSelector"], target_labels)
    assert not _selects(policy["spec"]["podSelector"], draft_labels)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "grpc"}, {"protocol": "TCP", "port": "direct"}]
    (peer,) = rule["from"]
    assert _selects(peer["podSelector"], draft_labels)
    assert not _selects(peer["podSelector"], coordinator_labels)


def test_targets_serve_direct_streams_to_draft_pods_unless_turned_off() -> None:
    """target.directStreamPort (default 50063): every target pool gets --direct-stream-port and a `direct`
    container port, which the target-from-draft policy opens to draft pods; drafts get neither. 0 turns it
    off everywhere (drafts then use gRPC streams)."""
    values = values_of("two-gpu-pools-values.yaml")
    docs = render(values)
    deployments = find(docs, "Deployment")
    targets = [d for d in deployments if pod_labels(d)["app.kubernetes.io/component"] == "target"]
    assert len(targets) == 2
    for deployment in targets:
        worker = container(deployment)
        assert args_of(worker)["--direct-stream-port"] == "50063"
        assert {"name": "direct", "containerPort": 50063, "protocol": "TCP"} in worker["ports"]
    for deployment in find(docs, "Deployment"):
        if pod_labels(deployment)["app.kubernetes.io/component"] == "draft":
            assert "--direct-stream-port" not in args_of(container(deployment))
            assert [port["name"] for port in container(deployment)["ports"]] == ["grpc", "metrics"]
    docs = render({"target": {"directStreamPort": 0}})
    worker = container(one(docs, "Deployment", f"{FULLNAME}-target-gpu"))
    assert "--direct-stream-port" not in args_of(worker)
    assert [port["name"] for port in worker["ports"]] == ["grpc", "metrics"]
    (rule,) = one(docs, "NetworkPolicy", f"{FULLNAME}-target-from-draft")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "grpc"}]


def test_worker_pools_batch_sessions_when_asked() -> None:
    """maxBatchSessions (default 1: no batching) is a per-pool setting of both roles: a pool above 1 gets
    --max-batch-sessions, the others none."""
    for deployment in find(rendered("default"), "Deployment"):
        assert "--max-batch-sessions" not in args_of(container(deployment))
    values = values_of("two-gpu-pools-values.yaml")
    values["target"]["maxBatchSessions"] = 8
    values["target"]["pools"][1]["maxBatchSessions"] = 1
    values["draft"]["maxBatchSessions"] = 4
    batching = {}
    for deployment in find(render(values), "Deployment"):
        if pod_labels(deployment)["app.kubernetes.io/component"] in ("draft", "target"):
            batching[deployment["metadata"]["name"]] = args_of(container(deployment)).get(
                "--max-batch-sessions"
            )
    targets = [pool["name"] for pool in values["target"]["pools"]]
    drafts = [pool["name"] for pool in values["draft"]["pools"]]
    assert batching == {
        f"{FULLNAME}-target-{targets[0]}": "8",
        f"{FULLNAME}-target-{targets[1]}": None,
        **{f"{FULLNAME}-draft-{name}": "4" for name in drafts},
    }


def test_worker_threads_follow_the_pods_cpu_request_unless_set() -> None:
    """threads 0 (the default): --threads is the container's CPU request in whole cores, through the downward
    API (torch's own default would be the node's core count); a pool's threads above 0 is passed as is."""
    values = values_of("two-gpu-pools-values.yaml")
    values["draft"]["threads"] = 0
    values["target"]["pools"][0]["threads"] = 6
    for deployment in find(render(values), "Deployment"):
        role = pod_labels(deployment)["app.kubernetes.io/component"]
        if role not in ("draft", "target"):
            continue
        c = container(deployment)
        request = env_of(c)["SPECPIPE_CPU_REQUEST"]
        assert request == {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}
        name = deployment["metadata"]["name"]
        pinned = name == f"{FULLNAME}-target-{values['target']['pools'][0]['name']}"
        assert args_of(c)["--threads"] == ("6" if pinned else "$(SPECPIPE_CPU_REQUEST)"), name


def test_worker_pools_keep_static_kv_slots_when_asked() -> None:
    """staticKvSlots (default 0: off) is a per-pool setting of both roles, inherited from the role."""
    for deployment in find(rendered("default"), "Deployment"):
        assert "--static-kv-slots" not in args_of(container(deployment))
    values = values_of("two-gpu-pools-values.yaml")
    values["target"]["staticKvSlots"] = 8
    values["target"]["pools"][1]["staticKvSlots"] = 0
    slots = {}
    for deployment in find(render(values), "Deployment"):
        if pod_labels(deployment)["app.kubernetes.io/component"] == "target":
            slots[deployment["metadata"]["name"]] = args_of(container(deployment)).get("--static-kv-slots")
    targets = [pool["name"] for pool in values["target"]["pools"]]
    assert slots == {f"{FULLNAME}-target-{targets[0]}": "8", f"{FULLNAME}-target-{targets[1]}": None}


def test_coordinator_serves_prometheus_metrics_unless_turned_off() -> None:
    """coordinator.metrics (on by default, port 9400): --metrics-port, a `metrics` container port, the
    prometheus.io scrape annotations (the user's podAnnotations win), and an ingress rule for the port from
    networkPolicy.metricsFrom (anyone when empty)."""
    docs = rendered("default")
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    c = container(deployment)
    assert args_of(c)["--metrics-port"] == "9400"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    assert annotations["prometheus.io/path"] == "/metrics" and "checksum/cluster-config" in annotations
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"]
    assert {"ports": [{"protocol": "TCP", "port": "metrics"}]} in rules
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = render(
        {
            "coordinator": {"podAnnotations": {"prometheus.io/scrape": "false"}},
            "networkPolicy": {"metricsFrom": [scraper]},
        }
    )
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"]
    assert {"ports": [{"protocol": "TCP", "port": "metrics"}], "from": [scraper]} in rules
    docs = render({"coordinator": {"metrics": {"enabled": False}}})
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    c = container(deployment)
    assert "--metrics-port" not in args_of(c) and [p["name"] for p in c["ports"]] == ["grpc", "http"]
    assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"]["annotations"]
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"]
    assert all(rule["ports"] != [{"protocol": "TCP", "port": "metrics"}] for rule in rules)


def test_coordinator_serves_the_http_api_unless_turned_off() -> None:
    """coordinator.http (on, port 8000): --http-port, an `http` container port, the Service's httpPort and
    the same ingress rule as gRPC; chatTemplate goes through the ConfigMap and rolls the pods."""
    docs = rendered("default")
    c = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert args_of(c)["--http-port"] == "8000" and "--chat-template" not in args_of(c)
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    service = one(docs, "Service", f"{FULLNAME}-coordinator")
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"} in service["spec"]["ports"]
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"]
    assert {"protocol": "TCP", "port": "http"} in rules[0]["ports"]
    # Its first line indented more than the next: a YAML block scalar would not hold it.
    template = "    {% for m in messages %}\n{{ m['content'] }}{% endfor %}\n"
    before = one(docs, "Deployment", f"{FULLNAME}-coordinator")["spec"]["template"]["metadata"]["annotations"]
    docs = render(
        {
            "coordinator": {
                "chatTemplate": template,
                "servedModelName": "org/model: v2",
                "service": {"httpPort": 80},
                "toolCallParser": "hermes",
                "reasoningParser": "qwen3",
            }
        }
    )
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    c = container(deployment)
    assert args_of(c)["--chat-template"] == "/etc/specpipe/chat_template.jinja"
    assert args_of(c)["--tool-call-parser"] == "hermes"
    assert args_of(c)["--reasoning-parser"] == "qwen3"
    assert "--served-model-name=org/model: v2" in c["args"]
    assert one(docs, "ConfigMap", f"{FULLNAME}-coordinator")["data"]["chat_template.jinja"] == template
    assert {"name": "cluster-config", "mountPath": "/etc/specpipe/chat_template.jinja",
            "subPath": "chat_template.jinja", "readOnly": True} in c["volumeMounts"]  # fmt: skip
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/cluster-config"] != before["checksum/cluster-config"]
    assert one(docs, "Service", f"{FULLNAME}-coordinator")["spec"]["ports"][1]["port"] == 80
    assert "SPECPIPE_API_KEY" not in env_of(c)
    docs = render({"coordinator": {"apiKeySecret": {"name": "api-keys"}}})
    key_ref = {"secretKeyRef": {"name": "api-keys", "key": "api-key"}}
    c = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert {"name": "SPECPIPE_API_KEY", "valueFrom": key_ref} in c["env"]
    (pod,) = find(docs, "Pod")  # helm test sends it too
    assert {"name": "SPECPIPE_API_KEY", "valueFrom": key_ref} in container(pod)["env"]
    assert "Authorization" in "\n".join(container(pod)["command"])
    docs = render({"coordinator": {"http": {"enabled": False}}})
    c = container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    assert "--http-port" not in args_of(c) and "http" not in [p["name"] for p in c["ports"]]
    assert [p["name"] for p in one(docs, "Service", f"{FULLNAME}-coordinator")["spec"]["ports"]] == ["grpc"]


def test_workers_serve_prometheus_metrics_unless_turned_off() -> None:
    """draft.metrics and target.metrics (on, port 9400, one value per component): --metrics-port, a `metrics`
    container port and the scrape annotations on every pool (a pool's podAnnotations win), and the workers'
    policy opens the port to networkPolicy.metricsFrom."""
    values = values_of("two-gpu-pools-values.yaml")
    values["target"]["pools"][0]["podAnnotations"] = {"prometheus.io/scrape": "false"}
    values["networkPolicy"] = {"metricsFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]}
    docs = render(values)
    workers = [
        d for d in find(docs, "Deployment") if pod_labels(d)["app.kubernetes.io/component"] != "coordinator"
    ]
    assert len(workers) >= 3
    for deployment in workers:
        worker = container(deployment)
        assert args_of(worker)["--metrics-port"] == "9400"
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in worker["ports"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9400" and annotations["prometheus.io/path"] == "/metrics"
    first_pool = f"{FULLNAME}-target-{values['target']['pools'][0]['name']}"
    annotations = one(docs, "Deployment", first_pool)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    assert {
        "ports": [{"protocol": "TCP", "port": "metrics"}],
        "from": values["networkPolicy"]["metricsFrom"],
    } in rules
    docs = render({"draft": {"metrics": {"enabled": False}}, "target": {"metrics": {"enabled": False}}})
    for role in ("draft-cpu", "target-gpu"):
        deployment = one(docs, "Deployment", f"{FULLNAME}-{role}")
        assert "--metrics-port" not in args_of(container(deployment))
        assert "annotations" not in deployment["spec"]["template"]["metadata"]
    rules = one(docs, "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    assert all(rule["ports"] != [{"protocol": "TCP", "port": "metrics"}] for rule in rules)


def test_coordinator_network_policy_sources_are_configurable() -> None:
    docs = rendered("two-gpu-pools-values.yaml")
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}} in peers
    docs = rendered("default")
    assert "from" not in one(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"][0]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_security_context_is_restricted(value_set: str) -> None:
    docs = rendered(value_set)
    for doc in workloads(docs):
        spec = pod_spec(doc)
        where = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        specpipe = pod_labels(doc)["app.kubernetes.io/component"] != "redis"
        if specpipe:
            assert spec["securityContext"]["runAsUser"] == 10001, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged", False) is False, where
            # A writable /tmp (emptyDir) under the read-only root filesystem.
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"]), where
            if specpipe:
                env = env_of(c)
                assert env["HOME"] == "/tmp" and env["HF_HOME"] == "/tmp/hf", where
                assert env["XDG_CACHE_HOME"] == "/tmp/cache", where
                assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/inductor", where


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_workers_run_offline_on_a_read_only_model_mount(value_set: str) -> None:
    docs = rendered(value_set)
    for doc in find(docs, "Deployment"):
        component = pod_labels(doc)["app.kubernetes.io/component"]
        if component == "coordinator":
            continue
        c = container(doc, component)
        assert env_of(c)["HF_HUB_OFFLINE"] == "1"
        for mount in c["volumeMounts"]:
            if mount["name"] == "models":
                assert mount["mountPath"] == "/models" and mount["readOnly"] is True


# --- disruption budgets, autoscaling ---------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_disruption_budgets_cover_coordinator_and_every_pool(value_set: str) -> None:
    docs = rendered(value_set)
    budgets = find(docs, "PodDisruptionBudget")
    for doc in find(docs, "Deployment"):
        labels = pod_labels(doc)
        assert [b for b in budgets if _selects(b["spec"]["selector"], labels)], doc["metadata"]["name"]
    for budget in budgets:
        assert ("maxUnavailable" in budget["spec"]) != ("minAvailable" in budget["spec"])


def test_coordinator_autoscaling() -> None:
    docs = rendered("two-gpu-pools-values.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-coordinator")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-coordinator",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in one(docs, "Deployment", f"{FULLNAME}-coordinator")["spec"]
    assert not find(rendered("default"), "HorizontalPodAutoscaler")


# --- the session store -----------------------------------------------------------------------------------


def test_external_redis_with_tls_and_auth() -> None:
    docs = rendered("external-redis-tls-values.yaml")
    assert not find(docs, "StatefulSet")
    assert not find(docs, "Secret")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    c = container(deployment)
    args = args_of(c)
    assert args["--redis-url"] == "rediss://redis.example.internal:6380/0"
    assert args["--redis-username"] == "specpipe"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    auth = volumes["redis-auth"]["secret"]
    assert auth["secretName"] == "specpipe-redis-auth"
    assert auth["items"] == [{"key": "password", "path": "password"}]
    assert args["--redis-password-file"] == mounts["redis-auth"]["mountPath"] + "/password"
    ca = volumes["redis-tls"]["secret"]
    assert ca["secretName"] == "specpipe-redis-ca"
    assert ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert args["--redis-ca-file"] == mounts["redis-tls"]["mountPath"] + "/ca.crt"
    assert mounts["redis-auth"]["readOnly"] and mounts["redis-tls"]["readOnly"]
    # The password never appears in the rendered objects or the environment.
    assert "SPECPIPE_REDIS_PASSWORD" not in env_of(c)


def test_external_redis_needs_a_url() -> None:
    message = schema_error({"redis": {"mode": "external"}})
    assert "/redis/external/url" in message and "minLength" in message


def test_ca_secret_requires_a_tls_url() -> None:
    values = {
        "redis": {"mode": "external", "external": {"url": "redis://r:6379/0", "caSecret": {"name": "ca"}}}
    }
    assert "not rediss:// (TLS)" in render_error(values)


def test_builtin_redis_persistence_and_existing_secret() -> None:
    docs = rendered("cpu-single-pool-values.yaml")
    redis = one(docs, "StatefulSet", f"{FULLNAME}-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "--appendonly yes" in container(redis)["command"][2]
    assert not [v for v in pod_spec(redis)["volumes"] if v["name"] == "data"]

    docs = render({"redis": {"builtin": {"auth": {"existingSecret": "mine", "existingSecretKey": "pw"}}}})
    assert not find(docs, "Secret")
    c = container(one(docs, "StatefulSet", f"{FULLNAME}-redis"))
    assert env_of(c)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "mine", "key": "pw"}}
    coordinator = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    auth = next(v for v in pod_spec(coordinator)["volumes"] if v["name"] == "redis-auth")["secret"]
    assert auth["secretName"] == "mine" and auth["items"] == [{"key": "pw", "path": "password"}]

    docs = render({"redis": {"builtin": {"auth": {"enabled": False}}}})
    assert not find(docs, "Secret")
    assert "--redis-password-file" not in args_of(
        container(one(docs, "Deployment", f"{FULLNAME}-coordinator"))
    )
    assert "REDIS_PASSWORD" not in env_of(container(one(docs, "StatefulSet", f"{FULLNAME}-redis")))


# --- the helm test hook ----------------------------------------------------------------------------------


def test_helm_test_hook_checks_health_and_generates() -> None:
    docs = rendered("default")
    (pod,) = find(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = container(pod)
    script = "\n".join(c["command"])
    assert "grpc_health.v1" in script and "HealthCheckRequest" in script and "SERVING" in script
    assert "specpipe generate" in script
    env = env_of(c)
    service = one(docs, "Service", f"{FULLNAME}-coordinator")
    assert env["SPECPIPE_ADDR"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["SPECPIPE_PROMPT"] == "def fibonacci(n):" and env["SPECPIPE_MAX_NEW_TOKENS"] == "8"
    assert "/v1/completions" in script  # and the HTTP API
    assert (
        env["SPECPIPE_HTTP_URL"]
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][1]['port']}"
    )
    assert gpu_count(c) == (None, None)
    assert not find(render({"tests": {"enabled": False}}), "Pod")


# --- schema and template validation ----------------------------------------------------------------------


def test_schema_is_valid_draft_07_and_accepts_every_values_file() -> None:
    # draft-07 (not 2020-12): the dialect both Helm 3 (gojsonschema) and Helm 4 validate.
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for value_set in VALUE_SETS:
        chart().validate_schema(values_of(value_set))
        merged = chart().merge_values(values_of(value_set))
        assert not [e.message for e in validator.iter_errors(merged)], value_set
    assert not list(validator.iter_errors(defaults))


def test_schema_rejects_negative_replicas() -> None:
    pool = {"name": "h100", "replicas": -1, "model": {"path": "/models/t"}}
    message = schema_error({"target": {"pools": [pool]}})
    assert "at '/target/pools/0/replicas': minimum: got -1, want 0" in message
    message = schema_error({"draft": {"replicas": -3}})
    assert "at '/draft/replicas': minimum: got -3, want 0" in message


def test_schema_rejects_a_pool_without_a_model() -> None:
    message = schema_error({"target": {"pools": [{"name": "h100", "gpus": 1}]}})
    assert "at '/target/pools/0': missing property 'model'" in message
    message = schema_error({"draft": {"pools": [{"name": "cpu", "model": {}}]}})
    assert "/draft/pools/0/model" in message and "missing property 'path'" in message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"target": {"pools": [{"model": {"path": "/m"}}]}}, "at '/target/pools/0': missing property 'name'"),
        ({"target": {"pools": []}}, "at '/target/pools': minItems: got 0, want 1"),
        ({"target": {"pools": [{"name": "H100", "model": {"path": "/m"}}]}}, "does not match pattern"),
        ({"target": {"device": "tpu"}}, "at '/target/device'"),
        ({"target": {"dtype": "int8"}}, "at '/target/dtype'"),
        ({"target": {"gpus": -1}}, "at '/target/gpus': minimum: got -1, want 0"),
        (
            {"target": {"pools": [{"name": "a", "model": {"path": "/m"}, "weight": 0}]}},
            "/target/pools/0/weight",
        ),
        (
            {"target": {"pools": [{"name": "a", "model": {"path": "/m"}, "gpu": 1}]}},
            "additional properties 'gpu'",
        ),
        ({"target": {"directStreamPort": 70000}}, "at '/target/directStreamPort'"),
        ({"coordinator": {"metrics": {"port": 0}}}, "at '/coordinator/metrics/port'"),
        ({"coordinator": {"toolCallParser": "mistral"}}, "at '/coordinator/toolCallParser'"),
        ({"coordinator": {"reasoningParser": "o1"}}, "at '/coordinator/reasoningParser'"),
        ({"draft": {"directStreamPort": 50063}}, "at '/draft'"),
        ({"draft": {"maxBatchSessions": 0}}, "at '/draft/maxBatchSessions'"),
        ({"target": {"maxBatchSessions": 0}}, "at '/target/maxBatchSessions'"),
        ({"target": {"staticKvSlots": -1}}, "at '/target/staticKvSlots'"),
        (
            {"target": {"pools": [{"name": "a", "model": {"path": "/m"}, "directStreamPort": 1}]}},
            "additional properties 'directStreamPort'",
        ),
        ({"coordinator": {"discovery": {"backend": "static"}}}, "at '/coordinator/discovery/backend'"),
        ({"redis": {"mode": "cluster"}}, "at '/redis/mode'"),
        ({"redis": {"mode": "external", "external": {"url": "http://x"}}}, "at '/redis/external/url'"),
    ],
)
def test_schema_rejects_invalid_values(values: dict[str, Any], expected: str) -> None:
    assert expected in schema_error(values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"target": {"pools": [{"name": "h100", "gpus": 0, "model": {"path": "/m"}}]}},
            'target pool "h100": device cuda needs gpus >= 1',
        ),
        (
            {"target": {"staticKvSlots": 4, "maxBatchSessions": 8}},
            "staticKvSlots runs one session per forward; it needs maxBatchSessions 1",
        ),
        (
            {"draft": {"pools": [{"name": "cpu", "gpus": 1, "model": {"path": "/m"}}]}},
            'draft pool "cpu": gpus is 1 but device is cpu',
        ),
        (
            {
                "target": {
                    "pools": [
                        {
                            "name": "a",
                            "model": {"path": "/m", "pvc": {"claimName": "x"}, "hostPath": {"path": "/x"}},
                        }
                    ]
                }
            },
            'target pool "a": model takes at most one of pvc, hostPath and download',
        ),
        (
            {
                "draft": {
                    "pools": [{"name": "a", "model": {"path": "/m"}}, {"name": "a", "model": {"path": "/n"}}]
                }
            },
            'draft.pools: the pool name "a" is used twice',
        ),
    ],
)
def test_inconsistent_pools_fail_with_a_clear_message(values: dict[str, Any], expected: str) -> None:
    assert expected in render_error(values)


def test_pool_overrides_component_defaults_including_zero_values() -> None:
    docs = render(
        {
            "target": {
                "pools": [
                    {
                        "name": "cpu",
                        "device": "cpu",
                        "dtype": "float32",
                        "gpus": 0,
                        "tolerations": [],
                        "model": {"path": "/m"},
                    },
                    {"name": "a100", "replicas": 0, "image": {"tag": "custom"}, "model": {"path": "/m"}},
                ]
            }
        }
    )
    cpu = one(docs, "Deployment", f"{FULLNAME}-target-cpu")
    assert gpu_count(container(cpu)) == (None, None) and "tolerations" not in pod_spec(cpu)
    assert container(cpu)["image"] == "ghcr.io/specpipe/specpipe:0.1.0"
    assert args_of(container(cpu))["--device"] == "cpu" and args_of(container(cpu))["--dtype"] == "float32"
    a100 = one(docs, "Deployment", f"{FULLNAME}-target-a100")
    assert a100["spec"]["replicas"] == 0
    assert container(a100)["image"] == "ghcr.io/specpipe/specpipe:custom"  # an own tag gets no suffix
    assert gpu_count(container(a100)) == (1, 1)
    # A pool scaled to zero keeps its Service (and cluster-file entry) but has no disruption budget.
    one(docs, "Service", f"{FULLNAME}-target-a100")
    assert not find(docs, "PodDisruptionBudget", f"{FULLNAME}-target-a100")


def test_long_release_names_keep_pool_names_valid() -> None:
    name = "a-very-long-release-name-for-a-production-cluster-x"
    docs = chart().render({}, name=name, namespace=NAMESPACE)
    for template, text in docs.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and "metadata" in doc:
                assert len(doc["metadata"]["name"]) <= 63


# --- the image -------------------------------------------------------------------------------------------


def test_default_model_paths_match_the_dockerfile() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)", dockerfile, re.MULTILINE)
    assert match, "Dockerfile: ARG PYTHON_VERSION"
    site = f"/usr/local/lib/python{match.group(1)}/site-packages/specpipe/assets/demo-pair"
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["target"]["pools"][0]["model"]["path"] == f"{site}/target"
    assert values["draft"]["pools"][0]["model"]["path"] == f"{site}/draft"
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["specpipe"]' in dockerfile


# --- docs/deploy.md --------------------------------------------------------------------------------------


def test_values_examples_in_the_deploy_guide_render_and_validate() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    examples = [
        block
        for text in re.findall(r"```yaml\n(.*?)```", guide, re.DOTALL)
        for block in yaml.safe_load_all(text)
        if isinstance(block, dict) and {"target", "draft", "redis"} & set(block)
    ]
    assert len(examples) >= 2
    # The guide's own manifests (the model PVC and the Pod that fills it) are valid too.
    manifests = [
        block
        for text in re.findall(r"```yaml\n(.*?)```", guide, re.DOTALL)
        for block in yaml.safe_load_all(text)
        if isinstance(block, dict) and "kind" in block
    ]
    assert {m["kind"] for m in manifests} >= {"PersistentVolumeClaim", "Pod"}
    for doc in manifests:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for values in examples:
        for doc in render(values):
            kubernetes_validate.validate(manifest(doc), KUBE_VERSION, strict=True)
    two_pools = next(v for v in examples if "target" in v)
    assert [p["name"] for p in two_pools["target"]["pools"]] == ["h100", "l4"]


def test_coordinator_waits_for_workers_as_long_as_its_startup_probe_allows() -> None:
    docs = rendered("default")
    deployment = one(docs, "Deployment", f"{FULLNAME}-coordinator")
    c = container(deployment, "coordinator")
    probe = c["startupProbe"]
    assert args_of(c)["--startup-timeout"] == str(probe["periodSeconds"] * probe["failureThreshold"])
