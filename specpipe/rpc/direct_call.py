"""The client side of a direct stream (specpipe/rpc/direct_frames.py).

DirectStreamCall offers the part of grpc.aio.StreamStreamCall that WorkerStream uses (write, read,
done_writing, cancel), and fails the way a gRPC call fails (grpc.aio.AioRpcError with the server's status,
UNAVAILABLE for a broken connection), so a session stream works the same over either transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from specpipe.rpc import direct_frames as frames

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# After END the server answers what it still holds and closes; a connection still open this long is aborted.
CLOSE_TIMEOUT_S = 60.0


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 address]:port"."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class DirectStreamCall:
    def __init__(
        self, host: str, port: int, parse_reply: Callable[[bytes], Any], background: set[asyncio.Task[None]]
    ) -> None:
        self.host = host
        self.port = port
        self.parse_reply = parse_reply
        self._background = background  # the closing tasks of ended streams, kept referenced by the client
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def _broken(self, what: object) -> grpc.aio.AioRpcError:
        return rpc_error(grpc.StatusCode.UNAVAILABLE, f"direct stream to {self.host}:{self.port}: {what}")

    async def connect(self, timeout_s: float) -> None:
        """Opens the connection; OSError or asyncio.TimeoutError if the server does not take it."""
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout_s
        )
        frames.enable_keepalive(self._writer.get_extra_info("socket"))
        self._writer.write(frames.encode_frame(frames.HELLO, frames.PROTOCOL))

    async def write(self, request: Any) -> None:
        if self._writer is None:
            raise self._broken("not connected")
        if self._writer.is_closing():
            raise self._broken("connection closed")
        self._writer.write(frames.encode_frame(frames.REQUEST, request.SerializeToString()))
        if self._writer.transport.get_write_buffer_size() > 1 << 20:
            try:
                await self._writer.drain()  # a large block the socket did not take at once
            except ConnectionError as exc:
                raise self._broken(exc) from exc

    async def read(self) -> Any:
        """The next reply; grpc.aio.EOF once the server ended the stream normally."""
        if self._reader is None:
            raise self._broken("not connected")
        try:
            frame = await frames.read_frame(self._reader)
        except (ConnectionError, EOFError) as exc:
            raise self._broken(exc) from exc
        if frame is None:
            return grpc.aio.EOF
        kind, body = frame
        if kind == frames.REPLY:
            return self.parse_reply(body)
        if kind == frames.ERROR:
            number, details = frames.decode_error(body)
            raise rpc_error(STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN), details)
        raise self._broken(f"unexpected frame kind {kind} from the server")

    async def done_writing(self) -> None:
        """Ends the stream normally (the worker keeps the session's cache warm). The replies still due are
        read and dropped in the background until the server closes, so no reset cuts its last writes."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None or writer.is_closing():
            return
        writer.write(frames.encode_frame(frames.END))
        with contextlib.suppress(OSError):
            writer.write_eof()
        task = asyncio.ensure_future(self._close_after_end(reader, writer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _close_after_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def until_closed() -> None:
            while await reader.read(1 << 16):
                pass

        try:
            await asyncio.wait_for(until_closed(), CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):  # OSError includes ConnectionError
            writer.transport.abort()
            return
        writer.close()

    def cancel(self) -> bool:
        """Breaks the connection: the worker frees the session's cache at once."""
        if self._writer is not None:
            self._writer.transport.abort()
        return True
