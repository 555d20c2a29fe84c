"""One `specpipe serve --port 50071` stack; requests alternate between logprobs unset and logprobs=5 (same
prompts). Run from the repository root: python benchmarks/results/2026-11-30-logprobs/logprobs_ab.py ROUNDS"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks.load import load_prompts
from specpipe.client import CoordinatorClient, build_request

prompts = load_prompts(12)
client = CoordinatorClient("127.0.0.1:50071")
stats = {"none": [0.0, 0], "logprobs=5": [0.0, 0]}


def run(prompt: str, logprobs: int | None) -> tuple[float, int, int]:
    started = time.perf_counter()
    result = client.generate(build_request(prompt, 128, logprobs=logprobs), 60)
    return time.perf_counter() - started, len(result.token_ids), len(result.logprobs)


run(prompts[0], None)
run(prompts[0], 5)
for rnd in range(int(sys.argv[1])):
    for i, prompt in enumerate(prompts):
        for logprobs in [None, 5] if (i + rnd) % 2 == 0 else [5, None]:
            wall, tokens, with_logprobs = run(prompt, logprobs)
            assert with_logprobs == (tokens if logprobs is not None else 0)
            key = "none" if logprobs is None else "logprobs=5"
            stats[key][0] += wall
            stats[key][1] += tokens
for key, (wall, tokens) in stats.items():
    print(f"{key:12} {tokens / wall:7.1f} tok/s  ({tokens} tokens in {wall:.2f} s)")
