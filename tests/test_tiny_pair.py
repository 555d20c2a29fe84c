"""Tests for specpipe.models.tiny_pair: the local target/draft pair used by tests and ``specpipe serve``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from specpipe.models import tiny_pair
from specpipe.models.tiny_pair import (
    MARKER_NAME,
    TinyPairSpec,
    build_models,
    build_tiny_pair,
    greedy_agreement,
    train_tokenizer,
)

# A smaller spec for the tests that only check build mechanics.
SMALL = TinyPairSpec(n_positions=64, n_embd=32, n_head=2, corpus_files=5)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_pair(tmp_path_factory.mktemp("tiny") / "pair")


@pytest.fixture(scope="module")
def loaded(pair: tuple[Path, Path]) -> tuple[PreTrainedModel, PreTrainedModel, object]:
    target_dir, draft_dir = pair
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    return target, draft, AutoTokenizer.from_pretrained(target_dir)


def stdlib_snippet() -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8") as f:
        return f.read()[:4000]


def test_pair_loads_and_shares_vocab(pair: tuple[Path, Path], loaded: tuple) -> None:
    target_dir, draft_dir = pair
    assert (target_dir, draft_dir) == (target_dir.parent / "target", target_dir.parent / "draft")
    target, draft, tok = loaded
    draft_tok = AutoTokenizer.from_pretrained(draft_dir)
    assert tok.get_vocab() == draft_tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok) == TinyPairSpec().vocab_size
    assert target.config.n_layer == 2 and draft.config.n_layer == 1
    assert target.dtype == draft.dtype == torch.float32
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 0
    assert target.generation_config.pad_token_id == draft.generation_config.eos_token_id == 0
    # Tied, and shared with the target.
    assert draft.lm_head.weight.data_ptr() == draft.transformer.wte.weight.data_ptr()
    assert torch.equal(draft.transformer.wte.weight, target.transformer.wte.weight)
    assert torch.equal(draft.transformer.h[0].mlp.c_fc.weight, target.transformer.h[0].mlp.c_fc.weight)


def test_tokenizer_round_trips_and_splits_non_ascii(loaded: tuple) -> None:
    tok = loaded[2]
    text = "naïve café — 日本語 🙂\n    def f(x): return x"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # Some multi-byte characters need several byte-level tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_tokenizer_is_deterministic() -> None:
    a, b = train_tokenizer(SMALL), train_tokenizer(SMALL)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_agreement_is_partial(loaded: tuple) -> None:
    target, draft, tok = loaded
    ids = tok(stdlib_snippet())["input_ids"][: target.config.n_positions]
    assert 0.5 <= greedy_agreement(target, draft, ids) <= 0.9


def test_greedy_generation_does_not_collapse(loaded: tuple, caplog: pytest.LogCaptureFixture) -> None:
    target, _, tok = loaded
    caplog.set_level(logging.WARNING, logger="transformers")
    for prompt in ("def foo(x):", "import os\n", "naïve café", "class A:"):
        enc = tok(prompt, return_tensors="pt")
        out = target.generate(**enc, max_new_tokens=16, do_sample=False)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        assert len(new) == 16 and len(set(new)) >= 3, (prompt, new)
        # Without an attention mask too: the saved generation config names the pad id.
        target.generate(enc["input_ids"], max_new_tokens=2, do_sample=False)
    assert not [r for r in caplog.records if r.name.startswith("transformers")]


def test_idempotent(pair: tuple[Path, Path]) -> None:
    target_dir, draft_dir = pair
    files = [target_dir / "model.safetensors", draft_dir / "model.safetensors"]
    files.append(target_dir.parent / MARKER_NAME)
    before = [f.stat().st_mtime_ns for f in files]
    assert build_tiny_pair(target_dir.parent) == pair
    assert [f.stat().st_mtime_ns for f in files] == before
    # No temp directories left next to the pair.
    assert [p.name for p in target_dir.parent.parent.iterdir()] == ["pair"]


def test_rebuilds_on_spec_change(tmp_path: Path) -> None:
    out = tmp_path / "pair"
    build_tiny_pair(out, SMALL)
    target_dir, _ = build_tiny_pair(out, dataclasses.replace(SMALL, seed=1))
    assert json.loads((out / MARKER_NAME).read_text())["spec"]["seed"] == 1
    assert AutoModelForCausalLM.from_pretrained(target_dir).config.n_embd == SMALL.n_embd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]


def test_crash_leaves_no_half_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("crash mid-build")

    out = tmp_path / "pair"
    build_tiny_pair(out, SMALL)
    marker = (out / MARKER_NAME).read_text()
    monkeypatch.setattr(tiny_pair, "build_models", boom)
    with pytest.raises(RuntimeError, match="crash"):
        build_tiny_pair(out, dataclasses.replace(SMALL, seed=7))
    # The old, complete pair is untouched and nothing half-built is left around.
    assert (out / MARKER_NAME).read_text() == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
    with pytest.raises(RuntimeError, match="crash"):
        build_tiny_pair(tmp_path / "fresh", SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_pair(tmp_path, SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_train_steps_option() -> None:
    tok = train_tokenizer(SMALL)
    texts = tiny_pair.corpus_texts(SMALL)
    plain, _ = build_models(SMALL, tok, texts)
    trained, draft = build_models(dataclasses.replace(SMALL, train_steps=2), tok, texts)
    assert not torch.equal(plain.transformer.wte.weight, trained.transformer.wte.weight)
    assert torch.equal(draft.transformer.wte.weight, trained.transformer.wte.weight)
