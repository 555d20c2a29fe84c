"""How often the demo draft's argmax is the target's greedy token, by the draft's confidence (its top
probability): 16 held-out prompts x 128 greedy target tokens, the draft scoring the target's own prefix.
Run from the repository root: python benchmarks/results/2026-11-30-heuristic/draft_confidence.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks import inprocess
from benchmarks import prompts as pm
from benchmarks.latency import SHIPPED_PAIR
from specpipe.sampling.params import SamplingParams

torch.set_num_threads(1)
pair = inprocess.load_pair(SHIPPED_PAIR / "target", SHIPPED_PAIR / "draft")
rec = pm.find_record(SHIPPED_PAIR / "target", SHIPPED_PAIR / "training_record.json")
chosen, _ = pm.default_prompts(rec, lambda t: list(pair.tokenizer(t)["input_ids"]), 16)
rows = []
for p in chosen:
    cont = inprocess.plain_decode(pair.target, p.token_ids, 128, SamplingParams(), frozenset())
    seq = torch.tensor([list(p.token_ids) + cont])
    with torch.no_grad():
        logits = pair.draft(seq).logits[0].float()
    probs = logits.softmax(-1)
    n = len(p.token_ids)
    for i, tok in enumerate(cont):
        pr = probs[n - 1 + i]
        rows.append((float(pr.max()), int(pr.argmax()) == tok))
acc = sum(r[1] for r in rows) / len(rows)
print("positions", len(rows), "draft argmax == target", round(acc, 3))
for th in (0.2, 0.3, 0.4, 0.5, 0.6):
    low = [r for r in rows if r[0] < th]
    print(
        th,
        "share below",
        round(len(low) / len(rows), 3),
        "acc below",
        round(sum(r[1] for r in low) / max(len(low), 1), 3),
        "acc above",
        round(sum(r[1] for r in rows if r[0] >= th) / max(len(rows) - len(low), 1), 3),
    )
