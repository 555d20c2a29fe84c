"""Workers that die or disagree: UNAVAILABLE within the deadline, no hang, no corrupted session."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from specpipe.client import CoordinatorClient, build_request
from specpipe.launcher import ServiceProcess, health_status, stop_all
from specpipe.models.tiny_pair import TinyPairSpec, build_tiny_pair
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, Pipeline, start_coordinator, start_worker


def kill(service: ServiceProcess) -> None:
    assert service.popen is not None
    service.popen.kill()
    service.popen.wait()


def session_snapshot(pipeline: Pipeline, session_id: str) -> tuple[bytes | None, bytes | None]:
    store = redis.Redis.from_url(pipeline.redis.url)
    key = f"specpipe:session:{session_id}"
    return store.hget(key, "version"), store.get(f"{key}:tokens")


def test_health_serving_on_every_service(pipeline: Pipeline) -> None:
    for service in (pipeline.draft, pipeline.target, pipeline.coordinator):
        assert health_status(service.address) == health_pb2.HealthCheckResponse.SERVING


def test_dead_workers_keep_sessions_intact(own_pipeline: Pipeline) -> None:
    """A dead draft means plain target decoding; a dead target means UNAVAILABLE, fast; sessions intact."""
    with CoordinatorClient(own_pipeline.coordinator_addr) as client:
        session = client.generate(build_request("def f(x):", 12), timeout_s=60)
        before = session_snapshot(own_pipeline, session.session_id)
        expected = client.generate(build_request("hello", 16, num_speculative_tokens=3), timeout_s=60)

        kill(own_pipeline.draft)
        started = time.monotonic()
        without_draft = client.generate(build_request("hello", 16, num_speculative_tokens=3), timeout_s=30)
        assert without_draft.token_ids == expected.token_ids  # greedy never depends on the draft
        assert without_draft.usage is not None and without_draft.usage.draft_tokens == 0
        assert time.monotonic() - started < 10, "a dead draft must not stall the request"

        kill(own_pipeline.target)
        for request in (
            build_request("hello", 16),
            build_request("more", 16, session_id=session.session_id),
            build_request("scored", 16, prompt_logprobs=2),  # its first call is ScorePrompt
        ):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(request, timeout_s=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "target worker" in caught.value.details()
            assert time.monotonic() - started < 10, "a dead worker must fail fast, not hang"

    # The committed session is untouched by the failed continuation.
    assert session_snapshot(own_pipeline, session.session_id) == before


def test_sigterm_drains_and_exits_cleanly(own_pipeline: Pipeline) -> None:
    for service in (own_pipeline.coordinator, own_pipeline.draft, own_pipeline.target):
        assert service.popen is not None
        service.popen.send_signal(signal.SIGTERM)
        assert service.popen.wait(timeout=30) == 0, service.log_tail()


def test_coordinator_refuses_workers_with_different_tokenizers(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    other_target, other_draft = build_tiny_pair(tmp_path / "other", TinyPairSpec(vocab_size=400))
    draft = start_worker("draft", other_draft, tmp_path)
    target = start_worker("target", model_pair.target_dir, tmp_path)
    try:
        # Started with the workers: it pairs them as they come up, and must refuse them then.
        coordinator = start_coordinator(draft.address, target.address, redis_server.url, tmp_path)
        assert coordinator.popen is not None
        try:
            code = coordinator.popen.wait(timeout=120)
        except subprocess.TimeoutExpired:
            coordinator.stop()
            pytest.fail("the coordinator started with mismatched workers")
        log = coordinator.log_tail()
        assert code != 0
        assert "different tokenizers" in log
        assert str(other_draft) in log and str(model_pair.target_dir) in log
    finally:
        stop_all([draft, target])
