"""Prefix sharing against none: requests whose prompts share a long prefix, on the embedded stack, one run.

Starts `specpipe serve` (prefix sharing on, the default) and `specpipe serve --no-prefix-sharing`, alternating
the two per round, and times on each, `--repeats` times:
- `n completions`: one request with `-n` completions of a long prompt (each completion is a session of its
  own, so without sharing every one computes the prompt again, on the draft and on the target);
- `shared prefix`: `-n` requests one after the other, each the same long prefix (a system prompt) and a
  question of its own.
Prints the median wall time of each on both stacks and sharing's speedup, measured in the same run; writes
every time as JSON. The prompt is cut from the held-out standard-library snippets (`--prefix-chars` long).

    specpipe bench prefix-sharing                   # 2 rounds, 6 repeats, n = 4, 16 new tokens
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks.batching import add_stack_options, alternated_stacks
from benchmarks.latency import default_out_dir
from benchmarks.load import SHIPPED_RECORD
from benchmarks.prompts import default_prompts
from specpipe.client import CoordinatorClient, build_request

SHARING, NO_SHARING = "sharing", "no-sharing"
WORKLOADS = ("n completions", "shared prefix")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench prefix-sharing",
        description="Requests sharing a long prompt prefix, with the workers' prefix sharing and without.",
    )
    p.add_argument("-n", type=int, default=4, help="completions per request, and requests per shared prefix")
    p.add_argument("--max-new-tokens", type=int, default=16, help="per completion (default: %(default)s)")
    p.add_argument("--prefix-chars", type=int, default=1500, help="the shared prefix's length in characters")
    p.add_argument("--repeats", type=int, default=6, help="timed repetitions per workload, stack and round")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two stacks")
    add_stack_options(p)
    p.add_argument("--quick", action="store_true", help="smoke-test settings: 1 round, 1 repeat, n = 2")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.n, args.max_new_tokens = 1, 1, 2, 4
    if min(args.n, args.max_new_tokens, args.prefix_chars, args.repeats, args.rounds) < 1:
        p.error("-n, --max-new-tokens, --prefix-chars, --repeats and --rounds must be >= 1")
    return args


def shared_prefix(chars: int) -> str:
    record = SHIPPED_RECORD if SHIPPED_RECORD.is_file() else None
    snippets, _ = default_prompts(record, lambda text: [0] * (len(text) // 3), 16)
    return "".join(snippet.text for snippet in snippets)[:chars]


def time_workloads(
    address: str, args: argparse.Namespace, prefix: str, round_: int
) -> dict[str, list[float]]:
    """Seconds per repetition of each workload."""
    times: dict[str, list[float]] = {workload: [] for workload in WORKLOADS}
    with CoordinatorClient(address) as client:
        for repeat in range(args.repeats):
            seed = round_ * args.repeats + repeat
            request = build_request(
                prefix, args.max_new_tokens, temperature=0.8, seed=seed, n=args.n, ignore_eos=True
            )
            started = time.perf_counter()
            client.generate_completions(request)
            times["n completions"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for i in range(args.n):
                question = f"{prefix}\n# question {seed}-{i}\n"
                client.generate(build_request(question, args.max_new_tokens, ignore_eos=True))
            times["shared prefix"].append(time.perf_counter() - started)
    return times


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace, prefix_tokens: int) -> str:
    lines = [
        "prefix sharing: `specpipe serve` against `specpipe serve --no-prefix-sharing`, a "
        f"{prefix_tokens}-token prefix, n = {args.n}, {args.max_new_tokens} new tokens each, "
        f"{args.rounds} round(s) x {args.repeats} repeats (medians)",
        f"{'workload':<16}{'sharing ms':>12}{'no sharing ms':>15}{'speedup':>9}",
    ]
    for workload in WORKLOADS:
        shared = statistics.median(results[SHARING][workload]) * 1000
        alone = statistics.median(results[NO_SHARING][workload]) * 1000
        lines.append(f"{workload:<16}{shared:>12.0f}{alone:>15.0f}{alone / shared:>8.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir = args.out_dir or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = shared_prefix(args.prefix_chars)
    stacks = {SHARING: [], NO_SHARING: ["--no-prefix-sharing"]}
    results: dict[str, dict[str, list[float]]] = {name: {w: [] for w in WORKLOADS} for name in stacks}
    prefix_tokens = 0
    for round_, name, address in alternated_stacks(args, stacks, out_dir):
        with CoordinatorClient(address) as client:
            prefix_tokens = len(client.tokenize(prefix).token_ids)
        for workload, times in time_workloads(address, args, prefix, round_).items():
            results[name][workload].extend(times)
        print(f"round {round_ + 1} {name}: done", flush=True)
    text = report(results, args, prefix_tokens)
    print(text)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["specpipe bench prefix-sharing", *argv]),
        "prefix_tokens": prefix_tokens,
        "seconds": results,
    }
    (out_dir / "prefix_sharing.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out_dir / "prefix_sharing.txt").write_text(text + "\n", encoding="utf-8")
    print(f"results: {out_dir / 'prefix_sharing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
