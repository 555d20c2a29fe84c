"""Reference outputs: the target model decoding alone, which every greedy path must equal token for token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def target_alone(
    model_dir: Path, prompts: Sequence[str], max_new_tokens: int, **generate_kwargs: object
) -> dict[str, list[int]]:
    """`generate(do_sample=False, **generate_kwargs)` of the model in `model_dir` (its logits processors:
    repetition_penalty, sequence_bias, ...), float32 on the CPU, per prompt."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        expected[prompt] = out[0, ids.shape[1] :].tolist()
    return expected


def one_pass_logprobs(model_dir: Path, token_ids: Sequence[int]) -> list[float]:
    """Each token's log_softmax under the model given the tokens before it (all but the first), in one
    forward pass over all of them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(torch.tensor([list(token_ids)])).logits[0].float(), dim=-1)
    return [float(log_probs[i - 1, token]) for i, token in enumerate(token_ids) if i > 0]
