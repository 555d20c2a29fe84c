"""Tests for the shipped demo pair (specpipe/assets/demo-pair) and tools/train_demo_models.py (issue 3)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
PAIR = REPO / "specpipe" / "assets" / "demo-pair"
SCRIPT = REPO / "tools" / "train_demo_models.py"
MAX_WEIGHT_BYTES = 25 * 1000 * 1000


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """tools/train_demo_models.py imported as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_demo_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up in sys.modules.
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((PAIR / "training_record.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def loaded() -> tuple:
    target = AutoModelForCausalLM.from_pretrained(PAIR / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(PAIR / "draft", dtype=torch.float32).eval()
    return (
        target,
        draft,
        AutoTokenizer.from_pretrained(PAIR / "target"),
        AutoTokenizer.from_pretrained(PAIR / "draft"),
    )


def test_pair_is_shipped() -> None:
    for sub in ("target", "draft"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (PAIR / sub / name).is_file(), f"missing {sub}/{name}"
    assert (PAIR / "training_record.json").is_file()
    assert (PAIR / "README.md").is_file()


def test_pair_loads_and_shares_one_tokenizer(loaded: tuple) -> None:
    target, draft, tok_t, tok_d = loaded
    # One tokenizer: byte-identical files in both directories.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (PAIR / "target" / name).read_bytes() == (PAIR / "draft" / name).read_bytes()
    assert tok_t.get_vocab() == tok_d.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok_t) == 4096
    assert tok_t.eos_token == tok_t.bos_token == tok_t.pad_token == "<|endoftext|>"
    assert tok_t.eos_token_id == 0
    for model in (target, draft):
        assert next(model.parameters()).dtype == torch.float32
        assert model.config.n_positions == 1024
        gc = model.generation_config
        assert (gc.eos_token_id, gc.pad_token_id, gc.bos_token_id) == (0, 0, 0)
    assert target.config.n_layer > draft.config.n_layer
    text = "def fibonacci(n):\n    return n"
    assert tok_t.decode(tok_t(text)["input_ids"]) == text


def test_committed_weights_are_small() -> None:
    weights = list(PAIR.glob("*/*.safetensors"))
    assert len(weights) == 2
    assert sum(p.stat().st_size for p in weights) <= MAX_WEIGHT_BYTES


def test_record_has_agreement_costs_and_split(record: dict, script: ModuleType) -> None:
    ev, cost = record["heldout_eval"], record["forward_cost"]
    assert 0.0 < ev["agreement"] <= 1.0 and ev["positions"] >= 10_000
    assert cost["target_ms"] > cost["draft_ms"] > 0
    assert cost["c"] == pytest.approx(cost["draft_ms"] / cost["target_ms"], abs=1e-3)
    held = record["data"]["heldout_files"]
    assert held and all(script.is_heldout(rel) for rel in held)
    assert record["training"]["target"]["steps_done"] > 0 and record["training"]["draft"]["steps_done"] > 0
    assert record["weights_bytes"]["target"] + record["weights_bytes"]["draft"] <= MAX_WEIGHT_BYTES


def test_quick_agreement_matches_record(loaded: tuple, record: dict) -> None:
    target, draft, _, _ = loaded
    quick = record["quick_check"]
    ids = torch.tensor(quick["input_ids"], dtype=torch.long)
    assert ids.shape == (2, 256)
    with torch.no_grad():
        agree = target(input_ids=ids).logits.argmax(-1) == draft(input_ids=ids).logits.argmax(-1)
    assert agree.float().mean().item() == pytest.approx(quick["agreement"], abs=0.05)


def test_quick_check_windows_are_heldout_text(loaded: tuple, record: dict, script: ModuleType) -> None:
    """The recorded windows are the start of the held-out stream (only checkable on the same Python)."""
    if platform.python_version() != record["data"]["python_version"]:
        pytest.skip("the stdlib differs from the one the pair was trained on")
    _, _, tok, _ = loaded
    files = {f.rel: f for f in script.stdlib_files()}
    ids: list[int] = []
    for rel in record["data"]["heldout_files"]:
        ids += tok.backend_tokenizer.encode(files[rel].text).ids + [tok.eos_token_id]
        if len(ids) >= 512:
            break
    assert ids[:512] == [i for row in record["quick_check"]["input_ids"] for i in row]


def test_training_script_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pair"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--steps",
        "2",
        "--draft-steps",
        "2",
        "--threads",
        "1",
        "--max-files",
        "3",
        "--batch",
        "2",
        "--draft-batch",
        "2",
        "--eval-windows",
        "2",
        "--cost-runs",
        "5",
    ]
    env = {**os.environ, "RAYON_RS_NUM_CPUS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "training_record.json").read_text(encoding="utf-8"))
    assert rec["training"]["target"]["steps_done"] == 2 and rec["training"]["draft"]["steps_done"] == 2
    assert rec["data"]["n_train_files"] == 3
    assert "agreement" in rec["heldout_eval"] and rec["forward_cost"]["c"] > 0
    assert (out / "README.md").is_file()
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32)
    assert target.config.vocab_size == len(AutoTokenizer.from_pretrained(out / "draft"))
