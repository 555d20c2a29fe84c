"""Kubernetes discovery: the EndpointSlices of the draft and target Services, pools from pod labels.

Lists `discovery.k8s.io/v1` EndpointSlices matching the label selector, then watches them from the list's
resourceVersion (the list-then-watch protocol of client-go's reflector):

- a slice's role is its `role_label` (EndpointSlices carry their Service's labels); slices of other roles
  are ignored, so the selector may match the coordinator's own Service too;
- an endpoint counts only while `conditions.ready` is true or absent (the API: "A nil value should be
  interpreted as true"); a terminating pod is not ready;
- its address is each of `addresses` with the slice's port named `port_name` (IPv6 bracketed);
- its pool is the `pool_label` of the pod in its `targetRef`, read once per pod (by uid: a StatefulSet
  reuses pod names) with a GET; no targetRef, or no label, means pool "default". A pod's labels are fixed
  for our purposes: the pool comes from the pod template, and changing it rolls out new pods.

A watch that the server ends (timeoutSeconds) resumes from the last resourceVersion seen, bookmarks
included. "410 Gone" (the resourceVersion was compacted away) re-lists at once. Any other failure (an
error status, a refused connection, a pod GET that fails) is logged, backed off exponentially, and
followed by a fresh list; the last reported set stays in force meanwhile.

The client is the official synchronous one, run in a daemon thread per watch(): blocking reads of a
watch stream cannot be cancelled from asyncio, so cancelling watch() shuts the stream's socket down
instead, and a thread that is still stuck (connecting, say) never holds up process exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from http import HTTPStatus
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from coordinator.cluster_config import DEFAULT_POOL, ROLES
from coordinator.cluster_config import KubernetesDiscovery as KubernetesDiscoveryConfig
from coordinator.discovery.base import Endpoint
from coordinator.discovery.dns import host_port

log = logging.getLogger(__name__)

# Mounted into every pod with a service account token: the pod's own namespace.
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# A Kubernetes object as the API serves it (camelCase JSON). The raw JSON is used rather than the
# client's models: watch events arrive as JSON anyway, and BOOKMARK/ERROR objects are not full objects.
Json = Mapping[str, Any]
# A targetRef -> the pool of its pod, or None when the pod no longer exists.
PoolLookup = Callable[[Json | None], str | None]


def slice_endpoints(slice_: Json, role_label: str, port_name: str, pool_of: PoolLookup) -> set[Endpoint]:
    """The ready worker endpoints of one EndpointSlice (none for a slice of another role)."""
    metadata = slice_.get("metadata") or {}
    role = (metadata.get("labels") or {}).get(role_label)
    if role not in ROLES:
        return set()
    # An unnamed port has no name (or ""): port_name "" selects it.
    ports = [p for p in slice_.get("ports") or () if (p.get("name") or "") == port_name]
    port = ports[0].get("port") if ports else None
    if not isinstance(port, int):
        # No such port (or a null port: "all ports"), so there is nothing to dial.
        log.debug("EndpointSlice %s has no port named %r", metadata.get("name"), port_name)
        return set()
    endpoints: set[Endpoint] = set()
    for item in slice_.get("endpoints") or ():
        if (item.get("conditions") or {}).get("ready") is False:
            continue
        addresses = item.get("addresses") or ()
        if not addresses:
            continue
        pool = pool_of(item.get("targetRef"))
        if pool is None:
            continue
        endpoints.update(Endpoint(str(role), host_port(address, port), pool) for address in addresses)
    return endpoints


def _read_namespace_file() -> str:
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def load_api_client(config: KubernetesDiscoveryConfig) -> tuple[k8s_client.ApiClient, str]:
    """An API client (own Configuration: the client's global default stays untouched) and the namespace.

    api_url: that server, no credentials. In a pod (KUBERNETES_SERVICE_HOST set): the service account.
    Otherwise the kubeconfig ($KUBECONFIG or ~/.kube/config, current context). Raises
    kubernetes.config.ConfigException when none of them is usable: a setup error, better found at start.
    """
    configuration = k8s_client.Configuration()
    context_namespace = ""
    if config.api_url:
        configuration.host = config.api_url.rstrip("/")
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        # The library reads $KUBECONFIG once, at import; read it now so the current environment decides.
        config_file = os.environ.get("KUBECONFIG") or None
        k8s_config.load_kube_config(config_file=config_file, client_configuration=configuration)
        _, active = k8s_config.list_kube_config_contexts(config_file)
        context_namespace = str(((active or {}).get("context") or {}).get("namespace") or "")
    namespace = config.namespace or _read_namespace_file() or context_namespace or "default"
    return k8s_client.ApiClient(configuration), namespace


def _status_error(status: Json) -> ApiException:
    """An ERROR watch event's Status object as the exception a failed request raises."""
    code = status.get("code")
    reason = f"{status.get('reason', '')}: {status.get('message', '')}"
    return ApiException(status=code if isinstance(code, int) else 0, reason=reason)


# A watch that ends sooner than this without a single event is treated as a failure.
_SHORT_WATCH_S = 1.0

# How an unreachable, failing or restarting API server shows up.
_EXPECTED_FAILURES = (ApiException, OSError, urllib3.exceptions.HTTPError, ValueError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        # An error response's body is a Status whose message says more than the HTTP reason.
        try:
            message = str(json.loads(exc.body or "").get("message") or "")
        except (ValueError, AttributeError):
            message = ""
        return " ".join(str(part) for part in (f"HTTP {exc.status}", exc.reason, message) if part)
    return repr(exc)


class _Backoff:
    """Exponential backoff with jitter; reset once the watch makes progress."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * 2**self.failures)
        self.failures += 1
        # Jitter so that coordinators that failed together (API server restart) do not retry together.
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.failures = 0


class _SliceWatcher:
    """One list-and-watch loop, run in its own thread; reports complete endpoint sets to publish()."""

    def __init__(
        self,
        owner: KubernetesDiscovery,
        publish: Callable[[frozenset[Endpoint]], None],
    ) -> None:
        self._owner = owner
        self._config = owner.config
        self._namespace = owner.namespace
        self._discovery_api = k8s_client.DiscoveryV1Api(owner.api_client)
        self._core_api = k8s_client.CoreV1Api(owner.api_client)
        self._publish = publish
        self._backoff = _Backoff(owner.backoff_initial_s, owner.backoff_max_s)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None  # the open watch response (urllib3), to shut down on stop()
        self._slices: dict[str, Json] = {}
        # (namespace, pod name) -> (pod uid, pool).
        self._pods: dict[tuple[str, str], tuple[str, str]] = {}
        self._published: frozenset[Endpoint] | None = None
        self._degraded = False  # a failure was reported; say so when listing works again

    def stop(self) -> None:
        """Ends run() soon; safe from any thread."""
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            _shutdown(stream)

    def run(self) -> None:
        resource_version = ""
        while not self._stopping.is_set():
            try:
                resource_version = self._list()
                while not self._stopping.is_set():
                    resource_version = self._watch(resource_version)
            except Exception as exc:  # every failure of the source is retried; bugs included, logged
                if self._stopping.is_set():
                    break
                delay = self._backoff.next()
                if (
                    isinstance(exc, ApiException)
                    and exc.status == HTTPStatus.GONE
                    and self._backoff.failures == 1
                ):
                    # The expected way for a long watch to end: re-list now (a second one in a row waits).
                    log.info(
                        "EndpointSlice watch at resourceVersion %s expired; re-listing", resource_version
                    )
                    continue
                self._degraded = True
                log.warning(
                    "Kubernetes discovery failed (%s); keeping the last %d endpoint(s), re-listing in %.2fs",
                    _describe(exc),
                    len(self._published or ()),
                    delay,
                    # A traceback only for the unexpected: those are bugs, not outages.
                    exc_info=not isinstance(exc, _EXPECTED_FAILURES),
                )
                self._stopping.wait(delay)

    def _request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"_preload_content": False}
        if self._config.label_selector:
            kwargs["label_selector"] = self._config.label_selector
        return kwargs

    def _list(self) -> str:
        response = self._discovery_api.list_namespaced_endpoint_slice(
            self._namespace,
            _request_timeout=(self._owner.request_timeout_s, self._owner.request_timeout_s),
            **self._request_kwargs(),
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        self._slices = {item["metadata"]["name"]: item for item in body.get("items") or ()}
        if self._degraded:
            self._degraded = False
            log.info("Kubernetes discovery: listing EndpointSlices works again")
        self._report()
        return str(body.get("metadata", {}).get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> str:
        """Streams events until the server ends the watch; returns the resourceVersion to resume from."""
        timeout_s = int(self._owner.watch_timeout_s)  # the API (and the client's validation) wants an int
        response = self._discovery_api.list_namespaced_endpoint_slice(
            self._namespace,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            # The server ends the watch after timeout_s; a connection silent for longer than that is dead.
            _request_timeout=(self._owner.request_timeout_s, timeout_s + self._owner.request_timeout_s),
            **self._request_kwargs(),
        )
        with self._lock:
            self._stream = response
        try:
            # stop() may have run before _stream was set; checked after, it cannot be missed.
            if self._stopping.is_set():
                return resource_version
            started = time.monotonic()
            events = 0
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return resource_version
                if not line.strip():
                    continue
                resource_version = self._apply(json.loads(line)) or resource_version
                events += 1
                self._backoff.reset()
            if not events and time.monotonic() - started < _SHORT_WATCH_S:
                # As client-go: a watch that ends at once, empty, means something in between (a proxy, an
                # overloaded server) is refusing it; re-watching at once would spin.
                raise ConnectionError("the EndpointSlice watch closed at once without events")
            self._backoff.reset()
            return resource_version
        finally:
            with self._lock:
                self._stream = None
            response.close()
            response.release_conn()

    def _apply(self, event: Json) -> str:
        """Applies one watch event; returns its resourceVersion ("" if none)."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            raise _status_error(obj)
        metadata = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED"):
            self._slices[metadata["name"]] = obj
            self._report()
        elif kind == "DELETED":
            self._slices.pop(metadata.get("name", ""), None)
            self._report()
        elif kind != "BOOKMARK":  # a bookmark only moves the resourceVersion on
            log.debug("ignoring watch event of type %r", kind)
        return str(metadata.get("resourceVersion") or "")

    def _report(self) -> None:
        referenced: set[tuple[str, str]] = set()

        def pool_of(ref: Json | None) -> str | None:
            return self._pool_of(ref, referenced)

        endpoints: set[Endpoint] = set()
        for slice_ in self._slices.values():
            endpoints |= slice_endpoints(slice_, self._config.role_label, self._config.port_name, pool_of)
        # Forget pods no slice names any more, so the cache stays the size of the cluster.
        for key in self._pods.keys() - referenced:
            del self._pods[key]
        current = frozenset(endpoints)
        if current != self._published:
            self._published = current
            self._publish(current)

    def _pool_of(self, ref: Json | None, referenced: set[tuple[str, str]]) -> str | None:
        if not ref or ref.get("kind") != "Pod" or not ref.get("name"):
            return DEFAULT_POOL
        key = (str(ref.get("namespace") or self._namespace), str(ref["name"]))
        referenced.add(key)
        uid = str(ref.get("uid") or "")
        cached = self._pods.get(key)
        if cached is not None and (not uid or cached[0] == uid):
            return cached[1]
        try:
            response = self._core_api.read_namespaced_pod(
                key[1],
                key[0],
                _preload_content=False,
                _request_timeout=(self._owner.request_timeout_s, self._owner.request_timeout_s),
            )
        except ApiException as exc:
            if exc.status == HTTPStatus.NOT_FOUND:
                # Deleted already; its slice will drop it shortly. Routing to it meanwhile would fail.
                log.info("pod %s/%s of an endpoint is gone; leaving it out", *key)
                return None
            raise
        try:
            pod = json.loads(response.data)
        finally:
            response.release_conn()
        pod_metadata = pod.get("metadata") or {}
        pod_uid = str(pod_metadata.get("uid") or "")
        if uid and pod_uid != uid:
            # A newer pod with the same name: the endpoint is the old, gone one.
            log.info("pod %s/%s of an endpoint was replaced; leaving it out", *key)
            return None
        pool = str((pod_metadata.get("labels") or {}).get(self._config.pool_label) or DEFAULT_POOL)
        self._pods[key] = (pod_uid, pool)
        return pool


def _shutdown(response: Any) -> None:
    """Unblocks a thread reading the response: closing it from another thread does not (and may block
    on a TLS socket's lock), shutting down the socket does."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


class KubernetesDiscovery:
    """Discovery through the Kubernetes API: EndpointSlices of the worker Services, pools from pods."""

    def __init__(
        self,
        config: KubernetesDiscoveryConfig,
        *,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.config = config
        # Loaded here, not in the thread, so a cluster without credentials fails at startup.
        self.api_client, self.namespace = load_api_client(config)
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[frozenset[Endpoint]] = asyncio.Queue()

        def publish(endpoints: frozenset[Endpoint]) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, endpoints)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                watcher.stop()

        watcher = _SliceWatcher(self, publish)
        thread = threading.Thread(target=watcher.run, name="specpipe-k8s-discovery", daemon=True)
        thread.start()
        previous: frozenset[Endpoint] | None = None
        try:
            while True:
                endpoints = await updates.get()
                # Only the newest set matters to a consumer that fell behind.
                while not updates.empty():
                    endpoints = updates.get_nowait()
                if endpoints != previous:
                    previous = endpoints
                    yield endpoints
        finally:
            watcher.stop()
