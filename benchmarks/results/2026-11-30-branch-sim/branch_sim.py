"""Offline: how often would a branch drafted for the likeliest rejection be the one needed? Greedy, demo pair,
k = 6, held-out prompts. Branch choice: the drafted position with the lowest draft top-1 probability, and the
draft's top-2 token there as the guess of the target's token."""
import torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from benchmarks import prompts as pm
from benchmarks.latency import SHIPPED_PAIR
from specpipe.default_models import default_model_dirs
torch.set_num_threads(2)
t, d = default_model_dirs()
T = AutoModelForCausalLM.from_pretrained(t).eval(); D = AutoModelForCausalLM.from_pretrained(d).eval()
tok = AutoTokenizer.from_pretrained(t)
rec = pm.find_record(Path(t), SHIPPED_PAIR / "training_record.json")
prompts, _ = pm.default_prompts(rec, lambda s: list(tok(s)["input_ids"]), 12)
K = 6
rounds = rej = hit_best = hit_any_top2 = hit_first_low = 0
with torch.inference_mode():
    for p in prompts:
        ids = list(p.token_ids)
        target_len = len(ids) + 128
        while len(ids) < target_len:
            # draft k greedy tokens with their top-1 prob and top-2 token
            cur = list(ids); drafted = []; conf = []; second = []
            for _ in range(K):
                logits = D(torch.tensor([cur])).logits[0, -1]
                probs = logits.softmax(-1)
                top = probs.topk(2)
                drafted.append(int(top.indices[0])); conf.append(float(top.values[0])); second.append(int(top.indices[1]))
                cur.append(drafted[-1])
            tl = T(torch.tensor([ids + drafted])).logits[0, len(ids) - 1:]
            targ = tl.argmax(-1).tolist()
            n = 0
            while n < K and drafted[n] == targ[n]:
                n += 1
            rounds += 1
            if n < K:
                rej += 1
                j = min(range(K), key=lambda i: conf[i])
                if n == j and targ[n] == second[n]:
                    hit_best += 1
                if targ[n] == second[n]:
                    hit_any_top2 += 1
            ids += drafted[:n] + [targ[n]]
print(f"rounds {rounds}, rejections {rej} ({rej/rounds:.0%}); target's token = draft top-2 at the rejected position: {hit_any_top2/rej:.0%}; branch at the least confident position hits: {hit_best/rej:.0%}")
