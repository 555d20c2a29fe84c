"""Smoke test of `specpipe bench latency --quick`: the real services and baselines on a tiny pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specpipe.models.tiny_pair import build_tiny_pair

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("plain-1t", "hf-generate", "hf-assisted", "specpipe-k0", "specpipe-k2-pipe")
ROW_KEYS = {
    "variant", "mode", "tokens", "wall_s", "tokens_per_s", "speedup_vs_plain", "speedup_vs_hf_assisted",
    "acceptance_rate", "mean_accepted_length", "mean_k", "alpha", "overhead_ms_per_round",
    "analytical_speedup", "efficiency", "match_vs_plain",
}  # fmt: skip


@pytest.mark.slow  # about 45 s on a 2-core machine: five processes start
def test_bench_latency_quick(tmp_path: Path) -> None:
    target_dir, draft_dir = build_tiny_pair(tmp_path / "pair")
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "specpipe", "bench", "latency", "--quick",
        "--target-model", str(target_dir), "--draft-model", str(draft_dir),
        "--num-prompts", "2", "--max-new-tokens", "8", "--variants", ",".join(VARIANTS),
        "--max-speculative-tokens", "4", "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "greedy outputs vs plain-1t: every variant 2/2 identical" in proc.stdout, proc.stdout

    payload = json.loads((out_dir / "latency.json").read_text(encoding="utf-8"))
    assert {"meta", "costs", "results", "targets", "round_trip_probes"} <= payload.keys()
    assert payload["meta"]["num_prompts"] == 2 and payload["meta"]["max_new_tokens"] == 8
    assert payload["costs"]["target_ms"] > 0 and payload["costs"]["c"] > 0
    rows = {(r["variant"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {(v, m) for v in VARIANTS for m in ("greedy", "sample")}
    for row in rows.values():
        assert row["error"] is None
        assert ROW_KEYS <= row.keys()
        assert 0 < row["tokens"] <= 16  # EOS may end a prompt early
        assert row["tokens_per_s"] > 0
    for variant in VARIANTS:
        assert rows[(variant, "greedy")]["match_vs_plain"] == "2/2"
    # k = 0 through the services samples with the same keyed randomness as the in-process plain loop.
    assert rows[("specpipe-k0", "sample")]["match_vs_plain"] == "2/2"
    spec = rows[("specpipe-k2-pipe", "greedy")]
    assert spec["mean_k"] > 0 and 0 <= spec["acceptance_rate"] <= 1 and spec["analytical_speedup"] > 0
    assert rows[("plain-1t", "greedy")]["speedup_vs_plain"] == 1.0
    assert (out_dir / "latency.png").stat().st_size > 0
