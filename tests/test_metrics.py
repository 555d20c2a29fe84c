"""Prometheus metrics: the coordinator's observer bookkeeping, then real scrapes of /metrics over HTTP from
the shared coordinator and workers after real requests."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorMetrics
from coordinator.request import GenerationChunk, Usage
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import InvalidArgumentError
from tests.conftest import Pipeline
from tests.prompts import PROMPTS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def registry_samples(metrics: CoordinatorMetrics) -> Samples:
    from prometheus_client import generate_latest

    return samples(generate_latest(metrics.registry).decode())


def test_a_request_is_counted_with_its_outcome_tokens_and_latencies() -> None:
    metrics = CoordinatorMetrics()
    usage = Usage(prompt_tokens=7, generated_tokens=5, draft_tokens=6, accepted_tokens=4, target_passes=2)
    with metrics.request() as observed:
        assert registry_samples(metrics)[("specpipe_requests_running", ())] == 1
        observed.chunk(GenerationChunk("s", [1, 2, 3], "abc"), metrics)
        observed.chunk(GenerationChunk("s", [4, 5], "de", "length", usage), metrics)
    got = registry_samples(metrics)
    assert got[("specpipe_requests_running", ())] == 0
    assert got[("specpipe_requests_total", (("outcome", "length"),))] == 1
    assert got[("specpipe_generated_tokens_total", ())] == 5
    assert got[("specpipe_prompt_tokens_total", ())] == 7
    assert got[("specpipe_draft_tokens_total", ())] == 6
    assert got[("specpipe_accepted_tokens_total", ())] == 4
    assert got[("specpipe_target_passes_total", ())] == 2
    assert got[("specpipe_time_to_first_token_seconds_count", ())] == 1
    assert got[("specpipe_time_per_output_token_seconds_count", ())] == 1
    assert got[("specpipe_request_duration_seconds_count", ())] == 1


def test_each_of_n_interleaved_completions_has_its_own_time_per_output_token() -> None:
    """Two completions streaming at once, a token each per 20 ms: each one's TPOT is 20 ms, where the
    request's chunks together arrive every 10 ms."""
    metrics = CoordinatorMetrics()
    with metrics.request() as observed:
        for step in range(4):
            for index in (0, 1):
                observed.chunk(GenerationChunk("s", [step], "x", index=index), metrics)
                time.sleep(0.01)
    got = registry_samples(metrics)
    assert got[("specpipe_time_per_output_token_seconds_count", ())] == 2
    assert got[("specpipe_time_per_output_token_seconds_sum", ())] / 2 >= 0.019


def test_failed_and_abandoned_requests_are_counted_by_status() -> None:
    metrics = CoordinatorMetrics()
    with pytest.raises(InvalidArgumentError), metrics.request():
        raise InvalidArgumentError("bad")
    with pytest.raises(RuntimeError), metrics.request():
        raise RuntimeError("bug")

    def abandoned() -> object:
        with metrics.request() as observed:
            observed.chunk(GenerationChunk("s", [1], "a"), metrics)
            yield 1  # the client leaves here: the generator is closed (GeneratorExit)
            yield 2

    stream = abandoned()
    next(stream)  # type: ignore[call-overload]
    stream.close()  # type: ignore[attr-defined]
    got = registry_samples(metrics)
    for outcome in ("INVALID_ARGUMENT", "INTERNAL", "CANCELLED"):
        assert got[("specpipe_requests_total", (("outcome", outcome),))] == 1, outcome
    assert got[("specpipe_requests_running", ())] == 0
    assert got[("specpipe_generated_tokens_total", ())] == 1  # streamed before it left
    assert got[("specpipe_time_per_output_token_seconds_count", ())] == 0  # one token: no interval


def scrape(
    pipeline: Pipeline, component: str = "coordinator"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{pipeline.metrics_ports[component]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - a loopback URL built here
        assert reply.status == 200
        assert reply.headers.get_content_type() == "text/plain"
        return samples(reply.read().decode())


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_coordinator_serves_metrics_of_real_requests(pipeline: Pipeline) -> None:
    before = scrape(pipeline)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        result = client.generate(build_request(PROMPTS[1], 20, num_speculative_tokens=3), 60)
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request(PROMPTS[1], 0), 60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(pipeline)
    assert result.usage is not None and len(result.token_ids) == 20
    finished = value(after, "specpipe_requests_total", outcome=result.finish_reason)
    assert finished == value(before, "specpipe_requests_total", outcome=result.finish_reason) + 1
    rejected = value(after, "specpipe_requests_total", outcome="INVALID_ARGUMENT")
    assert rejected == value(before, "specpipe_requests_total", outcome="INVALID_ARGUMENT") + 1
    for name, expected in (
        ("specpipe_generated_tokens_total", 20),
        ("specpipe_draft_tokens_total", result.usage.draft_tokens),
        ("specpipe_accepted_tokens_total", result.usage.accepted_tokens),
        ("specpipe_target_passes_total", result.usage.target_passes),
        ("specpipe_prompt_tokens_total", result.usage.prompt_tokens),
    ):
        assert value(after, name) - value(before, name) == expected, name
    assert value(after, "specpipe_time_to_first_token_seconds_count") > value(
        before, "specpipe_time_to_first_token_seconds_count"
    )
    assert value(after, "specpipe_requests_running") == 0


def test_workers_serve_their_forward_times_and_stats(pipeline: Pipeline) -> None:
    before = {role: scrape(pipeline, role) for role in ("draft", "target")}
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        result = client.generate(build_request(PROMPTS[2], 16, num_speculative_tokens=3), 60)
    assert result.usage is not None and result.usage.draft_tokens > 0
    after = {role: scrape(pipeline, role) for role in ("draft", "target")}
    for role in ("draft", "target"):
        forwards = "specpipe_worker_forward_seconds_count"
        assert value(after[role], forwards, role=role) > value(before[role], forwards, role=role), role
        assert value(after[role], "specpipe_worker_cached_sessions", role=role) >= 1, role
        assert ("specpipe_worker_cache_evictions_total", (("role", role),)) in after[role]
        # Jobs the request left on the model thread (a stream's clean-up) finish right after it; the gauge is
        # read again until they have, rather than racing them.
        deadline = time.monotonic() + 10.0
        while value(scrape(pipeline, role), "specpipe_worker_model_jobs", role=role) != 0:
            assert time.monotonic() < deadline, f"{role}: model jobs still running 10 s after the request"
            time.sleep(0.05)
    # Each role reports its own counters only.
    assert value(after["target"], "specpipe_worker_direct_streams_total", role="target") > value(
        before["target"], "specpipe_worker_direct_streams_total", role="target"
    )
    assert value(after["draft"], "specpipe_worker_delegated_rounds_total", role="draft") > value(
        before["draft"], "specpipe_worker_delegated_rounds_total", role="draft"
    )
    assert not any(name.startswith("specpipe_worker_chained") for name, _ in after["draft"])
    assert not any(name.startswith("specpipe_worker_delegated") for name, _ in after["target"])
