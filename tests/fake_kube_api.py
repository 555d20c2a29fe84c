"""A fake Kubernetes API server: EndpointSlice lists and chunked watches the test scripts, pod GETs.

Speaks the real API's paths and JSON (recorded examples in tests/data/k8s/); used by the discovery tests
and by the coordinator's end-to-end discovery test.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

DATA = Path(__file__).parent / "data" / "k8s"
NAMESPACE = "specpipe"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
STEP_S = 5.0  # how long any single expected step may take


def load_json(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def load_events(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    authorization: str | None

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") == "true"


class WatchStream:
    """One open watch request; the test decides what it streams and when it ends."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.lines: queue.Queue[bytes | None] = queue.Queue()

    def send(self, event: dict[str, Any]) -> None:
        self.lines.put(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def end(self) -> None:
        """Ends the response as the API server does when timeoutSeconds runs out."""
        self.lines.put(None)


def not_found(name: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'pods "{name}" not found',
        "reason": "NotFound",
        "details": {"name": name, "kind": "pods"},
        "code": 404,
    }


class FakeKubeApi:
    """Serves, like the API server: EndpointSlice lists (scripted responses, in order), EndpointSlice
    watches (chunked newline-delimited events the test sends), and GETs of the pods in pods.json."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lists: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.watch_failures: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.watches: queue.Queue[WatchStream] = queue.Queue()
        self.pods = {pod["metadata"]["name"]: pod for pod in load_json("pods.json")["items"]}
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def slice_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == SLICES_PATH]

    def pod_gets(self) -> list[str]:
        with self._lock:
            return [r.path.rsplit("/", 1)[1] for r in self.requests if "/pods/" in r.path]

    async def next_watch(self) -> WatchStream:
        return await asyncio.to_thread(self.watches.get, True, STEP_S)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                request = Request(url.path, query, self.headers.get("Authorization"))
                with api._lock:
                    api.requests.append(request)
                if url.path == SLICES_PATH and request.is_watch:
                    self._watch(request)
                elif url.path == SLICES_PATH:
                    try:
                        status, body = api.lists.get_nowait()
                    except queue.Empty:
                        status, body = 500, load_json("status-500.json")
                    self._json(status, body)
                elif url.path.startswith(f"/api/v1/namespaces/{NAMESPACE}/pods/"):
                    name = url.path.rsplit("/", 1)[1]
                    pod = api.pods.get(name)
                    if pod is None:
                        self._json(404, not_found(name))
                    else:
                        self._json(200, {"kind": "Pod", "apiVersion": "v1", **pod})
                else:
                    self._json(404, not_found(url.path))

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, request: Request) -> None:
                try:
                    status, body = api.watch_failures.get_nowait()
                except queue.Empty:
                    pass
                else:
                    self._json(status, body)
                    return
                stream = WatchStream(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                api.watches.put(stream)
                try:
                    while not api.closed.is_set():
                        try:
                            line = stream.lines.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        if line is None:
                            self.wfile.write(b"0\r\n\r\n")
                            self.wfile.flush()
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the client went away

        return Handler
