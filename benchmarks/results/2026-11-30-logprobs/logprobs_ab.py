"""One `specpipe serve` stack; requests alternate between logprobs unset and logprobs=5 (same prompts)."""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from benchmarks.load import load_prompts
from specpipe.client import CoordinatorClient, build_request

prompts = load_prompts(12)
client = CoordinatorClient("127.0.0.1:50071")
stats = {"none": [0.0, 0], "logprobs=5": [0.0, 0]}
def run(p, lp):
    t0 = time.perf_counter()
    r = client.generate(build_request(p, 128, logprobs=lp), 60)
    return time.perf_counter() - t0, len(r.token_ids), len(r.logprobs)
run(prompts[0], None); run(prompts[0], 5)
for rnd in range(int(sys.argv[1])):
    for i, p in enumerate(prompts):
        order = [None, 5] if (i + rnd) % 2 == 0 else [5, None]
        for lp in order:
            wall, n, nl = run(p, lp)
            assert nl == (n if lp is not None else 0)
            key = "none" if lp is None else "logprobs=5"
            stats[key][0] += wall; stats[key][1] += n
for key, (wall, n) in stats.items():
    print(f"{key:12} {n/wall:7.1f} tok/s  ({n} tokens in {wall:.2f} s)")
