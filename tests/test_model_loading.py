"""Where models load from: a local directory never touches a hub; a hub id is fetched (network allowing)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ModelPair

LOAD = (
    "import sys; from specpipe.runtime.model_runner import CausalLMRunner; "
    "r = CausalLMRunner.load(sys.argv[1], 'cpu', 'float32', max_cached_sessions=1); "
    "print('vocab', r.vocab_size)"
)


class FakeHub:
    """A hub endpoint that knows no repository: answers 404 at once and records what was asked."""

    def __init__(self) -> None:
        paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _not_found(self) -> None:
                paths.append(self.path)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _not_found

            def log_message(self, *args: object) -> None:
                pass

        self.paths = paths
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    yield server
    server.close()


def run_load(model: str, hub_url: str, tmp_home: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=tmp_home)
    return subprocess.run(
        [sys.executable, "-c", LOAD, model], env=env, capture_output=True, text=True, timeout=120
    )


def test_local_directory_loads_without_offline_mode_or_a_hub(
    model_pair: ModelPair, hub: FakeHub, tmp_path: os.PathLike[str]
) -> None:
    result = run_load(str(model_pair.target_dir), hub.url, str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vocab" in result.stdout
    assert hub.paths == []  # not even a metadata request


def test_hub_id_is_looked_up_on_the_hub(hub: FakeHub, tmp_path: os.PathLike[str]) -> None:
    result = run_load("specpipe-test/no-such-model", hub.url, str(tmp_path))
    assert result.returncode != 0
    assert "specpipe-test/no-such-model" in result.stderr
    assert any("specpipe-test/no-such-model" in path for path in hub.paths), hub.paths
