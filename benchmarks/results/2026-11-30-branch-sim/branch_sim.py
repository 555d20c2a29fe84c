"""Offline count: how often would a branch drafted for the likeliest rejection be the one needed?

Greedy, the shipped demo pair, k = 6, the 12 held-out prompts of `specpipe bench latency`, 128 tokens each.
Each round drafts k tokens (recording the draft's top-1 probability and top-2 token at each position) and
verifies them with the target. At a rejection it counts whether the target's token is the draft's top-2 there,
and whether a single branch, drafted at the position with the lowest top-1 probability with the top-2 token
as the guess of the target's, would have been the one needed. Full forwards, no KV cache: slow (~5 min).

    PYTHONPATH=. python benchmarks/results/2026-11-30-branch-sim/branch_sim.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import prompts as prompts_mod
from benchmarks.latency import SHIPPED_PAIR
from specpipe.default_models import default_model_dirs

K = 6
NEW_TOKENS = 128


def main() -> None:
    torch.set_num_threads(2)
    target_dir, draft_dir = default_model_dirs()
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    record = prompts_mod.find_record(Path(target_dir), SHIPPED_PAIR / "training_record.json")
    prompts, _ = prompts_mod.default_prompts(record, lambda s: list(tokenizer(s)["input_ids"]), 12)
    rounds = rejections = top2_matches = branch_hits = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt.token_ids)
            end = len(ids) + NEW_TOKENS
            while len(ids) < end:
                context, drafted, confidence, second = list(ids), [], [], []
                for _ in range(K):
                    top = draft(torch.tensor([context])).logits[0, -1].softmax(-1).topk(2)
                    drafted.append(int(top.indices[0]))
                    confidence.append(float(top.values[0]))
                    second.append(int(top.indices[1]))
                    context.append(drafted[-1])
                verdict = target(torch.tensor([ids + drafted])).logits[0, len(ids) - 1 :].argmax(-1).tolist()
                accepted = 0
                while accepted < K and drafted[accepted] == verdict[accepted]:
                    accepted += 1
                rounds += 1
                if accepted < K:
                    rejections += 1
                    top2_matches += verdict[accepted] == second[accepted]
                    least_confident = min(range(K), key=lambda i: confidence[i])
                    branch_hits += accepted == least_confident and verdict[accepted] == second[accepted]
                ids += [*drafted[:accepted], verdict[accepted]]
    print(
        f"rounds {rounds}, rejections {rejections} ({rejections / rounds:.0%}); target's token = draft top-2 "
        f"at the rejected position: {top2_matches / rejections:.0%}; branch at the least confident position "
        f"hits: {branch_hits / rejections:.0%}"
    )


if __name__ == "__main__":
    main()
