"""`specpipe bench floor` on the CPU: a random tiny Llama and a saved checkpoint; the JSON and the floor's
parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import forward_floor
from specpipe.models.tiny_pair import build_tiny_pair


def test_random_llama_shape_against_its_floor(tmp_path: Path, capsys) -> None:
    out = tmp_path / "floor.json"
    args = ["--llama-shape", "tiny", "--device", "cpu", "--runs", "2", "--max-k", "2", "--context", "8"]
    assert forward_floor.main([*args, "--probe-mib", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    hidden, intermediate, layers, heads, kv_heads, vocab = forward_floor.LLAMA_SHAPES["tiny"]
    assert result["model"] == "random Llama, tiny shape" and result["dtype"] == "float32"
    assert result["command"].startswith("specpipe bench floor --llama-shape tiny")
    # float32 key and value caches of 8 positions: 2 x layers x kv_heads x head_dim x 8 x 4 bytes.
    assert result["kv_cache_bytes"] == 2 * layers * kv_heads * (hidden // heads) * 8 * 4
    assert result["read_bandwidth_gb_s"] > 0
    read_bytes = result["weight_bytes"] + result["kv_cache_bytes"]
    floor_ms = read_bytes / (result["read_bandwidth_gb_s"] * 1e9) * 1e3
    assert result["floor_ms"] == pytest.approx(floor_ms)
    assert [row["k"] for row in result["rows"]] == [0, 1, 2]
    for row in result["rows"]:
        assert row["forward_ms"] > 0 and row["floor_ms"] == pytest.approx(floor_ms)
        assert row["over_floor"] == pytest.approx(row["forward_ms"] / floor_ms)
        # The lean Llama forward alone and one packed pass of the default 4 sessions' blocks.
        assert row["lean_forward_ms"] > 0 and row["packed_forward_ms"] > 0
        # The forward over a static KV slot: eager on the CPU (a CUDA graph's replay on a GPU).
        assert row["static_forward_ms"] > 0
    assert result["batch_sessions"] == 4 and result["cuda_graphs"] is False
    printed = capsys.readouterr().out
    assert "x floor" in printed and "4 packed ms" in printed and "per session" in printed
    assert "static ms" in printed


def test_weight_bytes_count_a_tied_weight_once() -> None:
    model = forward_floor.random_llama("tiny", torch.device("cpu"), torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    model.config.tie_word_embeddings = True
    model.tie_weights()
    unique = {id(p): p for p in model.parameters()}.values()
    expected = sum(p.numel() * 2 for p in unique) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert forward_floor.weight_bytes(model) == expected


def test_local_checkpoint(tmp_path: Path) -> None:
    target_dir, _ = build_tiny_pair(tmp_path / "pair")
    out = tmp_path / "floor.json"
    args = ["--model", str(target_dir), "--device", "cpu", "--runs", "1", "--max-k", "1", "--context", "4"]
    assert forward_floor.main([*args, "--probe-mib", "8", "--batch-sessions", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["model"] == str(target_dir) and len(result["rows"]) == 2
    # A GPT-2 checkpoint has a lean forward; one session: no packed pass.
    assert all(row["lean_forward_ms"] > 0 and row["packed_forward_ms"] is None for row in result["rows"])
