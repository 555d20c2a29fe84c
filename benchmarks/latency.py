"""End-to-end latency benchmark (issue 4): specpipe against plain decoding and Hugging Face, in one run.

Batch 1, the same held-out prompts for every variant, greedy and sampled (temperature 0.8, a fixed seed per
prompt). Variants:

- ``plain-1t`` / ``plain-2t``: the target alone on a KV cache, one forward per token, 1 or 2 torch threads
  (the faster one is the baseline); with ``--static-kv-slots``, also ``plain-static``: the target alone
  through the workers' static-KV-slot forward (CUDA graphs on a GPU), a baseline too, so that no speedup
  counts what that forward gains over transformers' own;
- ``hf-generate``, ``hf-assisted`` (``assistant_model=draft``, HF's default schedule), ``hf-prompt-lookup``;
- ``specpipe-*``: the real services (Redis-protocol store, draft and target workers, one coordinator per
  configuration) over loopback: k = 0, fixed k with and without pipelining, adaptive k.

Every variant runs prompt by prompt, interleaved with the others in a rotating order (`Interleaved`), so that
drift of the machine's speed during the run hits all of them alike. A few pilot prompts decide which fixed k
also runs pipelined and whether ``plain-2t`` is worth measuring on the remaining prompts.

Run ``specpipe bench latency --help``; definitions of every column: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks import inprocess, probes, report, services
from benchmarks import prompts as prompts_mod
from benchmarks.results import GREEDY, SAMPLE, Mode, VariantRun
from specpipe.rpc.event_loop import resolve as resolve_event_loop
from specpipe.sampling.params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PAIR = REPO / "specpipe" / "assets" / "demo-pair"
IN_PROCESS = ("plain-1t", "plain-2t", "plain-static", "hf-generate", "hf-assisted", "hf-prompt-lookup")
# With --static-kv-slots the workers run the lean forward over static slots (CUDA graphs on a GPU), which is
# faster than transformers' forward on its own: plain decoding through that same forward is then a baseline
# too, so no speedup counts what the forward gained rather than what speculation did.
STATIC_BASELINE = "plain-static"
PLAIN_2T_KEEP = 0.95  # plain-2t goes on after the pilot only within 5% of plain-1t's tokens/s

logger = logging.getLogger("benchmarks.latency")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench latency",
        description="Tokens/s of specpipe against plain target decoding and Hugging Face generate(), "
        "batch 1, greedy and sampled, in one run on this machine.",
    )
    p.add_argument("--target-model", type=Path, help="default: the shipped demo pair, else the tiny pair")
    p.add_argument("--draft-model", type=Path, help="with --target-model (default: the demo pair's draft)")
    p.add_argument("--num-prompts", type=int, default=12, help="held-out prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default: %(default)s)")
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated subset, run exactly (plain-1t always runs); names: see --list-variants",
    )
    p.add_argument("--list-variants", action="store_true", help="print the variant names and exit")
    p.add_argument("--modes", default="greedy,sample", help="greedy, sample or both")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sample mode")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling in the sample mode (1.0: off, the default)"
    )
    p.add_argument("--seed-base", type=int, default=1000, help="prompt i samples with seed seed-base + i")
    p.add_argument("--fixed-k", default="2,4,6", help="the fixed draft lengths to run")
    p.add_argument(
        "--pipelined-k", choices=("best", "all"), default="best",
        help="default variant set: pipelining for the best non-pipelined fixed k only, or for all",
    )  # fmt: skip
    p.add_argument(
        "--pilot-prompts", type=int, default=4,
        help="default variant set: prompts run before the pipelined fixed k and plain-2t are decided",
    )  # fmt: skip
    p.add_argument(
        "--all-baselines", action="store_true",
        help="default variant set: measure plain-2t on every prompt even if it was slower on the pilot",
    )  # fmt: skip
    p.add_argument(
        "--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
        help="seconds from the start by which the last prompt must end: a prompt whose expected time (the "
        "last one's) would run past it is not started, and the run reports the prompts it completed "
        "(0: no budget)",
    )  # fmt: skip
    p.add_argument("--max-speculative-tokens", type=int, default=16, help="coordinators' bound on k")
    p.add_argument(
        "--device", default="cpu",
        help="cpu or cuda[:N]: where every model runs, in-process and in the workers (default cpu)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="default: %(default)s"
    )
    p.add_argument(
        "--static-kv-slots", type=int, default=0,
        help="the workers' --static-kv-slots: KV slots and, on a GPU, CUDA graphs of their forwards (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--controlled-acceptance", type=float, default=None, metavar="A",
        help="cost profiling on a pair whose draft does not match its target (e.g. random models): the "
        "specpipe draft worker proposes the target's own greedy token with probability A per position "
        "(draft_service/controlled.py; the target's continuations are computed first); greedy mode only",
    )  # fmt: skip
    p.add_argument("--cost-runs", type=int, default=30, help="timed forwards per cost measurement")
    p.add_argument(
        "--cost-context",
        type=int,
        default=0,
        help="cached tokens for the cost measurement (0: mean prompt length + max_new_tokens/2)",
    )
    p.add_argument("--out-dir", type=Path, help="default: a new directory under /tmp/specpipe-bench/")
    p.add_argument(
        "--quick", action="store_true", help="tiny settings for smoke tests: 2 prompts (1 pilot), 8 tokens"
    )
    p.add_argument("--log-level", default="WARNING", help="the benchmark's own log (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.static_kv_slots < 0:
        p.error("--static-kv-slots must be >= 0")
    if args.controlled_acceptance is not None:
        if not 0.0 <= args.controlled_acceptance <= 1.0:
            p.error("--controlled-acceptance must be in [0, 1]")
        if any(m.strip() != GREEDY for m in args.modes.split(",") if m.strip()):
            p.error("--controlled-acceptance steers greedy drafts: use --modes greedy")
    if args.quick:
        args.num_prompts = min(args.num_prompts, 2)
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.cost_runs = min(args.cost_runs, 5)
        args.pilot_prompts = min(args.pilot_prompts, 1)
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
    return [*IN_PROCESS, *services.spec_configs(fixed_ks)]


def chosen_variants(args: argparse.Namespace, fixed_ks: Sequence[int]) -> list[str]:
    """The variants to run: the default set or `--variants`, always with plain-1t (the outputs' reference)
    and, with static KV slots, plain-static (a baseline then); plain-static never runs without them."""
    known = all_variants(fixed_ks)
    if not args.variants:
        wanted = {v for v in known if v not in services.OPT_IN_VARIANTS}
    else:
        wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
        unknown = wanted - set(known)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(known)}")
    if STATIC_BASELINE in wanted and not args.static_kv_slots:
        if args.variants:
            raise SystemExit(
                f"{STATIC_BASELINE} decodes through the workers' static KV slots: give --static-kv-slots"
            )
        wanted.discard(STATIC_BASELINE)
    wanted.add("plain-1t")
    if args.static_kv_slots:
        wanted.add(STATIC_BASELINE)
    return [v for v in known if v in wanted]


def cpu_name(fallback: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """/proc/cpuinfo's model name and, where it gives them, the family and model numbers: a VM's CPU is often
    named just "AMD EPYC", and hosts of one name differ (run 26's ran the forwards ~1.8x as fast as runs
    1-25's)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return fallback
    name = fields.get("model name", fallback)
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine(device: str = "cpu", dtype: str = "float32", static_kv_slots: int = 0) -> dict[str, object]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    loop = resolve_event_loop("auto")
    if loop == "uvloop":
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    cpu = cpu_name(cpu)
    models_on = "CPU"
    if device != "cpu":
        models_on = f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    runs = f"models on {models_on} in {dtype}"
    if static_kv_slots:
        runs += f", workers with {static_kv_slots} static KV slots"
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": device,
        "dtype": dtype,
        "static_kv_slots": static_kv_slots,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "services_event_loop": loop,  # the services' `--event-loop auto` (runs 1-22: asyncio's own)
        "description": f"{os.cpu_count()}-core {cpu}, PyTorch {torch.__version__}, "
        f"transformers {transformers.__version__}, {runs}, services on {loop}",
    }


STARTED = time.perf_counter()  # reset by main(); progress lines carry the time since
# Issue 4 asks the whole run to finish within 10 minutes; the report and shutdown take a few seconds after the
# last prompt, and a slow hour stretches every prompt (run 21 took 9.0 minutes for 12).
DEFAULT_TIME_BUDGET_S = 560.0


def elapsed_s() -> float:
    return time.perf_counter() - STARTED


def progress(message: str) -> None:
    print(f"[{elapsed_s():6.1f}s] {message}", file=sys.stderr, flush=True)


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
        else Mode(SAMPLE, args.temperature, args.seed_base, args.top_p)
        for m in args.modes.split(",")
        if m.strip()
    ]
    target_dir, draft_dir = model_dirs(args)
    pair = inprocess.load_pair(target_dir, draft_dir, args.device, args.dtype)

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


