"""The wire format of direct streams: a session stream's protobuf messages over plain TCP, without gRPC.

A direct stream carries exactly what a TargetService.VerifyStream call carries (VerifyRequest messages one
way, VerifyResponse messages the other, answered in order), framed as

    length (4 bytes, little-endian, of what follows) | kind (1 byte) | body

Client to server: HELLO (body: the protocol name, the first frame), REQUEST (a serialized request), END (no
body: the client is done writing, the stream ends normally and the worker keeps the session's cache warm).
Server to client: REPLY (a serialized reply), ERROR (4-byte little-endian gRPC status code, then UTF-8
details; the server closes the connection after it). A connection that ends without END, or breaks, is a
cancelled stream: the worker frees the session's cache, as for a cancelled gRPC call.

Why it exists: on a loaded machine a gRPC asyncio message passes through gRPC's own threads before it
reaches the event loop (docs/architecture.md, "Direct streams"); the hot exchange between a draft worker and
its target pays that twice per round.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import BinaryIO

from specpipe.rpc.server import MAX_MESSAGE_BYTES

PROTOCOL = b"specpipe-verify-stream/1"

HELLO = 1
REQUEST = 2
END = 3
REPLY = 4
ERROR = 5

KINDS = frozenset({HELLO, REQUEST, END, REPLY, ERROR})

_HEADER = struct.Struct("<IB")  # length of kind + body, kind
_CODE = struct.Struct("<I")


# TCP keepalive on both ends: a peer that vanished without closing (a node lost) is noticed in ~90 s, and its
# stream ends (the server then frees the session's cache) instead of holding a connection forever.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3


def enable_keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class FrameError(ConnectionError):
    """The peer sent something that is not a frame of this protocol; the connection is unusable."""


def encode_frame(kind: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(len(body) + 1, kind) + body


def encode_error(code: int, details: str) -> bytes:
    return encode_frame(ERROR, _CODE.pack(code) + details.encode("utf-8", errors="replace"))


def decode_error(body: bytes) -> tuple[int, str]:
    """(gRPC status code number, details) of an ERROR frame's body."""
    if len(body) < _CODE.size:
        raise FrameError("an error frame without a status code")
    (code,) = _CODE.unpack_from(body)
    return code, body[_CODE.size :].decode("utf-8", errors="replace")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The next (kind, body), or None at a clean end of the connection (between frames).

    Raises FrameError for a malformed frame and asyncio.IncompleteReadError (an EOFError) for a connection
    that ends inside a frame.
    """
    header = await reader.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        header += await reader.readexactly(_HEADER.size - len(header))
    length, kind = _parse_header(header)
    body = await reader.readexactly(length - 1) if length > 1 else b""
    return kind, body


def read_frame_blocking(reader: BinaryIO) -> tuple[int, bytes] | None:
    """read_frame's twin for a buffered binary file over a blocking socket (socket.makefile("rb")).

    Raises FrameError for a malformed frame and EOFError for a connection that ends inside a frame.
    """
    header = reader.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise EOFError("the connection ended inside a frame header")
    length, kind = _parse_header(header)
    body = reader.read(length - 1) if length > 1 else b""
    if len(body) < length - 1:
        raise EOFError("the connection ended inside a frame")
    return kind, body


def _parse_header(header: bytes) -> tuple[int, int]:
    length, kind = _HEADER.unpack(header)
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if not 1 <= length <= MAX_MESSAGE_BYTES + 1:  # gRPC's limit, for the same messages
        raise FrameError(f"frame length {length} out of range")
    return length, kind
