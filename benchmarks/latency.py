"""End-to-end latency benchmark (issue 4): specpipe against plain decoding and Hugging Face, in one run.

Batch 1, the same held-out prompts for every variant, greedy and sampled (temperature 0.8, a fixed seed per
prompt). Variants:

- ``plain-1t`` / ``plain-2t``: the target alone on a KV cache, one forward per token, 1 or 2 torch threads
  (the faster one is the baseline);
- ``hf-generate``, ``hf-assisted`` (``assistant_model=draft``, HF's default schedule), ``hf-prompt-lookup``;
- ``specpipe-*``: the real services (Redis-protocol store, draft and target workers, one coordinator per
  configuration) over loopback: k = 0, fixed k with and without pipelining, adaptive k.

Run ``specpipe bench latency --help``; definitions of every column: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import inprocess, probes, report, services
from benchmarks import prompts as prompts_mod
from benchmarks.results import GREEDY, SAMPLE, Mode, VariantRun

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PAIR = REPO / "specpipe" / "assets" / "demo-pair"
IN_PROCESS = ("plain-1t", "plain-2t", "hf-generate", "hf-assisted", "hf-prompt-lookup")
# plain-1t again once the services have stopped: the baseline is the faster of the plain measurements.
IN_PROCESS_END = ("plain-1t-end",)

logger = logging.getLogger("benchmarks.latency")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench latency",
        description="Tokens/s of specpipe against plain target decoding and Hugging Face generate(), "
        "batch 1, greedy and sampled, in one run on this machine.",
    )
    p.add_argument("--target-model", type=Path, help="default: the shipped demo pair, else the tiny pair")
    p.add_argument("--draft-model", type=Path)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated subset (plain-1t always runs); names: see --list-variants",
    )
    p.add_argument("--list-variants", action="store_true", help="print the variant names and exit")
    p.add_argument("--modes", default="greedy,sample", help="greedy, sample or both")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sample mode")
    p.add_argument("--seed-base", type=int, default=1000, help="prompt i samples with seed seed-base + i")
    p.add_argument("--fixed-k", default="2,4,6", help="the fixed draft lengths to run")
    p.add_argument(
        "--pipelined-k", choices=("best", "all"), default="best",
        help="fixed k run with pipelining: the best non-pipelined one, or all",
    )  # fmt: skip
    p.add_argument(
        "--all-baseline-modes", action="store_true",
        help="run plain-2t in every mode (default: later modes only if within 5%% of plain-1t in the first)",
    )  # fmt: skip
    p.add_argument("--max-speculative-tokens", type=int, default=16, help="coordinators' bound on k")
    p.add_argument("--cost-runs", type=int, default=40, help="timed forwards per cost measurement")
    p.add_argument(
        "--cost-context",
        type=int,
        default=0,
        help="cached tokens for the cost measurement (0: mean prompt length + max_new_tokens/2)",
    )
    p.add_argument("--out-dir", type=Path, help="default: a new directory under /tmp/specpipe-bench/")
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests: 2 prompts, 8 tokens")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts = min(args.num_prompts, 2)
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.cost_runs = min(args.cost_runs, 5)
    return args


def model_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.target_model and args.draft_model:
        return args.target_model, args.draft_model
    if bool(args.target_model) != bool(args.draft_model):
        raise SystemExit("specpipe bench latency: give both --target-model and --draft-model, or neither")
    if (SHIPPED_PAIR / "target").is_dir() and (SHIPPED_PAIR / "draft").is_dir():
        return SHIPPED_PAIR / "target", SHIPPED_PAIR / "draft"
    from specpipe.default_models import default_model_dirs

    return default_model_dirs()


def all_variants(fixed_ks: Sequence[int]) -> list[str]:
    return [*IN_PROCESS, *services.spec_configs(fixed_ks), *IN_PROCESS_END]


def chosen_variants(args: argparse.Namespace, fixed_ks: Sequence[int]) -> list[str]:
    known = all_variants(fixed_ks)
    if not args.variants:
        return known
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = wanted - set(known)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(known)}")
    return [v for v in known if v in wanted or v == "plain-1t"]


def machine() -> dict[str, object]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "description": f"{os.cpu_count()}-core {cpu}, PyTorch {torch.__version__} CPU, "
        f"transformers {transformers.__version__}",
    }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything the phases share: models, prompts, modes, the variants to run."""

    args: argparse.Namespace
    target_dir: Path
    draft_dir: Path
    pair: inprocess.ModelPair
    prompts: list[prompts_mod.Prompt]
    prompt_source: str
    modes: list[Mode]
    fixed_ks: list[int]
    variants: list[str]


