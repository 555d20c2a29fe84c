"""Smoke test of `specpipe bench latency --quick` (the real services and baselines on a tiny pair), and the
interleaving and pilot decisions of benchmarks.latency with fake variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specpipe.models.tiny_pair import build_tiny_pair
from specpipe.sampling.params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("plain-1t", "hf-generate", "hf-assisted", "specpipe-k0", "specpipe-k2-pipe", "specpipe-lookup")
ROW_KEYS = {
    "variant", "mode", "tokens", "wall_s", "tokens_per_s", "speedup_vs_plain", "speedup_vs_hf_assisted",
    "acceptance_rate", "mean_accepted_length", "mean_k", "alpha", "overhead_ms_per_round",
    "analytical_speedup", "efficiency", "match_vs_plain",
}  # fmt: skip


@pytest.mark.slow  # about 45 s on a 2-core machine: five processes start
def test_bench_latency_quick(tmp_path: Path) -> None:
    """The workers run with static KV slots (`--static-kv-slots`, CUDA graphs on a GPU): the flag reaches
    them, and every greedy output through them is still the target's own."""
    target_dir, draft_dir = build_tiny_pair(tmp_path / "pair")
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "specpipe", "bench", "latency", "--quick",
        "--target-model", str(target_dir), "--draft-model", str(draft_dir),
        "--num-prompts", "2", "--max-new-tokens", "8", "--variants", ",".join(VARIANTS),
        "--max-speculative-tokens", "4", "--out-dir", str(out_dir), "--static-kv-slots", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "greedy outputs vs plain-1t: every variant 2/2 identical" in proc.stdout, proc.stdout
    assert "total wall time:" in proc.stdout, proc.stdout

    payload = json.loads((out_dir / "latency.json").read_text(encoding="utf-8"))
    assert {"meta", "costs", "results", "targets", "round_trip_probes"} <= payload.keys()
    assert payload["meta"]["num_prompts"] == 2 and payload["meta"]["max_new_tokens"] == 8
    assert payload["meta"]["method"].startswith("interleaved") and payload["meta"]["pilot"] == {}
    machine = payload["meta"]["machine"]
    assert (machine["device"], machine["dtype"], machine["static_kv_slots"]) == ("cpu", "float32", 2)
    assert "models on CPU in float32, workers with 2 static KV slots" in machine["description"]
    logs = out_dir / "logs"
    assert "static KV slots" in (logs / "target.log").read_text(encoding="utf-8")
    assert payload["costs"]["target_ms"] > 0 and payload["costs"]["c"] > 0
    rows = {(r["variant"], r["mode"]): r for r in payload["results"]}
    # With static KV slots, plain decoding through the workers' static forward is a baseline too.
    assert set(rows) == {(v, m) for v in (*VARIANTS, "plain-static") for m in ("greedy", "sample")}
    for row in rows.values():
        assert row["error"] is None, (row["variant"], row["mode"], row["error"])
        assert ROW_KEYS <= row.keys()
        assert 0 < row["tokens"] <= 16  # EOS may end a prompt early
        assert row["tokens_per_s"] > 0
    for variant in (*VARIANTS, "plain-static"):
        assert rows[(variant, "greedy")]["match_vs_plain"] == "2/2"
    # The same keyed draws as plain-1t's, through the lean forward: the same tokens in float32 here.
    assert rows[("plain-static", "sample")]["match_vs_plain"] == "2/2"
    assert rows[("plain-static", "greedy")]["target_passes"] == rows[("plain-1t", "greedy")]["target_passes"]
    # k = 0 through the services samples with the same keyed randomness as the in-process plain loop.
    assert rows[("specpipe-k0", "sample")]["match_vs_plain"] == "2/2"
    spec = rows[("specpipe-k2-pipe", "greedy")]
    assert spec["mean_k"] > 0 and 0 <= spec["acceptance_rate"] <= 1 and spec["analytical_speedup"] > 0
    baseline = payload["meta"]["baseline"]["greedy"]  # the faster plain path (on the tiny pair: static)
    assert baseline in ("plain-1t", "plain-static") and rows[(baseline, "greedy")]["speedup_vs_plain"] == 1.0
    assert (out_dir / "latency.png").stat().st_size > 0


