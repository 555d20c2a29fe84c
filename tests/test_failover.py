"""Killing things mid-generation: the draft, Redis; and many sessions at once, each exact."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from specpipe.client import AsyncCoordinatorClient, CoordinatorClient, GenerationResult, build_request
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, Pipeline, restart, start_pipeline, stop_pipeline
from tests.prompts import PROMPTS


def kill(pipeline_part) -> None:  # noqa: ANN001 - a ServiceProcess
    pipeline_part.popen.kill()
    pipeline_part.popen.wait()


def test_draft_killed_mid_generation_then_restarted(own_pipeline: Pipeline) -> None:
    """Greedy: the output equals an uninterrupted run; the request never fails while the draft is gone."""
    request = build_request(PROMPTS[2], 200, num_speculative_tokens=3)
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        expected = client.generate(request, 60).token_ids
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