Runner = inprocess.InProcessVariant | services.SpecpipeVariant


class Interleaved:
    """Runs every variant prompt by prompt, rotating the variant order, so that drift of the machine's speed
    during the run (a shared VM drifts by 20% over minutes) hits every variant alike.

    A variant that fails (warm-up or any prompt) gets the error in its run and is skipped from then on; the
    other variants go on."""

    def __init__(self, modes: Sequence[Mode], clock: Callable[[], float] = time.perf_counter) -> None:
        self.modes = list(modes)
        self.runners: dict[str, Runner] = {}
        self.runs: dict[tuple[str, str], VariantRun] = {}
        self.clock = clock
        self.last_prompt_s: float | None = None  # the last prompt run by every variant, on `clock`

    def add(self, runner: Runner) -> None:
        """Registers a runner and warms it up in every mode (one short request)."""
        self.runners[runner.variant] = runner
        for mode in self.modes:
            run = runner.new_run(mode)
            try:
                run.error = runner.warmup(mode)
            except Exception as exc:  # noqa: BLE001 - reported in the variant's row, the others go on
                run.error = f"warm-up failed: {type(exc).__name__}: {exc}"
            self.runs[(runner.variant, mode.name)] = run
            if run.error:
                progress(f"{runner.variant} {mode.name}: {run.error}")

    def fail(self, variant: str, family: str, description: str, error: str) -> None:
        """Records a variant that could not be started at all."""
        for mode in self.modes:
            self.runs[(variant, mode.name)] = VariantRun(variant, mode.name, family, description, error=error)
        progress(f"{variant}: {error}")

    def stop(self, variant: str, reason: str) -> None:
        """Takes a variant out of the rest of the run; its rows report `reason` instead of figures."""
        for mode in self.modes:
            run = self.runs.get((variant, mode.name))
            if run is not None and not run.error:
                run.error = reason

    def run_prompts(
        self, indices: Sequence[int], only: Sequence[str] | None = None, deadline: float | None = None
    ) -> int:
        """Runs the prompts, every variant (or `only`) in every mode; returns how many ran. With a deadline
        (on `clock`), a prompt is not started when the last one's time would take it past the deadline."""
        names = [n for n in self.runners if only is None or n in only]
        ran = 0
        for i in indices:
            started = self.clock()
            if (
                deadline is not None
                and self.last_prompt_s is not None
                and started + self.last_prompt_s > deadline
            ):
                late_s = started + self.last_prompt_s - deadline
                progress(f"time budget: prompt {i + 1} would end {late_s:.0f} s past it; stopping after {i}")
                break
            shift = i % max(1, len(names))
            for mode in self.modes:
                for name in names[shift:] + names[:shift]:
                    run = self.runs[(name, mode.name)]
                    if run.error:
                        continue
                    try:
                        self.runners[name].run_prompt(i, mode, run)
                    except Exception as exc:  # noqa: BLE001 - reported in the variant's row
                        run.error = f"failed at prompt {i + 1}: {type(exc).__name__}: {exc}"
                        progress(f"{name} {mode.name}: {run.error}")
            if only is None:
                self.last_prompt_s = self.clock() - started
            ran += 1
            progress(f"prompt {i + 1} done ({len(names)} variants x {len(self.modes)} modes)")
        return ran

    def rate_of(self, variant: str, mode: str) -> float | None:
        run = self.runs.get((variant, mode))
        return None if run is None or run.error or not run.wall_s else rate(run)

    def ordered_runs(self, order: Sequence[str]) -> list[VariantRun]:
        rank = {name: i for i, name in enumerate(order)}
        mode_rank = {mode.name: i for i, mode in enumerate(self.modes)}
        keys = sorted(self.runs, key=lambda key: (rank.get(key[0], len(rank)), mode_rank.get(key[1], 0)))
        return [self.runs[key] for key in keys]