class FakeVariant:
    """Stands in for InProcessVariant / SpecpipeVariant: logs its calls, `rate` tokens/s, fails on request."""

    def __init__(self, variant: str, log: list, rate: float = 100.0, fail_at: int | None = None) -> None:
        self.variant, self.log, self.rate, self.fail_at = variant, log, rate, fail_at

    def new_run(self, mode):  # -> VariantRun
        from benchmarks.results import VariantRun

        return VariantRun(self.variant, mode.name, "plain", "fake")

    def warmup(self, mode) -> str:
        return ""

    def run_prompt(self, i: int, mode, run) -> None:
        self.log.append((i, mode.name, self.variant))
        if i == self.fail_at:
            raise RuntimeError("boom")
        run.outputs.append([1] * 10)
        run.wall_s += 10 / self.rate

    def close(self) -> None:
        pass


def _bench(*variants: FakeVariant):
    from benchmarks.latency import Interleaved
    from benchmarks.results import GREEDY, SAMPLE, Mode

    bench = Interleaved([Mode(GREEDY, 0.0), Mode(SAMPLE, 0.8)])
    for variant in variants:
        bench.add(variant)
    return bench


def test_interleaved_rotates_and_survives_a_failing_variant() -> None:
    log: list = []
    bench = _bench(FakeVariant("a", log), FakeVariant("b", log, fail_at=1), FakeVariant("c", log))
    bench.run_prompts(range(3))
    order = log
    assert order[:6] == [(0, m, n) for m in ("greedy", "sample") for n in "abc"]
    assert order[6:12] == [(1, m, n) for m in ("greedy", "sample") for n in "bca"]
    assert order[12:] == [(2, m, n) for m in ("greedy", "sample") for n in "ca"]  # b failed: skipped
    runs = {(r.variant, r.mode): r for r in bench.ordered_runs(["c", "b", "a"])}
    assert [r.variant for r in bench.ordered_runs(["c", "b", "a"])] == ["c", "c", "b", "b", "a", "a"]
    assert runs[("b", "greedy")].error == "failed at prompt 2: RuntimeError: boom"
    assert len(runs[("a", "sample")].outputs) == 3 and not runs[("a", "sample")].error


def test_pilot_decisions() -> None:
    from benchmarks import latency, services

    log: list = []
    bench = _bench(
        FakeVariant("plain-1t", log, rate=100.0),
        FakeVariant("plain-2t", log, rate=80.0),
        FakeVariant("specpipe-k2", log, rate=120.0),
        FakeVariant("specpipe-k4", log, rate=150.0),
    )
    bench.run_prompts(range(2))
    configs = services.spec_configs([2, 4])
    assert latency.best_fixed_k(bench, configs, "greedy") == 4
    assert latency.decide_plain_2t(bench, "greedy", remaining=0) == {
        "plain_2t_vs_plain_1t": 0.8, "plain_2t_kept": True,
    }  # fmt: skip
    assert latency.decide_plain_2t(bench, "greedy", remaining=3)["plain_2t_kept"] is False
    assert bench.runs[("plain-2t", "sample")].error.startswith("stopped after the pilot: 80%")
    bench.run_prompts([2])
    assert (2, "greedy", "plain-2t") not in log and (2, "sample", "plain-1t") in log


def test_a_time_budget_stops_before_a_prompt_that_would_end_past_it() -> None:
    from benchmarks.latency import Interleaved
    from benchmarks.results import GREEDY, SAMPLE, Mode

    now = [0.0]

    class TimedVariant(FakeVariant):
        def run_prompt(self, i: int, mode, run) -> None:
            super().run_prompt(i, mode, run)
            now[0] += 1.0  # one second per variant and mode: six per prompt

    log: list = []
    bench = Interleaved([Mode(GREEDY, 0.0), Mode(SAMPLE, 0.8)], clock=lambda: now[0])
    for name in "abc":
        bench.add(TimedVariant(name, log))
    assert bench.run_prompts(range(1)) == 1 and now[0] == 6.0  # no deadline
    assert bench.run_prompts([1], only=["a"]) == 1  # a catch-up of one variant: not a prompt's time
    assert bench.last_prompt_s == 6.0
    # From 8 s: prompts 2 and 3 end at 14 and 20, prompt 4 would end at 26.
    assert bench.run_prompts(range(2, 10), deadline=20.0) == 2
    assert now[0] == 20.0 and max(i for i, _, _ in log) == 3
    assert bench.run_prompts([4], deadline=26.0) == 1  # ending exactly at the deadline: it runs


