"""A direct-stream listener (specpipe/rpc/direct_frames.py) beside a worker's gRPC server.

Each connection is one call of a bidirectional streaming RPC: the same servicer method answers it, with
the same errors (mapped to status codes as the gRPC interceptor maps them) and the same rule for the
session's cache: kept after END, freed when the connection ends without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from specpipe import errors
from specpipe.rpc import direct_frames as frames
from specpipe.rpc.interceptor import status_for

logger = logging.getLogger(__name__)

# A client sends HELLO with its first request, at once; a connection that sends nothing is dropped.
HELLO_TIMEOUT_S = 10.0

# handler(request iterator, context) -> replies: a servicer's bidirectional streaming method.
StreamHandler = Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]


class DirectStreamContext:
    """What a stream handler asks of its context. A direct stream that ends without END fails its request
    iterator instead of looking cancelled, so `cancelled()` is always False here."""

    # A request that arrives while another is answered waits in the socket's buffer and is parsed when the
    # handler asks for it: the handler needs no read-ahead task (see WorkerServicerBase.serve_stream).
    buffers_requests = True

    def cancelled(self) -> bool:
        return False


class DirectStreamServer:
    def __init__(self, name: str, handler: StreamHandler, parse_request: Callable[[bytes], Any]) -> None:
        self.name = name
        self.handler = handler
        self.parse_request = parse_request
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.streams_served = 0  # connections that opened a stream (a valid HELLO)

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: a free port); returns the bound port."""
        self._server = await asyncio.start_server(self._serve_connection, host, port)
        bound = int(self._server.sockets[0].getsockname()[1])
        logger.info("%s: direct streams on %s:%d", self.name, host, bound)
        return bound

    async def stop(self, grace_s: float) -> None:
        """Stops accepting, gives open streams `grace_s` to end, then breaks the rest."""
        if self._server is not None:
            self._server.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames.enable_keepalive(writer.get_extra_info("socket"))
        task = asyncio.ensure_future(self._connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                try:
                    hello = await asyncio.wait_for(frames.read_frame(reader), HELLO_TIMEOUT_S)
                except asyncio.TimeoutError:
                    logger.debug("%s: a connection sent no HELLO within %.0fs", self.name, HELLO_TIMEOUT_S)
                    return
                if hello is None:
                    return  # a connection probe
                if hello != (frames.HELLO, frames.PROTOCOL):
                    raise errors.FailedPreconditionError(
                        f"expected the {frames.PROTOCOL.decode()} protocol's HELLO frame"
                    )
                self.streams_served += 1
                replies = self.handler(self._requests(reader), DirectStreamContext())
                async with contextlib.aclosing(replies):  # type: ignore[type-var]
                    async for reply in replies:
                        writer.write(frames.encode_frame(frames.REPLY, reply.SerializeToString()))
                        if writer.transport.get_write_buffer_size() > 1 << 20:
                            await writer.drain()  # a client that stopped reading
            except (ConnectionError, EOFError) as exc:
                logger.debug("%s: a direct stream broke: %s", self.name, exc)
                return
            except errors.SpecpipeError as exc:
                code = status_for(exc)
                logger.info("%s direct stream -> %s: %s", self.name, code.name, exc)
                writer.write(frames.encode_error(code.value[0], str(exc)))
            except Exception as exc:  # noqa: BLE001 - reported to the client as INTERNAL, like gRPC's
                logger.exception("%s: a direct stream failed unexpectedly", self.name)
                writer.write(
                    frames.encode_error(grpc.StatusCode.INTERNAL.value[0], f"{type(exc).__name__}: {exc}")
                )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _requests(self, reader: asyncio.StreamReader) -> AsyncIterator[Any]:
        """The stream's requests; ends at END, raises ConnectionError if the connection ends without it."""
        while True:
            frame = await frames.read_frame(reader)
            if frame is None:
                raise ConnectionResetError("the client closed the direct stream without END")
            kind, body = frame
            if kind == frames.END:
                return
            if kind != frames.REQUEST:
                raise frames.FrameError(f"unexpected frame kind {kind} from a client")
            try:
                request = self.parse_request(body)
            except Exception as exc:  # a protobuf DecodeError
                raise errors.InvalidArgumentError(f"malformed request: {exc}") from exc
            yield request
