"""Bad input gets a clear status naming the field; nothing is written for a failed request."""

from __future__ import annotations

import grpc
import pytest
import redis

from specpipe.client import CoordinatorClient, build_request
from specpipe.v1 import coordinator_pb2
from tests.conftest import Pipeline


def session_keys(pipeline: Pipeline) -> set[bytes]:
    return set(redis.Redis.from_url(pipeline.redis.url).scan_iter(match="specpipe:session:*"))


def call_error(pipeline: Pipeline, request: coordinator_pb2.GenerateRequest) -> grpc.RpcError:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(request, timeout_s=30)
    return caught.value


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (build_request("", 8), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (build_request("hi", 0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (build_request("hi", 257), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (build_request("hi", 8, temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (build_request("hi", 8, temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (build_request("hi", 8, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (build_request("hi", 8, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (build_request([1] * 600, 8), grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
        (build_request("x" * 10**6, 8), grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),  # not encoded
        (build_request([10**6], 8), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        (
            build_request("hi", 8, num_speculative_tokens=99),
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_speculative",
        ),
        (build_request("hi", 8, stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (build_request("hi", 8, session_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (build_request("hi", 8, session_id="no-such-session"), grpc.StatusCode.NOT_FOUND, "no-such-session"),
    ],
    ids=[
        "empty-prompt",
        "zero-tokens",
        "too-many-tokens",
        "negative-temperature",
        "nan-temperature",
        "top-p-zero",
        "top-p-above-one",
        "prompt-too-long",
        "prompt-text-too-long-to-encode",
        "token-id-out-of-range",
        "k-too-large",
        "empty-stop",
        "malformed-session-id",
        "unknown-session-id",
    ],  # fmt: skip
)
def test_bad_input_status(
    pipeline: Pipeline, request_: coordinator_pb2.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    before = session_keys(pipeline)
    error = call_error(pipeline, request_)
    assert error.code() == code, error.details()
    assert field in error.details()
    assert session_keys(pipeline) == before, "a rejected request must not write a session"


def test_both_prompt_forms_rejected(pipeline: Pipeline) -> None:
    request = build_request("hi", 8)
    request.prompt_token_ids.extend([1, 2])
    error = call_error(pipeline, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in error.details()


def test_prompt_filling_the_context_is_rejected(pipeline: Pipeline) -> None:
    error = call_error(pipeline, build_request([1] * 512, 4))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generation_stops_at_the_context_limit(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        result = client.generate(build_request([5] * 500, 64, num_speculative_tokens=8), timeout_s=60)
    assert result.finish_reason in ("length", "eos")
    assert 500 + len(result.token_ids) <= 512


def test_deadline_exceeded(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request("hi", 256), timeout_s=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_requests_over_the_limit_wait_in_line_where_one_is_configured(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """--max-waiting-requests: a request finding the limit full waits for a slot and is served once one
    frees; one finding the line full too is refused (gRPC and HTTP share both)."""
    import asyncio

    import aiohttp

    from specpipe.client import AsyncCoordinatorClient
    from specpipe.launcher import free_port
    from tests.conftest import start_coordinator

    http_port = free_port()
    coordinator = start_coordinator(
        pipeline.draft.address, pipeline.target.address, pipeline.redis.url,
        tmp_path_factory.mktemp("waiting"),
        extra=["--max-concurrent-requests", "1", "--max-waiting-requests", "1",
               "--http-port", str(http_port)],
    )  # fmt: skip
    long_request = build_request("hello", 256, num_speculative_tokens=0, ignore_eos=True)

    async def main() -> None:
        async with AsyncCoordinatorClient(coordinator.address) as client, aiohttp.ClientSession() as http:
            running = client.stub.Generate(long_request, timeout=60)
            await running.read()
            waiting = asyncio.create_task(client.generate(build_request("hi", 4), timeout_s=60))
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{http_port}/metrics") as response:
                    if "specpipe_requests_waiting 1.0" in await response.text():
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the second request never waited")
            body = {"prompt": "hi", "max_tokens": 4}
            async with http.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body) as response:
                assert response.status == 429  # the line is full
                assert "1 waiting" in (await response.json())["error"]["message"]
            assert not waiting.done()
            running.cancel()
            assert len((await waiting).token_ids) == 4  # served once the slot freed

    try:
        coordinator.wait_serving(120)
        asyncio.run(main())
    finally:
        coordinator.stop()


def test_requests_over_the_concurrency_limit_get_resource_exhausted(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A coordinator serving its limit of Generate calls refuses one more at once, and serves again once they
    end."""
    import asyncio

    import aiohttp

    from specpipe.client import AsyncCoordinatorClient
    from specpipe.launcher import free_port
    from tests.conftest import start_coordinator

    http_port = free_port()
    coordinator = start_coordinator(
        pipeline.draft.address, pipeline.target.address, pipeline.redis.url,
        tmp_path_factory.mktemp("limited"),
        extra=["--max-concurrent-requests", "2", "--http-port", str(http_port)],
    )  # fmt: skip
    completions_url = f"http://127.0.0.1:{http_port}/v1/completions"
    # Long enough to be in flight while the third call arrives: one target pass per token, 256 of them.
    long_request = build_request("hello", 256, num_speculative_tokens=0, ignore_eos=True)

    async def main() -> None:
        async with AsyncCoordinatorClient(coordinator.address) as client:
            streams = [client.stub.Generate(long_request, timeout=60) for _ in range(2)]
            for stream in streams:
                await stream.read()  # both are being served
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate(build_request("hi", 4), timeout_s=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-requests" in (caught.value.details() or "")
            # The HTTP API counts against the same limit: 429, OpenAI's "retry later".
            async with aiohttp.ClientSession() as http:
                async with http.post(completions_url, json={"prompt": "hi", "max_tokens": 4}) as response:
                    assert response.status == 429
                    assert "--max-concurrent-requests" in (await response.json())["error"]["message"]
            for stream in streams:
                stream.cancel()
            for _ in range(100):  # the cancelled calls end on the server shortly after
                try:
                    result = await client.generate(build_request("hi", 4), timeout_s=30)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.05)
            assert len(result.token_ids) == 4
            # n completions take n of the limit: more than it can ever serve is invalid, not a retry.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate(build_request("hi", 4, temperature=1.0, n=3), timeout_s=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            async for chunk in client.stream(build_request("hi", 4, temperature=1.0, n=2), timeout_s=30):
                if chunk.finish_reason:
                    assert len(chunk.token_ids) <= 4 and chunk.index in (0, 1)
            # An HTTP body's prompts are admitted together: 2 prompts x n = 2 can never run whole.
            async with aiohttp.ClientSession() as http:
                body = {"prompt": ["hi", "ho"], "max_tokens": 4, "n": 2}
                async with http.post(completions_url, json=body) as response:
                    assert response.status == 400
                    assert "4 completions at once" in (await response.json())["error"]["message"]
                body = {"prompt": ["hi", "ho"], "max_tokens": 4}
                async with http.post(completions_url, json=body) as response:
                    assert response.status == 200 and len((await response.json())["choices"]) == 2

    try:
        coordinator.wait_serving(120)
        asyncio.run(main())
    finally:
        coordinator.stop()