def best_fixed_k(bench: Interleaved, configs: dict[str, services.SpecConfig], mode: str) -> int | None:
    """The fixed k whose non-pipelined variant has been fastest so far in `mode`."""
    fixed = [
        run for (name, run_mode), run in bench.runs.items()
        if run_mode == mode and name in configs and not run.error and run.wall_s
        and not configs[name].pipelining and not configs[name].adaptive and configs[name].request_k is None
    ]  # fmt: skip
    if not fixed:
        return None
    return configs[max(fixed, key=rate).variant].k


def pipelined_later(st: Setup, configs: dict[str, services.SpecConfig]) -> list[str]:
    """Fixed-k pipelined variants whose k is chosen after the pilot prompts (default variant set only)."""
    if st.args.variants or st.args.pipelined_k == "all":
        return []
    return [v for v in st.variants if v in configs and configs[v].pipelining and not configs[v].adaptive]


def plain_2t_on_pilot(st: Setup) -> bool:
    """Whether plain-2t runs on the pilot prompts only unless it keeps up with plain-1t there."""
    return not (st.args.variants or st.args.all_baselines) and "plain-2t" in st.variants


def decide_plain_2t(bench: Interleaved, mode: str, remaining: int) -> dict[str, object]:
    """After the pilot: plain-2t goes on only within 5% of plain-1t (the thread count changes the forward
    cost, not the decoding, so a clearly slower plain-2t cannot become the baseline)."""
    one, two = bench.rate_of("plain-1t", mode), bench.rate_of("plain-2t", mode)
    if one is None or two is None:
        return {}
    ratio = two / one
    kept = ratio >= PLAIN_2T_KEEP or remaining == 0
    if not kept:
        bench.stop("plain-2t", f"stopped after the pilot: {ratio:.0%} of plain-1t's tokens/s ({mode})")
    return {"plain_2t_vs_plain_1t": round(ratio, 3), "plain_2t_kept": kept}


