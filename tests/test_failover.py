"""Killing things mid-generation: the draft, Redis; and many sessions at once, each exact."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from specpipe.client import AsyncCoordinatorClient, CoordinatorClient, GenerationResult, build_request
from specpipe.launcher import stop_all
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, Pipeline, restart, start_pipeline, stop_pipeline
from tests.prompts import PROMPTS


@pytest.fixture(scope="module")
def failover_pipeline(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    # Its workers run on asyncio's own event loop, the other pipelines' on uvloop (the default): both loops
    # serve the same streams and fail over the same way.
    asyncio_loop = ["--event-loop", "asyncio"]
    pipeline = start_pipeline(
        model_pair, redis_server, tmp_path_factory.mktemp("failover"), None, asyncio_loop, asyncio_loop
    )
    yield pipeline
    stop_pipeline(pipeline)


@pytest.fixture
def own_pipeline(failover_pipeline: Pipeline) -> Pipeline:
    """A pipeline these tests kill parts of and restart: one for the module (a start-up costs ~10 s on two
    cores), with whatever a test left dead restarted before the next one."""
    for service in (failover_pipeline.draft, failover_pipeline.target, failover_pipeline.coordinator):
        assert service.popen is not None
        if service.popen.poll() is not None:
            restart(service)
    return failover_pipeline


def kill(pipeline_part) -> None:  # noqa: ANN001 - a ServiceProcess
    pipeline_part.popen.kill()
    pipeline_part.popen.wait()


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded-coupled"])
def test_draft_killed_mid_generation_then_restarted(own_pipeline: Pipeline, temperature: float) -> None:
    """The output equals an uninterrupted run, and the request never fails while the draft is gone.

    Greedy output never depends on the draft; seeded sampling under the coupled rule neither (the plain
    target decoding used during the outage emits the same tokens).
    """
    request = build_request(
        PROMPTS[2], 200, temperature=temperature, seed=11, num_speculative_tokens=3, acceptance="coupled"
    )
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        uninterrupted = client.generate(request, 60)
        expected = uninterrupted.token_ids
        result = GenerationResult()
        first_chunk = threading.Event()

        def consume() -> None:
            for chunk in client.stream(request, 60):
                result.add(chunk)
                first_chunk.set()
                time.sleep(0.01)  # a slow reader keeps the request running across the kill

        reader = threading.Thread(target=consume)
        reader.start()
        assert first_chunk.wait(30)
        kill(own_pipeline.draft)
        restart(own_pipeline.draft)
        reader.join(60)
    assert result.finish_reason in ("length", "eos")
    assert result.token_ids == expected
    assert result.usage is not None and uninterrupted.usage is not None
    assert result.usage.draft_tokens < uninterrupted.usage.draft_tokens, "the outage was not exercised"
    # And after the restart, speculation is back.
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        again = client.generate(request, 60)
    assert again.token_ids == expected and again.usage is not None and again.usage.draft_tokens > 0


def test_redis_killed_mid_stream_fails_fast_then_recovers(model_pair: ModelPair, tmp_path: Path) -> None:
    redis = RedisServerProcess(data_dir=str(tmp_path / "redis"))
    redis.start()
    pipeline = start_pipeline(model_pair, redis, tmp_path)
    try:
        with CoordinatorClient(pipeline.coordinator_addr) as client:
            stream = client.stream(build_request(PROMPTS[0], 200, num_speculative_tokens=1), 60)
            first = next(stream)
            redis.kill()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stream:
                    time.sleep(0.01)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "session store" in caught.value.details()
            assert time.monotonic() - started < 10
            # A failed commit fails the request; it is not taken for a failure of the delegated rounds (whose
            # continuation on the coordinator would run the session ahead of the store).
            assert "continuing here" not in pipeline.coordinator.log_tail(400)
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(build_request("x", 4), 30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

            redis.restart()  # empty: the store kept nothing on disk
            after = client.generate(build_request(PROMPTS[0], 8), 60)
            assert len(after.token_ids) == 8 and after.session_id != first.session_id
    finally:
        stop_pipeline(pipeline)
        redis.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_concurrent_sessions_equal_each_alone(pipeline: Pipeline, temperature: float) -> None:
    requests = [
        build_request(PROMPTS[i % 20], 24, temperature=temperature, seed=i, num_speculative_tokens=3)
        for i in range(32)
    ]
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        alone = [client.generate(r, 60).token_ids for r in requests]

    async def all_at_once() -> list[list[int]]:
        client = AsyncCoordinatorClient(pipeline.coordinator_addr)
        try:
            results = await asyncio.gather(*(client.generate(r, 120) for r in requests))
            return [r.token_ids for r in results]
        finally:
            await client.close()

    assert asyncio.run(all_at_once()) == alone


def test_coordinator_killed_mid_stream_then_resumed(own_pipeline: Pipeline) -> None:
    """A new coordinator continues the session from its committed prefix: the tokens equal one run."""
    request = build_request(PROMPTS[5], 250, num_speculative_tokens=2)
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        expected = client.generate(request, 60).token_ids
        stream = client.stream(request, 60)
        session_id = next(stream).session_id
        kill(own_pipeline.coordinator)
        with pytest.raises(grpc.RpcError):
            for _ in stream:
                pass
    restart(own_pipeline.coordinator)
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        info = client.get_session(session_id)
        committed = list(info.token_ids[info.prompt_tokens :])
        assert 0 < len(committed) < 250 and committed == expected[: len(committed)]
        rest = client.generate(build_request("", 250 - len(committed), session_id=session_id,
                                             num_speculative_tokens=2), 60)  # fmt: skip
    assert committed + rest.token_ids == expected


def test_store_password_from_a_file_is_never_shown(model_pair: ModelPair, tmp_path: Path) -> None:
    secret = "s3cret-Pa55"
    redis = RedisServerProcess(password=secret, data_dir=str(tmp_path / "redis"))
    redis.start()
    password_file = tmp_path / "redis-password"
    password_file.write_text(secret + "\n")
    from tests.conftest import start_coordinator, start_worker

    draft = start_worker("draft", model_pair.draft_dir, tmp_path)
    target = start_worker("target", model_pair.target_dir, tmp_path)
    url = f"redis://127.0.0.1:{redis.port}/0"
    coordinator = start_coordinator(
        draft.address, target.address, url, tmp_path, ["--redis-password-file", str(password_file)]
    )
    try:
        for service in (draft, target, coordinator):
            service.wait_serving(120)
        with CoordinatorClient(coordinator.address) as client:
            assert len(client.generate(build_request(PROMPTS[0], 6), 60).token_ids) == 6
        assert coordinator.popen is not None
        cmdline = Path(f"/proc/{coordinator.popen.pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline
    finally:
        stop_all([coordinator, target, draft])
        redis.stop()
    assert secret not in coordinator.log_path.read_text()


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded-coupled"])
def test_target_killed_mid_generation_then_resumed(own_pipeline: Pipeline, temperature: float) -> None:
    """UNAVAILABLE while no target is left; the committed prefix stays; resuming finishes identically."""
    request = build_request(
        PROMPTS[7], 250, temperature=temperature, seed=3, num_speculative_tokens=2, acceptance="coupled"
    )
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        expected = client.generate(request, 60).token_ids
        stream = client.stream(request, 60)
        session_id = next(stream).session_id
        kill(own_pipeline.target)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        restart(own_pipeline.target)
        info = client.get_session(session_id)
        committed = list(info.token_ids[info.prompt_tokens :])
        assert committed == expected[: len(committed)]
        resume = build_request(
            "", 250 - len(committed), temperature=temperature, seed=3, session_id=session_id,
            num_speculative_tokens=2, acceptance="coupled",
        )  # fmt: skip
        rest = client.generate(resume, 60)
    assert committed + rest.token_ids == expected
