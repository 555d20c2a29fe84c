"""Direct streams (specpipe/rpc/direct_frames.py): VerifyStream's messages over plain TCP to a real target
worker, with gRPC's status codes, its rule for the session's cache, and the fallback to gRPC.

The chain semantics over both transports are in test_chained_verify.py; exactness through the rounds,
which use direct streams by default (the draft's delegated rounds and the coordinator's own), in
test_delegation.py and the test_pipeline_*.py modules."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator

import grpc
import pytest

from draft_service.delegated import DelegatedRounds
from specpipe import errors
from specpipe.client import CoordinatorClient, build_request
from specpipe.rpc import direct_frames as frames
from specpipe.rpc.direct_call import DirectStreamCall, split_address
from specpipe.rpc.direct_server import BlockingStreamHandler, DirectStreamServer
from specpipe.rpc.worker_clients import TargetClient, TargetStream
from specpipe.sampling.params import SamplingParams
from specpipe.v1 import target_pb2
from tests.conftest import Pipeline, with_target_client
from tests.prompts import PROMPTS

HISTORY = [5, 17, 42, 8, 99, 3, 61, 20]
GREEDY = SamplingParams()
TIMEOUT_S = 30.0


async def direct_stream(client: TargetClient) -> TargetStream:
    stream = await client.connect_stream(TIMEOUT_S)
    assert isinstance(stream.call, DirectStreamCall)
    return stream


async def raw_exchange(address: str, port: int, data: bytes) -> list[tuple[int, bytes]]:
    """Sends raw bytes to a direct-stream listener and returns the frames it answers until it closes."""
    host, _ = split_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    writer.write_eof()
    received = []
    try:
        while (frame := await asyncio.wait_for(frames.read_frame(reader), TIMEOUT_S)) is not None:
            received.append(frame)
    finally:
        writer.close()
    return received


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def stub_listener(handler: BlockingStreamHandler) -> tuple[DirectStreamServer, DirectStreamCall]:
    """An in-process listener answering with a stub handler, and a client stream connected to it."""
    server = DirectStreamServer("test", handler, target_pb2.VerifyRequest.FromString)
    port = await server.start("127.0.0.1", 0)
    call = DirectStreamCall("127.0.0.1", port, target_pb2.VerifyResponse.FromString, set())
    await call.connect(TIMEOUT_S)
    return server, call


def test_frames_round_trip_and_malformed_input_is_refused() -> None:
    async def main() -> None:
        data = frames.encode_frame(frames.REQUEST, b"abc") + frames.encode_frame(frames.END)
        reader = reader_of(data + frames.encode_error(3, "bad"))
        assert await frames.read_frame(reader) == (frames.REQUEST, b"abc")
        assert await frames.read_frame(reader) == (frames.END, b"")
        kind, body = await frames.read_frame(reader) or (0, b"")
        assert kind == frames.ERROR and frames.decode_error(body) == (3, "bad")
        assert await frames.read_frame(reader) is None  # a clean end between frames
        with pytest.raises(EOFError):  # a connection that ends inside a frame
            await frames.read_frame(reader_of(frames.encode_frame(frames.REQUEST, b"abcdef")[:-2]))
        with pytest.raises(frames.FrameError, match="kind"):
            await frames.read_frame(reader_of(b"\x01\x00\x00\x00\x63"))
        with pytest.raises(frames.FrameError, match="length"):
            await frames.read_frame(reader_of(b"\xff\xff\xff\xff\x02"))

    asyncio.run(main())


def test_blocking_frame_reads_match_the_async_ones() -> None:
    """read_frame_blocking (the target's stream threads) over a buffered binary file: the same frames, the
    same errors."""
    data = frames.encode_frame(frames.REQUEST, b"abc") + frames.encode_frame(frames.END)
    reader = io.BytesIO(data + frames.encode_error(3, "bad"))
    assert frames.read_frame_blocking(reader) == (frames.REQUEST, b"abc")
    assert frames.read_frame_blocking(reader) == (frames.END, b"")
    kind, body = frames.read_frame_blocking(reader) or (0, b"")
    assert kind == frames.ERROR and frames.decode_error(body) == (3, "bad")
    assert frames.read_frame_blocking(reader) is None  # a clean end between frames
    whole = frames.encode_frame(frames.REQUEST, b"abcdef")
    for cut in (whole[:3], whole[:-2]):  # inside the header, inside the body
        with pytest.raises(EOFError):
            frames.read_frame_blocking(io.BytesIO(cut))
    with pytest.raises(frames.FrameError, match="kind"):
        frames.read_frame_blocking(io.BytesIO(b"\x01\x00\x00\x00\x63"))
    with pytest.raises(frames.FrameError, match="length"):
        frames.read_frame_blocking(io.BytesIO(b"\xff\xff\xff\xff\x02"))


def test_addresses_split_into_host_and_port() -> None:
    assert split_address("127.0.0.1:50062") == ("127.0.0.1", 50062)
    assert split_address("[::1]:50062") == ("::1", 50062)
    assert split_address("target-0.specpipe:7") == ("target-0.specpipe", 7)
    with pytest.raises(ValueError):
        split_address("no-port")


def test_a_direct_stream_verifies_as_verify_stream_does(pipeline: Pipeline) -> None:
    async def test(client: TargetClient) -> None:
        info = await client.model_info(False, TIMEOUT_S)
        assert info.direct_stream_port > 0
        served = (await client.stats()).direct_streams
        over_grpc = client.open_stream(TIMEOUT_S)
        direct = await direct_stream(client)
        for k in range(4):
            history, block = HISTORY[: 4 + k], HISTORY[4 + k : 6 + k]
            expected = await over_grpc.verify("direct-grpc", history, block, [], GREEDY, TIMEOUT_S)
            got = await direct.verify("direct-tcp", history, block, [], GREEDY, TIMEOUT_S)
            assert (got.num_accepted, got.next_token_id) == (expected.num_accepted, expected.next_token_id)
        await over_grpc.finish()
        await direct.finish()
        assert (await client.stats()).direct_streams == served + 1
        for session_id in ("direct-grpc", "direct-tcp"):
            await client.release_session(session_id, TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_finished_direct_stream_keeps_the_cache_and_a_broken_one_frees_it(pipeline: Pipeline) -> None:
    async def cached(client: TargetClient, session_id: str) -> bool:
        return (await client.stats(session_id)).session_cached

    async def test(client: TargetClient) -> None:
        finished = await direct_stream(client)
        await finished.verify("direct-finished", HISTORY, [1, 2], [], GREEDY, TIMEOUT_S)
        await finished.finish()
        broken = await direct_stream(client)
        await broken.verify("direct-broken", HISTORY, [1, 2], [], GREEDY, TIMEOUT_S)
        broken.cancel()
        for _ in range(100):  # the worker notices the broken connection on its event loop
            if not await cached(client, "direct-broken"):
                break
            await asyncio.sleep(0.05)
        assert not await cached(client, "direct-broken")
        assert await cached(client, "direct-finished")
        await client.release_session("direct-finished", TIMEOUT_S)

    with_target_client(pipeline, test)


def test_bad_requests_get_grpc_status_codes_over_a_direct_stream(pipeline: Pipeline) -> None:
    async def test(client: TargetClient) -> None:
        stream = await direct_stream(client)
        with pytest.raises(errors.InvalidArgumentError, match="token_ids must be in"):
            await stream.verify("direct-bad", [10**6], [1], [], GREEDY, TIMEOUT_S)
        assert stream.broken  # as after a failed gRPC stream: the caller opens a new one
        stream.cancel()

        port = (await client.model_info(False, TIMEOUT_S)).direct_stream_port
        hello = frames.encode_frame(frames.HELLO, frames.PROTOCOL)
        # Not this protocol: FAILED_PRECONDITION, then the server closes.
        other_protocol = frames.encode_frame(frames.HELLO, b"x")
        (kind, body), *rest = await raw_exchange(client.address, port, other_protocol)
        assert kind == frames.ERROR and not rest
        assert frames.decode_error(body)[0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        # A request that is not a VerifyRequest: INVALID_ARGUMENT.
        garbage = frames.encode_frame(frames.REQUEST, b"\xff\xff\xff")
        (kind, body), *rest = await raw_exchange(client.address, port, hello + garbage)
        assert kind == frames.ERROR and not rest
        code, details = frames.decode_error(body)
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "malformed request" in details
        # A frame the protocol does not know: the connection is dropped, and the worker keeps serving.
        assert await raw_exchange(client.address, port, hello + b"\x01\x00\x00\x00\x63") == []
        healthy = await direct_stream(client)
        verdict = await healthy.verify("direct-after", HISTORY, [1], [], GREEDY, TIMEOUT_S)
        assert verdict.num_accepted in (0, 1)
        await healthy.finish()
        await client.release_session("direct-after", TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_connection_that_sends_no_hello_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process listener (a stub handler): silence past the HELLO timeout closes the connection."""
    from specpipe.rpc import direct_server

    monkeypatch.setattr(direct_server, "HELLO_TIMEOUT_S", 0.2)

    def never_called(requests: object) -> Iterator[object]:
        raise AssertionError("no stream without HELLO")
        yield  # pragma: no cover

    async def main() -> None:
        server = direct_server.DirectStreamServer("test", never_called, bytes)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""  # closed by the server
            assert server.streams_served == 0
        finally:
            writer.close()
            await server.stop(1.0)

    asyncio.run(main())


def test_large_frames_cross_in_both_directions() -> None:
    """In-process listener with a stub handler: a request of several MB (the socket takes it in pieces,
    the client drains) and its reply arrive whole; END then ends the stream normally."""
    ended: list[bool] = []

    def echo_sizes(requests: Iterator[target_pb2.VerifyRequest]) -> Iterator[object]:
        for request in requests:
            yield target_pb2.VerifyResponse(
                num_accepted=len(request.token_ids), cached_tokens=len(request.session_id)
            )
        ended.append(True)

    async def main() -> None:
        server, call = await stub_listener(echo_sizes)
        try:
            for size in (3, 1_500_000, 7):
                await call.write(
                    target_pb2.VerifyRequest(session_id="s" * size, token_ids=range(size % 1000))
                )
                reply = await asyncio.wait_for(call.read(), TIMEOUT_S)
                assert (reply.num_accepted, reply.cached_tokens) == (size % 1000, size)
            await call.done_writing()
            for _ in range(100):
                if ended:
                    break
                await asyncio.sleep(0.02)
            assert ended == [True]
        finally:
            call.cancel()
            await server.stop(1.0)

    asyncio.run(main())


def test_stopping_the_listener_ends_open_streams_after_the_grace() -> None:
    """In-process listener with a stub handler: stop() waits the grace for an open stream, then breaks it;
    the handler's cleanup runs (a target frees the session's cache there) and the port takes no more
    connections."""
    cleaned_up: list[bool] = []

    def answer_sizes(requests: Iterator[target_pb2.VerifyRequest]) -> Iterator[object]:
        try:
            for request in requests:
                yield target_pb2.VerifyResponse(num_accepted=len(request.token_ids))
        finally:
            cleaned_up.append(True)

    async def main() -> None:
        server, call = await stub_listener(answer_sizes)
        try:
            await call.write(target_pb2.VerifyRequest(session_id="s", token_ids=[1, 2]))
            assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).num_accepted == 2
            started = time.monotonic()
            await server.stop(0.3)
            assert 0.3 <= time.monotonic() - started < TIMEOUT_S
            assert cleaned_up == [True]
            assert await asyncio.wait_for(call.read(), TIMEOUT_S) is grpc.aio.EOF
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", call.port)
        finally:
            call.cancel()

    asyncio.run(main())