def start_services(st: Setup, out_dir: Path, stack: ExitStack) -> services.Services | None:
    """The store and both workers, when any specpipe variant is to run."""
    if not any(v in services.spec_configs(st.fixed_ks) for v in st.variants):
        return None
    logs = out_dir / "logs"
    lookup = services.LOOKUP_VARIANT in st.variants
    grpc_target = services.GRPC_STREAM_VARIANT in st.variants
    steer: list[str] = []
    if st.args.controlled_acceptance is not None:
        references = write_references(st, out_dir / "references.json")
        steer = [
            "--controlled-acceptance",
            str(st.args.controlled_acceptance),
            "--reference-file",
            str(references),
        ]
    return stack.enter_context(
        services.Services(
            st.target_dir,
            st.draft_dir,
            logs,
            st.args.max_speculative_tokens,
            prompt_lookup=lookup,
            grpc_target=grpc_target,
            device=st.args.device,
            dtype=st.args.dtype,
            static_kv_slots=st.args.static_kv_slots,
            draft_extra=steer,
        )  # fmt: skip
    )


def write_references(st: Setup, path: Path) -> Path:
    """Each prompt and the target's greedy continuation, past max_new_tokens by the most a round can draft
    (and past EOS), for the controlled-acceptance draft worker."""
    tokens = st.args.max_new_tokens + st.args.max_speculative_tokens + 2
    greedy, no_eos = SamplingParams(), frozenset[int]()  # past EOS too: a draft may look beyond it
    if st.args.static_kv_slots:
        # Through the forward the target worker runs then (the lean static one): in bfloat16 transformers'
        # forward rounds differently, a random model's greedy continuation splits from the worker's within
        # a few dozen tokens, and past the split the draft would find no reference (acceptance near 0).
        runner = inprocess.static_runner(st.pair.target, st.pair.tokenizer)
        sequences = [
            [
                *p.token_ids,
                *inprocess.runner_decode(runner, "reference", p.token_ids, tokens, greedy, no_eos).tokens,
            ]
            for p in st.prompts
        ]
    else:
        sequences = [
            [*p.token_ids, *inprocess.plain_decode(st.pair.target, p.token_ids, tokens, greedy, no_eos)]
            for p in st.prompts
        ]
    path.write_text(json.dumps(sequences), encoding="utf-8")
    progress(f"controlled acceptance {st.args.controlled_acceptance}: {len(sequences)} references in {path}")
    return path


