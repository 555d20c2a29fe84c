"""Structured output through specpipe against the target decoding alone under the same constraint, in one
run: a JSON schema, greedy, 12 held-out prompts, 96 new tokens at most (EOS ends a complete match).

- target alone: `plain_decode`'s loop (one forward per token on a KV cache, in process, with as many threads
  as the served target has), each step masked by the automaton (`OutputAutomata.mask`, as the workers);
- specpipe through `specpipe serve --port 50071` (the demo pair, defaults: adaptive k, pipelined,
  delegated), with the schema; with the schema at k = 0 (the in-system baseline); and without the schema.

Variants alternate per prompt. Prints tokens/s per variant, the ratios, and how many outputs equal the
target alone's. Run from the repository root, the server up:
python benchmarks/results/2026-11-30-structured-output/structured_output_ab.py
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from benchmarks.inprocess import torch_threads
from benchmarks.load import load_prompts
from coordinator.structured_requests import output_regex
from specpipe.client import CoordinatorClient, build_request
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import greedy_token_ids
from specpipe.sampling.structured_output import OutputAutomata

TARGET = Path("specpipe/assets/demo-pair/target")
MAX_NEW = 96
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "kind": {"enum": ["function", "class", "module"]},
            "public": {"type": "boolean"},
            "args": {"type": "array", "items": {"enum": ["self", "x", "n", "path"]}, "maxItems": 3},
        },
        "required": ["name", "kind", "public", "args"],
    }
)

tokenizer = AutoTokenizer.from_pretrained(TARGET)
model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
eos = tokenizer.eos_token_id
regex = output_regex(build_request("", 1, json_schema=SCHEMA).structured_output)
automata = OutputAutomata(tokenizer)
prompts = [tokenizer(text)["input_ids"] for text in load_prompts(12)]


@torch.inference_mode()
def target_alone(prompt: list[int]) -> list[int]:
    sampling = SamplingParams(output_regex=regex, output_start=len(prompt))
    cache = DynamicCache(config=model.config)
    feed = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(MAX_NEW):
        logits = model(input_ids=feed, use_cache=True, logits_to_keep=1, past_key_values=cache).logits[0, -1:]
        token = greedy_token_ids(automata.mask(logits.float(), [*prompt, *out], [], sampling))[0]
        out.append(token)
        if token == eos:
            break
        feed = torch.tensor([[token]])
    return out


variants = ["target alone", "specpipe", "specpipe k=0", "specpipe unconstrained"]
seconds = dict.fromkeys(variants, 0.0)
tokens = dict.fromkeys(variants, 0)
matches = 0
with CoordinatorClient("127.0.0.1:50071") as client, torch_threads(max(1, (os.cpu_count() or 2) // 2)):

    def served(prompt: list[int], variant: str) -> list[int]:
        fields: dict[str, object] = {} if variant.endswith("unconstrained") else {"json_schema": SCHEMA}
        if variant.endswith("k=0"):
            fields["num_speculative_tokens"] = 0
        return client.generate(build_request(prompt, MAX_NEW, **fields), 120).token_ids

    target_alone(prompts[0])  # warm-up: the automaton, the model
    for variant in variants[1:]:
        served(prompts[0], variant)
    for i, prompt in enumerate(prompts):
        order = variants if i % 2 == 0 else variants[::-1]
        outputs = {}
        for variant in order:
            started = time.perf_counter()
            outputs[variant] = target_alone(prompt) if variant == "target alone" else served(prompt, variant)
            seconds[variant] += time.perf_counter() - started
            tokens[variant] += len(outputs[variant])
        matches += outputs["specpipe"] == outputs["target alone"] == outputs["specpipe k=0"]
        if i == 0:
            print("first output:", tokenizer.decode(outputs["specpipe"], skip_special_tokens=True))
rate = {variant: tokens[variant] / seconds[variant] for variant in variants}
for variant in variants:
    print(
        f"{variant:24} {tokens[variant]:5d} tokens in {seconds[variant]:6.2f} s: {rate[variant]:6.1f} tok/s"
    )
for label, over in (
    ("target alone", "target alone"),
    ("k=0", "specpipe k=0"),
    ("unconstrained", "specpipe unconstrained"),
):
    print(f"specpipe with the schema / {label}: {rate['specpipe'] / rate[over]:.2f}x")
print(f"greedy outputs equal to the target alone's: {matches}/{len(prompts)}")