def test_a_listener_that_refuses_the_connection_means_grpc_then_asking_again(pipeline: Pipeline) -> None:
    async def test(client: TargetClient) -> None:
        real_port = (await client.model_info(False, TIMEOUT_S)).direct_stream_port
        client._direct_port = 1  # as after the target restarted on another port: nothing listens there
        fallback = await client.connect_stream(TIMEOUT_S)
        assert not isinstance(fallback.call, DirectStreamCall)
        verdict = await fallback.verify("direct-fallback", HISTORY, [1], [], GREEDY, TIMEOUT_S)
        assert verdict.num_accepted in (0, 1)
        await fallback.finish()
        again = await direct_stream(client)  # the port was asked for again
        assert again.call.port == real_port
        await again.finish()
        await client.release_session("direct-fallback", TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_target_without_a_listener_gets_grpc_streams() -> None:
    async def main() -> None:
        client = TargetClient("127.0.0.1:1")
        client._direct_port = 0  # what GetModelInfo says of a target started without --direct-stream-port
        try:
            stream = await client.connect_stream(TIMEOUT_S)
            assert not isinstance(stream.call, DirectStreamCall)
            stream.cancel()
        finally:
            await client.close()

    asyncio.run(main())


def direct_streams_served(pipeline: Pipeline) -> int:
    async def served() -> int:
        client = TargetClient(pipeline.target.address)
        try:
            return (await client.stats()).direct_streams
        finally:
            await client.close()

    return asyncio.run(served())


def test_the_coordinators_own_rounds_go_over_direct_streams_too(pipeline: Pipeline) -> None:
    """k = 0 requests (and --no-delegation) run on the coordinator's loop: its target stream is direct too."""

    before = direct_streams_served(pipeline)
    with CoordinatorClient(pipeline.coordinator_addr) as coordinator:
        plain = coordinator.generate(build_request(PROMPTS[0], 12, num_speculative_tokens=0), TIMEOUT_S)
    assert plain.usage is not None and plain.usage.draft_tokens == 0 and len(plain.token_ids) == 12
    assert direct_streams_served(pipeline) == before + 1


def test_delegated_rounds_go_over_direct_streams(pipeline: Pipeline) -> None:
    before = direct_streams_served(pipeline)
    with CoordinatorClient(pipeline.coordinator_addr) as coordinator:
        result = coordinator.generate(build_request(PROMPTS[0], 24), TIMEOUT_S)
    assert len(result.token_ids) == 24
    assert direct_streams_served(pipeline) > before


def test_a_target_stream_the_delegated_rounds_never_used_is_closed(pipeline: Pipeline) -> None:
    """The draft connects to the target while it drafts a request's first block; rounds that stop before the
    first block goes out (a failed draft, a cancelled call) close that connection, connected or not."""

    async def open_streams(client: TargetClient, expected: int) -> None:
        for _ in range(200):
            if (await client.stats()).open_streams == expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the target still has {(await client.stats()).open_streams} open streams")

    async def main(client: TargetClient) -> None:
        before = (await client.stats()).open_streams
        connected = asyncio.ensure_future(client.connect_stream(TIMEOUT_S))
        await asyncio.wait([connected])
        await open_streams(client, before + 1)  # after HELLO the target waits for its first block
        await DelegatedRounds.discard(connected)
        await open_streams(client, before)
        connecting = asyncio.ensure_future(client.connect_stream(TIMEOUT_S))
        await DelegatedRounds.discard(connecting)  # not connected yet: the connection is never made
        assert connecting.cancelled()
        await open_streams(client, before)

    with_target_client(pipeline, main)