def setup(args: argparse.Namespace) -> Setup:
    fixed_ks = [int(k) for k in args.fixed_k.split(",") if k.strip()]
    modes = [
        Mode(GREEDY, 0.0, args.seed_base)
        if m.strip() == GREEDY
        else Mode(SAMPLE, args.temperature, args.seed_base)
        for m in args.modes.split(",")
        if m.strip()
    ]
    target_dir, draft_dir = model_dirs(args)
    pair = inprocess.load_pair(target_dir, draft_dir)

    def encode(text: str) -> list[int]:
        return list(pair.tokenizer(text)["input_ids"])

    record = prompts_mod.find_record(target_dir, SHIPPED_PAIR / "training_record.json")
    chosen, source = prompts_mod.default_prompts(record, encode, args.num_prompts)
    lengths = [len(p.token_ids) for p in chosen]
    progress(
        f"models: target {target_dir}, draft {draft_dir}; {len(chosen)} prompts ({min(lengths)}-"
        f"{max(lengths)} tokens) from {source}"
    )
    variants = chosen_variants(args, fixed_ks)
    return Setup(args, target_dir, draft_dir, pair, chosen, source, modes, fixed_ks, variants)


def rate(run: VariantRun) -> float:
    return run.tokens / run.wall_s if run.wall_s else 0.0


def skip_reason(variant: str, mode: Mode, runs: Sequence[VariantRun], args: argparse.Namespace) -> str:
    """plain-2t runs in the later modes only if it was within 5% of plain-1t in the first one (the thread
    count changes the forward cost, not the decoding), unless --all-baseline-modes."""
    if variant != "plain-2t" or args.all_baseline_modes:
        return ""
    earlier = {r.variant: r for r in runs if r.variant in ("plain-1t", "plain-2t") and r.mode != mode.name}
    one, two = earlier.get("plain-1t"), earlier.get("plain-2t")
    if one is None or two is None or rate(two) >= 0.95 * rate(one):
        return ""
    return f"skipped: {rate(two) / rate(one):.0%} of plain-1t's tokens/s in {one.mode}"


def inprocess_phase(st: Setup, names: Sequence[str], runs: list[VariantRun]) -> None:
    for variant in (v for v in st.variants if v in names):
        for mode in st.modes:
            threads = 2 if variant == "plain-2t" else 1
            reason = skip_reason(variant, mode, runs, st.args)
            if reason:
                run = VariantRun(
                    variant, mode.name, "plain", "target alone, KV cache, 2 threads", error=reason
                )
            else:
                run = inprocess.run_inprocess(
                    variant, st.pair, st.prompts, mode, st.args.max_new_tokens, threads
                )
            runs.append(run)
            progress(f"{variant:<22} {mode.name:<6} " + (run.error or f"{rate(run):8.1f} tok/s"))


def best_fixed_k(runs: Sequence[VariantRun], configs: dict[str, services.SpecConfig]) -> int | None:
    """The fixed k whose non-pipelined run was fastest in the first mode measured."""
    fixed = [r for r in runs if r.variant in configs and not configs[r.variant].pipelining]
    fixed = [r for r in fixed if not configs[r.variant].adaptive and configs[r.variant].request_k is None]
    if not fixed:
        return None
    first_mode = fixed[0].mode
    return configs[max((r for r in fixed if r.mode == first_mode), key=rate).variant].k