@pytest.mark.slow  # about 25 s on a 2-core machine: two embedded stacks start
def test_bench_batching_quick(tmp_path: Path) -> None:
    """`specpipe bench batching --quick` on a tiny pair: both stacks served every request, and the table and
    the JSON give each stack's throughput and batching's ratio."""
    target_dir, draft_dir = build_tiny_pair(tmp_path / "pair")
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "specpipe", "bench", "batching", "--quick", "--max-batch-sessions", "4",
        "--target-model", str(target_dir), "--draft-model", str(draft_dir), "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--max-batch-sessions 4" in proc.stdout and "x unbatched" in proc.stdout, proc.stdout
    result = json.loads((out_dir / "batching.json").read_text(encoding="utf-8"))
    assert result["command"].startswith("specpipe bench batching --quick")
    for stack in ("unbatched", "batched"):
        (summary,) = result["results"][stack]["2"]
        assert summary["completed"] == 2 and summary["failed"] == 0
        assert summary["output_token_throughput_per_s"] > 0
    assert (out_dir / "batching.txt").read_text(encoding="utf-8").startswith("cross-session batching")


def test_the_cpu_is_named_with_its_family_and_model(tmp_path: Path) -> None:
    """VMs often name their CPU just "AMD EPYC": the family and model numbers tell the hosts apart."""
    from benchmarks.latency import cpu_name

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: other\n",
        encoding="utf-8",
    )
    assert cpu_name("x86_64", str(cpuinfo)) == "AMD EPYC (family 25, model 17)"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n", encoding="utf-8")
    assert cpu_name("aarch64", str(tmp_path / "arm")) == "aarch64"
    assert cpu_name("x86_64", str(tmp_path / "missing")) == "x86_64"


def test_controlled_acceptance_reaches_the_draft_worker_of_a_random_pair(tmp_path: Path) -> None:
    """`bench random-pair` writes a random Llama pair that loads offline; `--controlled-acceptance` computes
    the target's continuations and starts the draft worker steered by them (the steered worker's requests
    through the services are tested in tests/test_controlled_acceptance.py)."""
    from transformers import AutoModelForCausalLM

    from benchmarks import inprocess, latency, services
    from benchmarks.prompts import Prompt
    from benchmarks.random_pair import save_pair

    target_dir, draft_dir = save_pair(tmp_path / "pair", "tiny", "tiny")
    for directory in (target_dir, draft_dir):
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 4096
    steered = ["--controlled-acceptance", "0.7", "--max-new-tokens", "6"]
    args = latency.parse_args([*steered, "--modes", "greedy"])
    with pytest.raises(SystemExit):
        latency.parse_args(["--controlled-acceptance", "0.7"])  # the sample mode too: refused
    pair = inprocess.load_pair(target_dir, draft_dir)
    prompts = [Prompt("a.py:1", "", (5, 6, 7)), Prompt("b.py:1", "", (9, 10))]
    st = latency.Setup(args, target_dir, draft_dir, pair, prompts, "test", [], [2], ["specpipe-k2"])
    path = latency.write_references(st, tmp_path / "references.json")
    references = json.loads(path.read_text(encoding="utf-8"))
    # Each prompt, then max_new_tokens + max k + 2 greedy tokens of the target (past EOS).
    assert [r[: len(p.token_ids)] for r, p in zip(references, prompts, strict=True)] == [[5, 6, 7], [9, 10]]
    assert [len(r) for r in references] == [3 + 6 + 16 + 2, 2 + 6 + 16 + 2]
    continuation = inprocess.plain_decode(pair.target, [5, 6, 7], 24, SamplingParams(), frozenset())
    assert references[0] == [5, 6, 7, *continuation]
    steer = ["--controlled-acceptance", "0.7", "--reference-file", str(path)]
    svc = services.Services(target_dir, draft_dir, tmp_path / "logs", 4, draft_extra=steer)  # not started
    assert svc.draft.args[-4:] == steer and "--controlled-acceptance" not in svc.target.args