def add_specpipe(bench: Interleaved, svc: services.Services, config: services.SpecConfig, st: Setup) -> None:
    """Starts the coordinator of `config` and registers it; one that fails to start is reported, not fatal."""
    try:
        runner = svc.start_variant(config, st.prompts, st.args.max_new_tokens)
    except Exception as exc:  # noqa: BLE001
        error = f"start failed: {type(exc).__name__}: {exc}"
        bench.fail(config.variant, "specpipe", config.describe(), error)
        return
    bench.add(runner)


def run_variants(st: Setup, out_dir: Path) -> tuple[list[VariantRun], dict, dict, dict]:
    """Every variant, interleaved; returns (runs, round-trip probes, coordinator cost profiles, pilot)."""
    configs = services.spec_configs(st.fixed_ks)
    later = pipelined_later(st, configs)
    decide_2t = plain_2t_on_pilot(st)
    bench = Interleaved(st.modes)
    round_trips: dict[str, float] = {}
    pilot_record: dict[str, object] = {}
    with ExitStack() as stack:
        try:
            svc = start_services(st, out_dir, stack)
        except Exception as exc:  # noqa: BLE001
            # A worker that cannot start (a GPU capture, a model it cannot load) costs the specpipe rows, not
            # the in-process baselines that run beside them.
            svc = None
            error = f"services failed to start: {type(exc).__name__}: {exc} (logs: {out_dir / 'logs'})"
            for name in st.variants:
                if name in configs:
                    bench.fail(name, "specpipe", configs[name].describe(), error)
        if svc is not None:
            progress("services serving; round-trip probes")
            vocab = int(st.pair.target.get_output_embeddings().weight.shape[0])
            repeats = 20 if st.args.quick else 50
            round_trips = probes.probe_round_trips(svc, st.prompts[0].token_ids, vocab, repeats)
        for name in st.variants:
            if name in IN_PROCESS:
                bench.add(
                    inprocess.InProcessVariant(
                        name, st.pair, st.prompts, st.args.max_new_tokens, st.args.static_kv_slots
                    )
                )
            elif svc is not None and name in configs and name not in later:
                add_specpipe(bench, svc, configs[name], st)
        progress(f"{len(bench.runners)} variants started and warmed up")
        pilot_size = st.args.pilot_prompts if later or decide_2t else 0
        pilot = list(range(min(len(st.prompts), max(pilot_size, 0))))
        bench.run_prompts(pilot)
        remaining = len(st.prompts) - len(pilot)
        if later or decide_2t:
            pilot_record["prompts"] = len(pilot)
        if decide_2t and pilot:
            pilot_record.update(decide_plain_2t(bench, st.modes[0].name, remaining))
        if later:
            best = best_fixed_k(bench, configs, st.modes[0].name)
            chosen = [v for v in later if best is None or configs[v].k == best]
            pilot_record.update(best_fixed_k=best, pipelined=chosen)
            if svc is not None and chosen:
                for name in chosen:
                    add_specpipe(bench, svc, configs[name], st)
                progress(f"pipelining: {', '.join(chosen)}" + ("; catching up the pilot" if pilot else ""))
                bench.run_prompts(pilot, only=chosen)
        if pilot_record:
            progress(f"after the pilot: {pilot_record}")
        deadline = STARTED + st.args.time_budget if st.args.time_budget > 0 else None
        ran = len(pilot) + bench.run_prompts(range(len(pilot), len(st.prompts)), deadline=deadline)
        st.prompts = st.prompts[:ran]  # every variant ran the same first prompts; the report covers those
        profiles = {
            name: profile
            for name, runner in bench.runners.items()
            if isinstance(runner, services.SpecpipeVariant)
            and (profile := services.cost_profile(runner.coordinator.log_path)) is not None
        }
    runs = bench.ordered_runs(st.variants)
    for run in runs:
        progress(f"{run.variant:<22} {run.mode:<6} " + (run.error or f"{rate(run):8.1f} tok/s"))
    return runs, round_trips, profiles, pilot_record


