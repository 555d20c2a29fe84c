"""Sessions: GetSession/DeleteSession, resuming a session, caches freed on cancel and delete."""

from __future__ import annotations

import time

import grpc
import pytest

from specpipe.client import CoordinatorClient, build_request
from specpipe.rpc.worker_clients import DraftClient, TargetClient
from tests.conftest import Pipeline
from tests.prompts import PROMPTS


def worker_stats(pipeline: Pipeline, session_id: str) -> tuple[bool, bool]:
    """Whether the draft and the target hold a KV cache for the session."""
    import asyncio

    async def query() -> tuple[bool, bool]:
        draft, target = DraftClient(pipeline.draft.address), TargetClient(pipeline.target.address)
        try:
            d, t = await draft.stats(session_id), await target.stats(session_id)
            return d.session_cached, t.session_cached
        finally:
            await draft.close()
            await target.close()

    return asyncio.run(query())


def test_get_and_delete_session(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        result = client.generate(build_request(PROMPTS[0], 12, num_speculative_tokens=3), 60)
        info = client.get_session(result.session_id)
        assert list(info.token_ids[-12:]) == result.token_ids
        assert info.prompt_tokens == len(info.token_ids) - 12
        assert info.text.endswith(result.text)
        assert info.usage.generated_tokens == 12 and info.usage.target_passes == result.usage.target_passes
        assert 0 < info.ttl_seconds <= 24 * 3600 and info.version >= 1
        assert worker_stats(pipeline, result.session_id) == (True, True)  # kept warm for the next turn

        assert client.delete_session(result.session_id)
        assert worker_stats(pipeline, result.session_id) == (False, False)
        with pytest.raises(grpc.RpcError) as caught:
            client.get_session(result.session_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert not client.delete_session(result.session_id)
        with pytest.raises(grpc.RpcError) as caught:
            client.get_session("bad id")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("temperature", "k"), [(0.0, None), (0.0, 4), (0.9, 3)])
def test_resume_continues_exactly(pipeline: Pipeline, temperature: float, k: int | None) -> None:
    """Generate with a session_id and no prompt continues the history: split runs equal one run."""
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        whole = client.generate(build_request(PROMPTS[3], 40, temperature=temperature, seed=5,
                                              num_speculative_tokens=k), 60)  # fmt: skip
        first = client.generate(build_request(PROMPTS[3], 40, temperature=temperature, seed=5,
                                              num_speculative_tokens=k), 60)  # fmt: skip
        # Cut the second run after its first committed round, as a failure would, then resume it.
        info = client.get_session(first.session_id)
        assert list(info.token_ids[info.prompt_tokens :]) == first.token_ids
        if temperature == 0.0:
            # Greedy output never depends on where rounds start: resume from any prefix.
            cut = 17
            prefix = list(info.token_ids[: info.prompt_tokens + cut])
            fresh = client.generate(build_request(prefix, 40 - cut, num_speculative_tokens=k), 60)
            assert first.token_ids[:cut] + fresh.token_ids == whole.token_ids
        resume = build_request(
            "", 10, temperature=temperature, seed=5, session_id=first.session_id, num_speculative_tokens=k
        )
        resumed = client.generate(resume, 60)
    assert first.token_ids == whole.token_ids
    if temperature == 0.0:
        alone = CoordinatorClient(pipeline.coordinator_addr).generate(
            build_request(PROMPTS[3], 50, num_speculative_tokens=k), 60
        )
        assert whole.token_ids + resumed.token_ids == alone.token_ids


def test_cancelled_request_frees_worker_caches(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        stream = client.stub.Generate(build_request(PROMPTS[1], 200, num_speculative_tokens=2), timeout=60)
        first = next(stream)
        session_id = first.session_id
        stream.cancel()
        generated = client.get_session(session_id).usage.generated_tokens
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and worker_stats(pipeline, session_id) != (False, False):
        time.sleep(0.1)
    assert generated < 200, "the request finished before the cancellation reached it"
    assert worker_stats(pipeline, session_id) == (False, False)
