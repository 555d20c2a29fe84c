"""The lean GPT-2 and Llama forwards: transformers' numbers (to float rounding) on every path a session takes,
one session or several packed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from specpipe.runtime import lean_gpt2, lean_llama
from specpipe.runtime.lean_gpt2 import LeanGPT2
from specpipe.runtime.lean_llama import LeanLlama
from specpipe.runtime.model_runner import CausalLMRunner
from tests.conftest import ModelPair

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def reference_logits(model: torch.nn.Module, ids: list[int], rows: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -rows:].float()


@pytest.fixture(scope="module")
def draft_model(model_pair: ModelPair) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_pair.draft_dir, dtype=torch.float32).eval()


def test_supports_gpt2_only() -> None:
    tiny = {"vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2}
    assert lean_gpt2.supports(GPT2LMHeadModel(GPT2Config(**tiny)))
    assert not lean_gpt2.supports(GPT2LMHeadModel(GPT2Config(**tiny, scale_attn_by_inverse_layer_idx=True)))
    assert not lean_gpt2.supports(GPT2LMHeadModel(GPT2Config(**tiny, activation_function="relu")))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert not lean_gpt2.supports(llama)
    with pytest.raises(ValueError, match="not a GPT-2"):
        LeanGPT2(llama)


def test_prefill_steps_blocks_and_rollback_match_transformers(draft_model: torch.nn.Module) -> None:
    lean = LeanGPT2(draft_model)
    cache = lean.new_cache()
    ids = [(7 * i + 3) % 200 for i in range(40)]
    torch.testing.assert_close(
        lean.forward(ids, cache, 3), reference_logits(draft_model, ids, 3), **TOLERANCE
    )
    for token in (11, 12, 13):  # decoding one token at a time
        ids.append(token)
        torch.testing.assert_close(
            lean.forward([token], cache, 1), reference_logits(draft_model, ids, 1), **TOLERANCE
        )
    block = [21, 22, 23, 24]  # a verify-shaped block: one row per position
    torch.testing.assert_close(
        lean.forward(block, cache, 4), reference_logits(draft_model, [*ids, *block], 4), **TOLERANCE
    )
    cache.crop(-3)  # three of the block were rejected
    assert cache.get_seq_length() == len(ids) + 1
    kept = [*ids, 21, 30]
    torch.testing.assert_close(
        lean.forward([30], cache, 1), reference_logits(draft_model, kept, 1), **TOLERANCE
    )


def test_cache_grows_past_its_initial_capacity(draft_model: torch.nn.Module) -> None:
    lean = LeanGPT2(draft_model)
    cache = lean.new_cache()
    context = draft_model.config.n_positions
    ids = [(5 * i + 1) % 250 for i in range(context)]
    first = lean_gpt2.INITIAL_CAPACITY - 2
    lean.forward(ids[:first], cache, 1)
    assert cache.capacity == min(lean_gpt2.INITIAL_CAPACITY, context)
    for end in range(first + 1, min(first + 6, context) + 1):  # crosses the capacity one token at a time
        torch.testing.assert_close(
            lean.forward(ids[end - 1 : end], cache, 1),
            reference_logits(draft_model, ids[:end], 1),
            **TOLERANCE,
        )
    assert cache.capacity >= cache.get_seq_length()
    bytes_before = cache.nbytes
    with pytest.raises(ValueError, match="exceed the model's context"):
        cache.reserve(context + 1)
    assert cache.nbytes == bytes_before


def test_runner_uses_the_lean_path_for_drafts_and_greedy_tokens_match(model_pair: ModelPair) -> None:
    lean = CausalLMRunner.load(model_pair.draft_dir, "cpu", "float32", 4, lean_forward=True)
    plain = CausalLMRunner.load(model_pair.draft_dir, "cpu", "float32", 4)
    assert lean.lean is not None and plain.lean is None
    ids = {"lean": list(range(3, 30)), "plain": list(range(3, 30))}
    for step in range(24):
        for name, runner in (("lean", lean), ("plain", plain)):
            if step % 5 == 4:
                del ids[name][-2:]  # roll back, as after a rejection
            logits = runner.forward("s", ids[name], num_rows=1).logits
            ids[name].append(int(logits[0].argmax()))
    assert ids["lean"] == ids["plain"]
    assert lean.caches.total_bytes == lean.caches._sessions["s"].past.nbytes > 0


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = {
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides,
    }  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped-query", "multi-head"])
def test_lean_llama_matches_transformers_on_every_path(kv_heads: int) -> None:
    """Prefill, single steps, a verify-shaped block, rollback, and packed passes of several sessions."""
    model = tiny_llama(num_key_value_heads=kv_heads)
    assert lean_llama.supports(model) and not lean_gpt2.supports(model)
    lean = LeanLlama(model)
    cache = lean.new_cache()
    ids = [(7 * i + 3) % 96 for i in range(20)]
    torch.testing.assert_close(lean.forward(ids, cache, 3), reference_logits(model, ids, 3), **TOLERANCE)
    for token in (11, 12):
        ids.append(token)
        torch.testing.assert_close(
            lean.forward([token], cache, 1), reference_logits(model, ids, 1), **TOLERANCE
        )
    block = [21, 22, 23]
    torch.testing.assert_close(
        lean.forward(block, cache, 3), reference_logits(model, [*ids, *block], 3), **TOLERANCE
    )
    cache.crop(-2)
    torch.testing.assert_close(
        lean.forward([30], cache, 1), reference_logits(model, [*ids, 21, 30], 1), **TOLERANCE
    )
    # Three sessions in one pass: a prefill, a step and a block, each as alone.
    others = [[5, 6, 7, 8, 9], [40, 41]]
    other_caches = [lean.new_cache(), lean.new_cache()]
    lean.forward(others[1], other_caches[1], 1)
    packed = lean.forward_packed(
        [(others[0], other_caches[0], 2), ([42], other_caches[1], 1), ([1, 2], cache, 2)]
    )
    expected = [
        reference_logits(model, others[0], 2),
        reference_logits(model, [*others[1], 42], 1),
        reference_logits(model, [*ids, 21, 30, 1, 2], 2),
    ]
    for got, want in zip(packed, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


def test_lean_llama_refuses_what_it_does_not_reproduce() -> None:
    scaled = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert not lean_llama.supports(scaled)
    with pytest.raises(ValueError, match="not a Llama"):
        LeanLlama(scaled)
    assert not lean_llama.supports(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                                              n_layer=1, n_head=2)))  # fmt: skip


def test_a_runner_on_a_llama_packs_sessions() -> None:
    """The runner picks the Llama lean forward; forward_many equals transformers' forward per session."""
    model = tiny_llama()
    packed = CausalLMRunner(model, tokenizer=None, model_name="tiny-llama", max_context=64,  # type: ignore[arg-type]
                            max_cached_sessions=8, lean_forward=True)  # fmt: skip
    alone = CausalLMRunner(model, tokenizer=None, model_name="tiny-llama", max_context=64,  # type: ignore[arg-type]
                           max_cached_sessions=8, lean_forward=False)  # fmt: skip
    assert isinstance(packed.lean, LeanLlama) and packed.packs_sessions
    calls = [("a", [1, 2, 3, 4], 2), ("b", [9, 8], 1), ("c", [5], 1)]
    for call, result in zip(calls, packed.forward_many(calls), strict=True):
        torch.testing.assert_close(result.logits, alone.forward(*call).logits, **TOLERANCE)