def run_all(args: argparse.Namespace, out_dir: Path) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    st = setup(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    lengths = [len(p.token_ids) for p in st.prompts]
    planned = len(st.prompts)
    context = args.cost_context or int(statistics.mean(lengths)) + args.max_new_tokens // 2
    max_k = max([args.max_speculative_tokens, *st.fixed_ks])
    costs = inprocess.measure_costs(
        st.pair, st.prompts[0].token_ids, context, max_k, args.cost_runs, int(statistics.mean(lengths))
    )
    progress(
        f"costs at {context} cached tokens: target {costs.target_ms:.3f} ms, draft {costs.draft_ms:.3f} ms "
        f"(c = {costs.c:.3f}; lean forward c = {costs.c_of('specpipe'):.3f}), v_4 = {costs.v(4):.2f}; "
        f"prefill of {costs.prefill_tokens} tokens: target {costs.target_prefill_ms:.1f} ms"
    )
    if args.static_kv_slots:
        static = inprocess.measure_static_costs(
            st.pair, st.prompts[0].token_ids, context, max_k, args.cost_runs, int(statistics.mean(lengths))
        )
        costs = dataclasses.replace(costs, static=static)
        progress(
            f"static-slot costs: target {static.target_ms:.3f} ms, c = {static.c:.3f}, "
            f"v_4 = {static.v(4):.2f}"
        )
    runs, round_trips, profiles, pilot = run_variants(st, out_dir)
    rows = [report.metrics(run, runs, costs) for run in runs]
    baselines = {m.name: (b.variant if (b := report.best_baseline(runs, m.name)) else None) for m in st.modes}
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": None,  # filled in by main()
            "machine": machine(args.device, args.dtype, args.static_kv_slots),
            "target_model": str(st.target_dir),
            "draft_model": str(st.draft_dir),
            "num_prompts": len(st.prompts),
            "max_new_tokens": args.max_new_tokens,
            "modes": {
                m.name: {
                    "temperature": m.temperature,
                    "top_p": m.top_p,
                    "seeds": f"{m.seed_base} + prompt index",
                }
                for m in st.modes
            },
            "prompt_source": st.prompt_source,
            "prompts": [{"source": p.source, "tokens": len(p.token_ids)} for p in st.prompts],
            "fixed_k": st.fixed_ks,
            "pipelined_k": args.pipelined_k,
            "method": "interleaved: prompt by prompt, every variant and mode per prompt, rotating order",
            "pilot": pilot,
            "max_speculative_tokens": args.max_speculative_tokens,
            # Cost profiling: the draft worker's greedy drafts were steered to this acceptance (None: off).
            "controlled_acceptance": args.controlled_acceptance,
            "baseline": baselines,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_time_s": round(time.perf_counter() - started, 1),
            # Set when the time budget stopped the run before every prompt had run.
            "time_budget": (
                {"seconds": args.time_budget, "prompts_run": len(st.prompts), "prompts_planned": planned}
                if len(st.prompts) < planned
                else None
            ),
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


def mode_label(mode: str, sampling: dict[str, object]) -> str:
    """`sample (temperature 0.8, top-p 0.9)`; a greedy mode is its name."""
    if mode == GREEDY or "temperature" not in sampling:
        return mode
    knobs = f"temperature {sampling['temperature']}"
    top_p = float(sampling.get("top_p", 1.0))  # type: ignore[arg-type]
    return f"{mode} ({knobs}, top-p {top_p})" if top_p < 1.0 else f"{mode} ({knobs})"


def summary(payload: dict[str, object]) -> str:
    meta: dict = payload["meta"]  # type: ignore[assignment]
    rows: list = payload["results"]  # type: ignore[assignment]
    costs: dict = payload["costs"]  # type: ignore[assignment]
    parts = [
        f"specpipe latency benchmark, {meta['date']}, {meta['machine']['description']}",
        f"target {meta['target_model']}, draft {meta['draft_model']}; {meta['num_prompts']} prompts x "
        f"{meta['max_new_tokens']} new tokens, batch 1"
        + (
            f"; specpipe's draft steered to acceptance {meta['controlled_acceptance']} (cost profiling)"
            if meta.get("controlled_acceptance") is not None
            else ""
        ),
        f"costs at {costs['context_tokens']} cached tokens (median of {costs['runs']}): target "
        f"{costs['target_ms']:.3f} ms, draft {costs['draft_ms']:.3f} ms, c = {costs['c']:.3f} (hf); "
        f"draft lean forward {costs.get('lean_draft_ms') or 0:.3f} ms, "
        f"c = {costs.get('c_specpipe', costs['c']):.3f} (specpipe), "
        f"v_k (k=0..6) = {', '.join(f'{v:.2f}' for v in costs['v_k'][:7])}",
    ]
    if costs.get("prefill_tokens"):
        parts.append(
            f"prefill of {costs['prefill_tokens']} tokens (the prompts' mean): target "
            f"{costs['target_prefill_ms']:.1f} ms, draft {costs['draft_prefill_ms']:.1f} ms (hf), "
            f"lean {costs.get('lean_draft_prefill_ms') or 0:.1f} ms (specpipe)"
        )
    if static := costs.get("static"):
        parts.append(
            f"through the workers' static KV slots (the costs of specpipe and plain-static): target "
            f"{static['target_ms']:.3f} ms, draft {static['draft_ms']:.3f} ms, c = {static['c']:.3f}, "
            f"v_k (k=0..6) = {', '.join(f'{v:.2f}' for v in static['v_k'][:7])}; prefill target "
            f"{static['target_prefill_ms']:.1f} ms, draft {static['draft_prefill_ms']:.1f} ms"
        )
    pilot = dict(meta.get("pilot") or {})
    method = "variants interleaved prompt by prompt (rotating order)"
    if pilot:
        chosen = []
        if "best_fixed_k" in pilot:
            names = ", ".join(pilot["pipelined"]) or "none"
            best = pilot["best_fixed_k"]
            chosen.append(f"pipelining for {'every fixed k' if best is None else f'k = {best}'} ({names})")
        if "plain_2t_vs_plain_1t" in pilot:
            verdict = "kept" if pilot["plain_2t_kept"] else "stopped"
            chosen.append(f"plain-2t at {pilot['plain_2t_vs_plain_1t']:.0%} of plain-1t: {verdict}")
        method += f"; after {pilot['prompts']} pilot prompt(s): {'; '.join(chosen) or 'nothing to decide'}"
    budget = meta.get("time_budget")
    if budget:
        seconds, ran, planned = budget["seconds"], budget["prompts_run"], budget["prompts_planned"]
        method += f"; the {seconds:.0f} s time budget stopped the run after {ran} of {planned} prompts"
    parts.append(f"{method}; measured in {meta['wall_time_s']:.0f} s")
    if payload.get("round_trip_probes"):
        parts.append(f"loopback round trips: {payload['round_trip_probes']}")
    profiles = list(dict(payload.get("coordinator_cost_profiles") or {}).values())
    if profiles:
        medians = {key: round(statistics.median(p[key] for p in profiles), 3) for key in profiles[0]}
        parts.append(f"coordinators' start-up cost profiles (median of {len(profiles)}): {medians}")
    for mode, baseline in meta["baseline"].items():
        parts.append("")
        parts.append(f"[{mode_label(mode, meta.get('modes', {}).get(mode, {}))}] baseline: {baseline}")
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
            parts.append(report.targets_line(mode, checks))
    return "\n".join(parts)


def default_out_dir() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(tempfile.gettempdir()) / "specpipe-bench" / stamp


def main(argv: Sequence[str] | None = None) -> int:
    global STARTED
    STARTED = time.perf_counter()
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
    no_chart = report.chart_unavailable()
    if no_chart:
        logger.warning("%s", no_chart)
    payload = run_all(args, out_dir)
    meta: dict = payload["meta"]  # type: ignore[assignment]
    meta["command"] = " ".join(["specpipe", "bench", "latency", *argv])
    meta["total_wall_time_s"] = round(elapsed_s(), 1)  # everything but writing the files
    text = summary(payload)
    print(text, flush=True)
    report.write_json(out_dir / "latency.json", payload)
    written = [out_dir / "latency.json", out_dir / "latency.txt"]
    if no_chart:
        print(f"no chart: {no_chart}", flush=True)
    else:
        report.write_chart(
            out_dir / "latency.png",
            payload["results"],
            list(meta["modes"]),  # type: ignore[arg-type]
            f"specpipe latency, batch 1, {meta['num_prompts']} prompts x {meta['max_new_tokens']} tokens, "
            f"{meta['machine']['description']}",
        )
        written.append(out_dir / "latency.png")
    (out_dir / "latency.txt").write_text(text + "\n", encoding="utf-8")
    print(f"results: {', '.join(map(str, written))}", flush=True)
    total = elapsed_s()
    print(f"total wall time: {total:.0f} s ({total / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