def test_with_static_slots_the_references_come_from_the_workers_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `--static-kv-slots` the target worker runs the lean static forward: the references must be its
    greedy continuations (in bfloat16 transformers' forward would split from them within a few dozen tokens
    of a random model, and the steered draft find no reference past the split)."""
    from benchmarks import inprocess, latency
    from benchmarks.prompts import Prompt
    from benchmarks.random_pair import save_pair

    target_dir, draft_dir = save_pair(tmp_path / "pair", "tiny", "tiny")
    args = latency.parse_args(
        [
            "--controlled-acceptance",
            "0.7",
            "--max-new-tokens",
            "6",
            "--modes",
            "greedy",
            "--static-kv-slots",
            "1",
        ]
    )
    pair = inprocess.load_pair(target_dir, draft_dir)
    prompts = [Prompt("a.py:1", "", (5, 6, 7))]
    st = latency.Setup(args, target_dir, draft_dir, pair, prompts, "test", [], [2], ["specpipe-k2"])

    def not_transformers(*_: object) -> list[int]:
        raise AssertionError("the references went through transformers' forward")

    monkeypatch.setattr(inprocess, "plain_decode", not_transformers)
    references = json.loads(latency.write_references(st, tmp_path / "references.json").read_text("utf-8"))
    runner = inprocess.static_runner(pair.target, pair.tokenizer)
    alone = inprocess.runner_decode(runner, "check", [5, 6, 7], 24, SamplingParams(), frozenset())
    assert references == [[5, 6, 7, *alone.tokens]]


def test_services_that_fail_to_start_cost_the_specpipe_rows_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that cannot start (on a GPU: a failed graph capture) fails the specpipe variants; the
    in-process baselines still run and the run still reports."""
    from benchmarks import latency

    target_dir, draft_dir = build_tiny_pair(tmp_path / "pair")
    args = latency.parse_args(
        ["--target-model", str(target_dir), "--draft-model", str(draft_dir), "--num-prompts", "1"]
        + ["--max-new-tokens", "4", "--modes", "greedy", "--variants", "plain-1t,specpipe-k2"]
    )

    def worker_exits(*_: object) -> None:
        raise RuntimeError("target worker exited with code 1")

    monkeypatch.setattr(latency, "start_services", worker_exits)
    runs, _, _, _ = latency.run_variants(latency.setup(args), tmp_path / "out")
    by_variant = {run.variant: run for run in runs}
    assert not by_variant["plain-1t"].error and by_variant["plain-1t"].tokens > 0
    assert by_variant["specpipe-k2"].error.startswith("services failed to start: RuntimeError: target worker")


@pytest.mark.slow
def test_bench_prefix_sharing_quick(tmp_path: Path) -> None:
    """`specpipe bench prefix-sharing --quick` on a tiny pair: both stacks timed both workloads, and the table
    and the JSON give each one's times and sharing's speedup."""
    target_dir, draft_dir = build_tiny_pair(tmp_path / "pair")
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "specpipe", "bench", "prefix-sharing", "--quick", "--prefix-chars", "400",
        "--target-model", str(target_dir), "--draft-model", str(draft_dir), "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "speedup" in proc.stdout and "shared prefix" in proc.stdout, proc.stdout
    result = json.loads((out_dir / "prefix_sharing.json").read_text(encoding="utf-8"))
    assert (
        result["command"].startswith("specpipe bench prefix-sharing --quick") and result["prefix_tokens"] > 16
    )
    for stack in ("sharing", "no-sharing"):
        assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"][stack].values())