def services_phase(st: Setup, out_dir: Path, runs: list[VariantRun]) -> tuple[dict, dict]:
    """Runs every specpipe variant against one pair of workers; returns (round-trip probes, cost profiles)."""
    from specpipe.client import CoordinatorClient

    configs = services.spec_configs(st.fixed_ks)
    wanted = [configs[v] for v in st.variants if v in configs]
    if not wanted:
        return {}, {}
    profiles: dict[str, dict[str, float]] = {}
    with services.Services(
        st.target_dir, st.draft_dir, out_dir / "logs", st.args.max_speculative_tokens
    ) as svc:
        vocab = int(st.pair.target.get_output_embeddings().weight.shape[0])
        repeats = 20 if st.args.quick else 100
        round_trips = probes.probe_round_trips(svc, st.prompts[0].token_ids, vocab, repeats)
        for config in wanted:
            if config.pipelining and not config.adaptive and st.args.pipelined_k == "best":
                best = best_fixed_k(runs, configs)
                if best is not None and config.k != best:
                    continue
            with svc.coordinator(config) as coordinator, CoordinatorClient(coordinator.address) as client:
                for mode in st.modes:
                    run = services.run_specpipe(client, config, st.prompts, mode, st.args.max_new_tokens)
                    runs.append(run)
                    progress(f"{config.variant:<22} {mode.name:<6} {rate(run):8.1f} tok/s")
                profile = services.cost_profile(coordinator.log_path)
                if profile is not None:
                    profiles[config.variant] = profile
    return round_trips, profiles


def run_all(args: argparse.Namespace, out_dir: Path) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    st = setup(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    lengths = [len(p.token_ids) for p in st.prompts]
    context = args.cost_context or int(statistics.mean(lengths)) + args.max_new_tokens // 2
    max_k = max([args.max_speculative_tokens, *st.fixed_ks])
    costs = inprocess.measure_costs(st.pair, st.prompts[0].token_ids, context, max_k, args.cost_runs)
    progress(
        f"costs at {context} cached tokens: target {costs.target_ms:.3f} ms, draft {costs.draft_ms:.3f} ms "
        f"(c = {costs.c:.3f}), v_4 = {costs.v(4):.2f}"
    )
    runs: list[VariantRun] = []
    inprocess_phase(st, IN_PROCESS, runs)
    round_trips, profiles = services_phase(st, out_dir, runs)
    inprocess_phase(st, IN_PROCESS_END, runs)
    rows = [report.metrics(run, runs, costs) for run in runs]
    baselines = {m.name: (b.variant if (b := report.best_baseline(runs, m.name)) else None) for m in st.modes}
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": None,  # filled in by main()
            "machine": machine(),
            "target_model": str(st.target_dir),
            "draft_model": str(st.draft_dir),
            "num_prompts": len(st.prompts),
            "max_new_tokens": args.max_new_tokens,
            "modes": {
                m.name: {"temperature": m.temperature, "seeds": f"{m.seed_base} + prompt index"}
                for m in st.modes
            },
            "prompt_source": st.prompt_source,
            "prompts": [{"source": p.source, "tokens": len(p.token_ids)} for p in st.prompts],
            "fixed_k": st.fixed_ks,
            "pipelined_k": args.pipelined_k,
            "max_speculative_tokens": args.max_speculative_tokens,
            "baseline": baselines,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
        "costs": costs.to_dict(),
        "coordinator_cost_profiles": profiles,
        "round_trip_probes": round_trips,
        "results": rows,
        "targets": {m.name: report.check_targets(rows, m.name) for m in st.modes},
        "outputs": outputs_record(runs),
    }


