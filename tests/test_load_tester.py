"""`specpipe bench load` against the shared pipeline over real gRPC: concurrent streams, the summary's
latencies and throughput, and failed requests counted by status code instead of raised."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import load
from specpipe.rpc.event_loop import resolve


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "load.json"
    assert load.main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_concurrent_streams_against_the_pipeline(pipeline, tmp_path: Path, capsys) -> None:
    args = ["--address", pipeline.coordinator_addr, "--num-requests", "6", "--concurrency", "3"]
    payload = _run(tmp_path, *args, "--max-new-tokens", "8", "--ignore-eos")
    summary = payload["summary"]
    assert summary["requests"] == 6 and summary["completed"] == 6, payload["requests"]
    assert summary["failed"] == 0 and summary["failures_by_status"] == {}
    assert summary["output_tokens"] == 48  # --ignore-eos: every request runs to max_new_tokens
    assert summary["output_token_throughput_per_s"] > 0 and summary["request_throughput_per_s"] > 0
    for key in ("ttft_ms", "itl_ms", "e2e_latency_ms"):
        stats = summary[key]
        assert 0 < stats["median"] <= stats["p90"] <= stats["p99"], (key, stats)
    for request in payload["requests"]:
        assert request["status"] == "OK" and 0 < request["ttft_s"] <= request["e2e_s"]
        assert request["token_chunk_s"] == sorted(request["token_chunk_s"])
        assert 0 < request["target_passes"] <= request["output_tokens"]
        assert 0 <= request["accepted_tokens"] <= request["draft_tokens"]
    spec = summary["speculation"]
    assert spec["target_passes"] == sum(r["target_passes"] for r in payload["requests"])
    assert spec["tokens_per_target_pass"] == pytest.approx(summary["output_tokens"] / spec["target_passes"])
    assert spec["draft_tokens"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    assert payload["command"].startswith("specpipe bench load --address")
    out = capsys.readouterr().out
    assert "TTFT" in out and f"client on {resolve('auto')}" in out
    assert "tokens per target pass" in out


def test_the_same_load_through_the_openai_http_api(pipeline, tmp_path: Path) -> None:
    """--http-url: streamed /v1/completions; tokens from the usage event, chunks from the text events, no
    speculation figures; refusals counted by HTTP status."""
    args = ["--http-url", pipeline.http_url, "--num-requests", "4", "--concurrency", "2"]
    payload = _run(tmp_path, *args, "--max-new-tokens", "8", "--ignore-eos")
    summary = payload["summary"]
    assert summary["completed"] == 4 and summary["output_tokens"] == 32, payload["requests"]
    assert (
        summary["speculation"] is None
        and 0 < summary["ttft_ms"]["median"] <= summary["e2e_latency_ms"]["p99"]
    )
    assert all(
        r["token_chunk_s"] == sorted(r["token_chunk_s"]) and r["token_chunk_s"] for r in payload["requests"]
    )
    summary = _run(tmp_path, *args, "--max-new-tokens", "1000000")["summary"]
    assert summary["failures_by_status"] == {"HTTP 400": 4}
    unreachable = ["--http-url", "http://127.0.0.1:1", "--num-requests", "2", "--timeout", "5"]
    assert _run(tmp_path, *unreachable)["summary"]["failures_by_status"] == {"ClientConnectorError": 2}
    # --chat: the prompts as users' messages, through the chat template.
    chat = _run(tmp_path, *args, "--chat", "--max-new-tokens", "8", "--ignore-eos")
    assert chat["summary"]["completed"] == 4 and chat["summary"]["output_tokens"] == 32, chat["requests"]
    assert all(r["token_chunk_s"] for r in chat["requests"])


def test_failed_requests_are_counted_by_status(pipeline, tmp_path: Path) -> None:
    # Beyond the coordinator's max_new_tokens limit: every request is refused, none crashes the test.
    args = ["--address", pipeline.coordinator_addr, "--num-requests", "3", "--max-new-tokens", "1000000"]
    summary = _run(tmp_path, *args)["summary"]
    assert summary["completed"] == 0 and summary["failures_by_status"] == {"INVALID_ARGUMENT": 3}
    assert summary["ttft_ms"] is None and summary["output_token_throughput_per_s"] == 0.0

    # On asyncio's own loop too (--event-loop; the default is uvloop where it is installed, as the services).
    unreachable = ["--address", "127.0.0.1:1", "--num-requests", "2", "--timeout", "5"]
    unreachable += ["--event-loop", "asyncio"]
    summary = _run(tmp_path, *unreachable)["summary"]
    assert summary["failures_by_status"] == {"UNAVAILABLE": 2}


def test_poisson_arrivals_are_seeded() -> None:
    offsets = load.arrival_offsets(2000, 4.0, seed=7)
    assert offsets == load.arrival_offsets(2000, 4.0, seed=7)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.25, rel=0.1)  # mean gap 1 / rate
    assert load.arrival_offsets(3, math.inf, seed=7) == [0.0, 0.0, 0.0]


def test_percentiles_are_nearest_rank() -> None:
    stats = load.percentiles_ms([i / 1000.0 for i in range(1, 101)])  # 1..100 ms
    assert stats == pytest.approx({"mean": 50.5, "median": 50.5, "p90": 90.0, "p99": 99.0})
    assert load.percentiles_ms([]) is None


def test_bad_arguments_exit_with_usage() -> None:
    with pytest.raises(SystemExit):
        load.parse_args(["--concurrency", "0"])
    with pytest.raises(SystemExit):
        load.parse_args(["--request-rate", "0"])


def test_speculation_stats_sum_the_requests_final_usage() -> None:
    """Acceptance over every drafted token, tokens per target pass over every pass; k = 0 drafts nothing."""
    first = load.RequestRecord(0, output_tokens=10, draft_tokens=8, accepted_tokens=6, target_passes=3)
    second = load.RequestRecord(1, output_tokens=6, draft_tokens=4, accepted_tokens=1, target_passes=3)
    spec = load.speculation([first, second])
    assert spec == {
        "target_passes": 6, "draft_tokens": 12, "accepted_tokens": 7,
        "acceptance_rate": pytest.approx(7 / 12), "tokens_per_target_pass": pytest.approx(16 / 6),
    }  # fmt: skip
    plain = load.RequestRecord(2, output_tokens=4, target_passes=4)
    assert load.speculation([plain]) == {
        "target_passes": 4, "draft_tokens": 0, "accepted_tokens": 0,
        "acceptance_rate": 0.0, "tokens_per_target_pass": 1.0,
    }  # fmt: skip
    assert load.speculation([load.RequestRecord(3)]) is None  # failed before any pass
