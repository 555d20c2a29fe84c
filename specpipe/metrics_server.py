"""Serving a Prometheus registry over HTTP (`/metrics`), for the coordinator and the workers."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int, name: str) -> MetricsServer:
    """Serves the registry at http://host:port/metrics (port 0: a free one) from a thread of its own, off the
    event loop and the model thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = MetricsServer(server, thread, int(server.server_address[1]))
    logger.info("%s metrics on http://%s:%d/metrics", name, host, bound.port)
    return bound