def outputs_record(runs: Sequence[VariantRun]) -> dict[str, dict[str, object]]:
    """plain-1t's token ids in full; for every run, a short digest and the length of each output."""
    record: dict[str, dict[str, object]] = {}
    for run in runs:
        entry: dict[str, object] = {
            "lengths": [len(o) for o in run.outputs],
            "sha256": [hashlib.sha256(json.dumps(o).encode()).hexdigest()[:16] for o in run.outputs],
        }
        if run.variant == "plain-1t":
            entry["token_ids"] = run.outputs
        record[f"{run.variant}/{run.mode}"] = entry
    return record


def summary(payload: dict[str, object]) -> str:
    meta: dict = payload["meta"]  # type: ignore[assignment]
    rows: list = payload["results"]  # type: ignore[assignment]
    costs: dict = payload["costs"]  # type: ignore[assignment]
    parts = [
        f"specpipe latency benchmark, {meta['date']}, {meta['machine']['description']}",
        f"target {meta['target_model']}, draft {meta['draft_model']}; {meta['num_prompts']} prompts x "
        f"{meta['max_new_tokens']} new tokens, batch 1",
        f"costs at {costs['context_tokens']} cached tokens (median of {costs['runs']}): target "
        f"{costs['target_ms']:.3f} ms, draft {costs['draft_ms']:.3f} ms, c = {costs['c']:.3f}, "
        f"v_k (k=0..6) = {', '.join(f'{v:.2f}' for v in costs['v_k'][:7])}",
    ]
    if payload.get("round_trip_probes"):
        parts.append(f"loopback round trips: {payload['round_trip_probes']}")
    profiles = list(dict(payload.get("coordinator_cost_profiles") or {}).values())
    if profiles:
        medians = {key: statistics.median(p[key] for p in profiles) for key in profiles[0]}
        parts.append(f"coordinators' start-up cost profiles (median of {len(profiles)}): {medians}")
    for mode, baseline in meta["baseline"].items():
        parts.append("")
        parts.append(f"[{mode}] baseline: {baseline}")
        parts.append(report.table(rows, mode))
        matched = [
            r for r in rows if r["mode"] == mode and "match_vs_plain" in r and r["variant"] != "plain-1t"
        ]
        if mode == "greedy" and matched:
            full = all(r.get("identical_to_plain") for r in matched)
            counts = ", ".join(f"{r['variant']} {r['match_vs_plain']}" for r in matched)
            verdict = f"every variant {matched[0]['match_vs_plain']} identical" if full else "MISMATCH"
            parts.append(f"greedy outputs vs plain-1t: {verdict} ({counts})")
        checks = dict(payload["targets"]).get(mode)  # type: ignore[call-overload]
        if checks:
            parts.append(f"targets ({mode}): {checks}")
    return "\n".join(parts)


def default_out_dir() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(tempfile.gettempdir()) / "specpipe-bench" / stamp


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr)
    if args.list_variants:
        print("\n".join(all_variants([int(k) for k in args.fixed_k.split(",") if k.strip()])))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out_dir = args.out_dir or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = run_all(args, out_dir)
    payload["meta"]["command"] = " ".join(["specpipe", "bench", "latency", *argv])  # type: ignore[index]
    text = summary(payload)
    print(text, flush=True)
    report.write_json(out_dir / "latency.json", payload)
    meta: dict = payload["meta"]  # type: ignore[assignment]
    report.write_chart(
        out_dir / "latency.png",
        payload["results"],
        list(meta["modes"]),  # type: ignore[arg-type]
        f"specpipe latency, batch 1, {meta['num_prompts']} prompts x {meta['max_new_tokens']} tokens, "
        f"{meta['machine']['description']}",
    )
    (out_dir / "latency.txt").write_text(text + "\n", encoding="utf-8")
    print(f"results: {out_dir / 'latency.json'}, {out_dir / 'latency.png'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
