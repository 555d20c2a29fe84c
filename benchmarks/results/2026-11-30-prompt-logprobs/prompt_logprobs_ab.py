"""One `specpipe serve --port 50071` stack; requests alternate between prompt_logprobs unset and
prompt_logprobs=5 (same prompts, 32 new tokens): time to the first chunk and to the last. Run from the
repository root: python benchmarks/results/2026-11-30-prompt-logprobs/prompt_logprobs_ab.py ROUNDS"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks.load import load_prompts
from specpipe.client import CoordinatorClient, build_request

prompts = load_prompts(12)
client = CoordinatorClient("127.0.0.1:50071")
firsts: dict[str, list[float]] = {"none": [], "prompt_logprobs=5": []}
totals: dict[str, list[float]] = {"none": [], "prompt_logprobs=5": []}


def run(prompt: str, prompt_logprobs: int | None) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    scored = 0
    for chunk in client.stream(build_request(prompt, 32, prompt_logprobs=prompt_logprobs), 60):
        if first is None:
            first = time.perf_counter() - started
            scored = len(chunk.prompt_logprobs)
    assert first is not None
    return first, time.perf_counter() - started, scored


run(prompts[0], None)
run(prompts[0], 5)
for rnd in range(int(sys.argv[1])):
    for i, prompt in enumerate(prompts):
        for asked in [None, 5] if (i + rnd) % 2 == 0 else [5, None]:
            first, total, scored = run(prompt, asked)
            assert (scored > 0) == (asked is not None)
            key = "none" if asked is None else "prompt_logprobs=5"
            firsts[key].append(first * 1e3)
            totals[key].append(total * 1e3)
for key in firsts:
    print(
        f"{key:18} first chunk median {statistics.median(firsts[key]):6.2f} ms, "
        f"whole request median {statistics.median(totals[key]):6.2f} ms ({len(firsts[key])} requests)"
    )
