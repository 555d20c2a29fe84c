"""Pipelining and adaptive k change speed, never tokens: a second coordinator with both off must agree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.launcher import ServiceProcess
from specpipe.runtime.stream_history import StreamHistory, resolve_history
from tests.conftest import Pipeline, start_coordinator
from tests.prompts import PROMPTS


@pytest.fixture(scope="module")
def plain_coordinator(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log_dir: Path = tmp_path_factory.mktemp("plain-coordinator")
    coordinator = start_coordinator(
        pipeline.draft.address,
        pipeline.target.address,
        pipeline.redis.url,
        log_dir,
        ["--no-pipelining", "--no-adaptive-k", "--num-speculative-tokens", "3"],
    )
    try:
        coordinator.wait_serving(120)
        yield coordinator
    finally:
        coordinator.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_pipelining_does_not_change_tokens(
    pipeline: Pipeline, plain_coordinator: ServiceProcess, temperature: float
) -> None:
    with (
        CoordinatorClient(pipeline.coordinator_addr) as pipelined,
        CoordinatorClient(plain_coordinator.address) as plain,
    ):
        for seed, prompt in enumerate(PROMPTS[:8]):
            request = build_request(prompt, 32, temperature=temperature, seed=seed, num_speculative_tokens=3)
            assert pipelined.generate(request, 60).token_ids == plain.generate(request, 60).token_ids


def test_adaptive_k_greedy_equals_fixed_k(pipeline: Pipeline, plain_coordinator: ServiceProcess) -> None:
    with (
        CoordinatorClient(pipeline.coordinator_addr) as adaptive,
        CoordinatorClient(plain_coordinator.address) as fixed,
    ):
        for prompt in PROMPTS[:8]:
            result = adaptive.generate(build_request(prompt, 32), 60)  # no k: the adaptive policy
            assert result.token_ids == fixed.generate(build_request(prompt, 32), 60).token_ids
            assert result.usage is not None and result.usage.draft_tokens > 0


def test_stream_history_applies_deltas() -> None:
    history = StreamHistory()
    assert history.apply(0, [1, 2, 3]) == (1, 2, 3)
    assert history.apply(3, [4]) == (1, 2, 3, 4)
    assert history.apply(2, [9, 9]) == (1, 2, 9, 9)  # a rejected suffix is replaced
    with pytest.raises(FailedPreconditionError):
        history.apply(5, [1])
    assert resolve_history(0, [5, 6], None) == (5, 6)
    with pytest.raises(InvalidArgumentError):
        resolve_history(1, [5, 6], None)


def test_packed_and_listed_draft_probabilities_decode_alike() -> None:
    import torch

    from specpipe.sampling.draft_sampling import compact_support, expand_distribution
    from specpipe.v1 import common_pb2
    from target_service.verifier import distribution_values

    probs = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    for q in (probs, torch.where(probs > probs.median(), probs, torch.zeros(()))):  # dense, then sparse
        ids, values = compact_support(q)
        packed = common_pb2.TokenDistribution(
            token_ids=ids, packed_probs=values.numpy().astype("<f4").tobytes()
        )
        listed = common_pb2.TokenDistribution(token_ids=ids, probs=values.tolist())
        a = expand_distribution(ids, distribution_values(packed), 64)
        b = expand_distribution(ids, distribution_values(listed), 64)
        assert torch.equal(a, b) and torch.equal(a, q.to(torch.float32))
    with pytest.raises(InvalidArgumentError):
        distribution_values(common_pb2.TokenDistribution(packed_probs=b"\x00\x00\x00"))
