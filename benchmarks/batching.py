"""Cross-session batching against none: the same concurrent load on the embedded stack, both ways, one run.

Starts `specpipe serve` (the embedded stack: session store, draft, target, coordinator) without batching and
with `--max-batch-sessions N`, alternating the two per round, and sends each the load tester's streams
(`benchmarks/load.py`: the same prompts, all arriving at once, at most C in flight) at every concurrency C.
Prints output tokens/s and the median time per output token of both, and batching's ratio to the unbatched
stack measured in the same run; writes every summary as JSON.

    specpipe bench batching                                   # concurrency 1,4,8,16, 32 requests each
    specpipe bench batching --concurrency 8 --rounds 3        # three alternations at one concurrency
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks import load
from benchmarks.latency import default_out_dir
from specpipe.launcher import ServiceProcess, free_port

UNBATCHED, BATCHED = "unbatched", "batched"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench batching",
        description="Throughput under concurrent load with cross-session batching against without, one run.",
    )
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrencies")
    p.add_argument("--num-requests", type=int, default=32, help="requests per concurrency and stack")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--max-batch-sessions", type=int, default=8, help="the batched stack's --max-batch-sessions"
    )
    p.add_argument("--rounds", type=int, default=1, help="alternations of the two stacks")
    add_stack_options(p)
    p.add_argument("--quick", action="store_true", help="smoke-test settings: concurrency 2, 2 requests of 8")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.num_requests, args.max_new_tokens = "2", 2, 8
    try:
        args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrencies or min(args.concurrencies) < 1:
        p.error("--concurrency needs at least one value, each >= 1")
    if args.num_requests < 1 or args.max_new_tokens < 1 or args.rounds < 1 or args.max_batch_sessions < 2:
        p.error("--num-requests, --max-new-tokens and --rounds must be >= 1, --max-batch-sessions >= 2")
    return args


def add_stack_options(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark that starts embedded stacks (`embedded_stack`)."""
    p.add_argument("--target-model", help="default: the shipped demo pair")
    p.add_argument("--draft-model", help="default: the shipped demo pair")
    p.add_argument("--out-dir", type=Path, help="default: a new directory under /tmp/specpipe-bench/")
    p.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds to wait for each stack to serve"
    )


@contextlib.contextmanager
def embedded_stack(args: argparse.Namespace, flags: Sequence[str], log_dir: Path) -> Iterator[str]:
    """`specpipe serve` with `flags` on a free port, until its coordinator is SERVING; its address."""
    port = free_port()
    # No HTTP API: the load goes over gRPC, and port 8000 may be another stack's.
    serve_args = ["--port", str(port), "--http-port", "-1", "--log-dir", str(log_dir), *flags]
    for option, value in (("--target-model", args.target_model), ("--draft-model", args.draft_model)):
        if value:
            serve_args += [option, str(value)]
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = ServiceProcess("all", f"127.0.0.1:{port}", serve_args, log_dir / "serve.out")
    stack.start()
    try:
        stack.wait_serving(args.startup_timeout)
        yield stack.address
    finally:
        stack.stop(timeout_s=60.0)  # SIGTERM: the launcher drains and stops every component


def alternated_stacks(
    args: argparse.Namespace, stacks: dict[str, list[str]], out_dir: Path
) -> Iterator[tuple[int, str, str]]:
    """For each of `args.rounds` rounds, each stack (its name and `specpipe serve` flags) started in turn and
    SERVING: (round, name, address); the order alternates from round to round, so drift cancels."""
    names = list(stacks)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            with embedded_stack(args, stacks[name], out_dir / "logs" / f"{name}-{round_}") as address:
                yield round_, name, address


def run_load(address: str, args: argparse.Namespace, concurrency: int) -> dict[str, object]:
    load_args = load.parse_args(
        ["--address", address, "--num-requests", str(args.num_requests), "--concurrency", str(concurrency),
         "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
    )  # fmt: skip
    records, duration_s = asyncio.run(load.run_load(load_args, load.load_prompts(args.num_requests)))
    return load.summarize(records, duration_s)


def median_of(summaries: Sequence[dict[str, object]], key: str) -> float:
    """The median across rounds of a summary figure (of its median where it is a distribution); NaN if no
    round has it (a distribution with no samples)."""
    values = []
    for summary in summaries:
        value = summary[key]
        if isinstance(value, dict):
            value = value["median"]
        if value is not None:
            values.append(float(value))  # type: ignore[arg-type]
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, dict[int, list[dict[str, object]]]], args: argparse.Namespace) -> str:
    lines = [
        f"cross-session batching: `specpipe serve` against `specpipe serve --max-batch-sessions "
        f"{args.max_batch_sessions}`, {args.num_requests} requests x {args.max_new_tokens} new tokens per "
        f"concurrency, temperature {args.temperature:g}, {args.rounds} round(s) (medians across rounds)",
        f"{'concurrency':>11}  {'unbatched tok/s':>15}  {'batched tok/s':>13}  {'x unbatched':>11}  "
        f"{'TPOT ms unbatched':>17}  {'batched':>7}  {'failed':>6}",
    ]
    for concurrency in args.concurrencies:
        plain, batched = results[UNBATCHED][concurrency], results[BATCHED][concurrency]
        plain_tps = median_of(plain, "output_token_throughput_per_s")
        batched_tps = median_of(batched, "output_token_throughput_per_s")
        ratio = batched_tps / plain_tps if plain_tps > 0 else float("nan")
        failed = sum(int(s["failed"]) for s in (*plain, *batched))  # type: ignore[call-overload]
        tpot = [median_of(runs, "tpot_ms") for runs in (plain, batched)]
        lines.append(
            f"{concurrency:>11}  {plain_tps:>15.1f}  {batched_tps:>13.1f}  {ratio:>10.2f}x  "
            f"{tpot[0]:>17.2f}  {tpot[1]:>7.2f}  {failed:>6}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir = args.out_dir or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both without prefix sharing: each concurrency level sends the same prompts to the same stack, which
    # would otherwise copy them from the level before (and the figures would not compare with earlier runs).
    unshared = ["--no-prefix-sharing"]
    stacks = {UNBATCHED: unshared, BATCHED: [*unshared, "--max-batch-sessions", str(args.max_batch_sessions)]}
    results: dict[str, dict[int, list[dict[str, object]]]] = {
        name: {c: [] for c in args.concurrencies} for name in stacks
    }
    started = time.perf_counter()
    for round_, name, address in alternated_stacks(args, stacks, out_dir):
        for concurrency in args.concurrencies:
            summary = run_load(address, args, concurrency)
            results[name][concurrency].append(summary)
            print(
                f"[{time.perf_counter() - started:6.1f}s] round {round_ + 1} {name}, concurrency "
                f"{concurrency}: {summary['output_token_throughput_per_s']:.1f} output tokens/s",
                flush=True,
            )
    text = report(results, args)
    print(text)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["specpipe bench batching", *argv]),
        "results": {name: {str(c): runs for c, runs in by_c.items()} for name, by_c in results.items()},
    }
    (out_dir / "batching.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out_dir / "batching.txt").write_text(text + "\n", encoding="utf-8")
    print(f"results: {out_dir / 'batching.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
