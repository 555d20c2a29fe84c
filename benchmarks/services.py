"""specpipe through its real services: a Redis-protocol server, the draft and target workers (started once)
and one coordinator process per configuration, all on loopback; requests go through CoordinatorClient."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cpu
from benchmarks.prompts import Prompt
from benchmarks.results import Mode, VariantRun
from specpipe.client import CoordinatorClient, build_request
from specpipe.launcher import ServiceProcess, free_port, stop_all, worker_args
from specpipe.store.redis_server import RedisServerProcess
from specpipe.v1 import coordinator_pb2

REPO = Path(__file__).resolve().parent.parent
LOOKUP_VARIANT = "specpipe-lookup"
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
WARMUP_TOKENS = 8
UNCHAINED_VARIANT = "specpipe-pipe-nochain"  # adaptive k, pipelined, not chained
UNDELEGATED_VARIANT = "specpipe-pipe-nodeleg"  # adaptive k, pipelined, chained, rounds on the coordinator
GRPC_STREAM_VARIANT = "specpipe-pipe-grpc"  # the default configuration, delegated rounds over gRPC streams
# Adaptive k by Hugging Face's +2/-1 rule instead of the cost model, without and with pipelining.
HEURISTIC_VARIANTS = ("specpipe-heuristic", "specpipe-heuristic-pipe")
# Run only when --variants names them.
OPT_IN_VARIANTS = frozenset(
    {UNCHAINED_VARIANT, UNDELEGATED_VARIANT, GRPC_STREAM_VARIANT, *HEURISTIC_VARIANTS}
)
COST_PROFILE = re.compile(
    r"cost profile: draft ([\d.]+) ms/token, verify ([\d.]+) ms \+ ([\d.]+) ms/token, "
    r"overhead ([\d.]+) ms/round(?: \(c = [\d.]+\), draft call ([\d.]+) ms)?"
)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """One coordinator configuration; `request_k` is the request's num_speculative_tokens (None: default)."""

    variant: str
    pipelining: bool
    adaptive: bool
    k: int  # the coordinator's --num-speculative-tokens (used when not adaptive)
    request_k: int | None
    drafter: str = "model"  # the draft worker it pairs with: the draft model's, or the prompt-lookup one
    chaining: bool = True  # with pipelining: next block queued on the target before the verdict
    delegation: bool = True  # the rounds run on the draft worker (specpipe/speculation/delegation.py)
    # Its target serves direct streams (specpipe/rpc/direct_frames.py); else a second target worker without.
    direct_streams: bool = True
    heuristic: bool = False  # adaptive k by Hugging Face's +2/-1 rule (--adaptive-k-rule hf-heuristic)

    def flags(self, max_k: int) -> list[str]:
        return [
            "--pipelining" if self.pipelining else "--no-pipelining",
            "--chaining" if self.chaining else "--no-chaining",
            "--delegation" if self.delegation else "--no-delegation",
            "--adaptive-k" if self.adaptive else "--no-adaptive-k",
            "--num-speculative-tokens", str(self.k),
            "--max-speculative-tokens", str(max_k),
            "--adaptive-k-rule", "hf-heuristic" if self.heuristic else "cost",
        ]  # fmt: skip

    def describe(self) -> str:
        if self.request_k == 0:
            return "specpipe services, k = 0 (plain target decoding through the services)"
        k = "adaptive k" if self.adaptive else f"k = {self.k}"
        k += " by Hugging Face's +2/-1 rule" if self.heuristic else ""
        drafter = ", prompt lookup (no draft model)" if self.drafter == "prompt-lookup" else ""
        chaining = "" if self.chaining or not self.pipelining else " (not chained)"
        delegated = "" if self.delegation else ", rounds on the coordinator (not delegated)"
        delegated += "" if self.direct_streams else ", target streams over gRPC (no direct streams)"
        pipelining = "on" if self.pipelining else "off"
        return f"specpipe services{drafter}, {k}, pipelining {pipelining}{chaining}{delegated}"


def spec_configs(fixed_ks: Sequence[int]) -> dict[str, SpecConfig]:
    """Every specpipe variant by name: k = 0, fixed k with and without pipelining, adaptive k, and adaptive k
    with a prompt-lookup draft worker."""
    configs = {"specpipe-k0": SpecConfig("specpipe-k0", False, False, 0, 0)}
    for pipelining in (False, True):
        suffix = "-pipe" if pipelining else ""
        for k in fixed_ks:
            name = f"specpipe-k{k}{suffix}"
            configs[name] = SpecConfig(name, pipelining, False, k, None)
        name = f"specpipe-adaptive{suffix}"
        configs[name] = SpecConfig(name, pipelining, True, 4, None)
    # Prompt lookup drafts in microseconds: nothing to hide behind the verify, so no pipelining.
    configs[LOOKUP_VARIANT] = SpecConfig(LOOKUP_VARIANT, False, True, 4, None, drafter="prompt-lookup")
    # Opt-in (--variants): what chaining adds to pipelining.
    configs[UNCHAINED_VARIANT] = SpecConfig(UNCHAINED_VARIANT, True, True, 4, None, chaining=False)
    # Opt-in: what delegation adds (the rounds run on the coordinator, every block and verdict through it).
    configs[UNDELEGATED_VARIANT] = SpecConfig(UNDELEGATED_VARIANT, True, True, 4, None, delegation=False)
    # Opt-in: what direct streams add (a target worker without them serves this variant).
    configs[GRPC_STREAM_VARIANT] = SpecConfig(GRPC_STREAM_VARIANT, True, True, 4, None, direct_streams=False)
    # Opt-in: the k schedule of Hugging Face's assisted generation in the same system, against the cost model.
    for name in HEURISTIC_VARIANTS:
        configs[name] = SpecConfig(name, name.endswith("-pipe"), True, 4, None, heuristic=True)
    return configs


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        # Idle OpenMP threads would otherwise spin on the cores the other processes need.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
    }


class Services:
    """The session store and both workers, started once; coordinators come and go per configuration."""

    def __init__(
        self,
        target_dir: Path,
        draft_dir: Path,
        log_dir: Path,
        max_k: int,
        threads: int = 1,
        prompt_lookup: bool = False,
        grpc_target: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        static_kv_slots: int = 0,
        draft_extra: Sequence[str] = (),
    ) -> None:
        self.log_dir = log_dir
        self.max_k = max_k
        self.device, self.dtype = device, dtype
        # The model workers' KV slots and CUDA graphs (specpipe/runtime/graphed_forward.py); 0 = off.
        slots = ["--static-kv-slots", str(static_kv_slots)] if static_kv_slots else []
        self.stack = ExitStack()
        self.redis = RedisServerProcess(data_dir=str(log_dir / "redis"))
        self.draft = self._worker("draft", draft_dir, threads, extra=[*slots, *draft_extra])
        direct = ["--direct-stream-port", "0"]  # as `specpipe serve` runs its target
        self.target = self._worker("target", target_dir, threads, extra=[*direct, *slots])
        # A second target worker without direct streams, for the variant that measures what they add.
        self.grpc_target = (
            self._worker("target", target_dir, threads, "target-grpc", slots) if grpc_target else None
        )
        # A second draft worker without a model, for the prompt-lookup variant (the target's tokenizer).
        self.lookup_draft = (
            self._worker("draft", target_dir, threads, "draft-lookup", ["--drafter", "prompt-lookup"])
            if prompt_lookup
            else None
        )
        self.coordinators: list[ServiceProcess] = []
        self.variants: list[SpecpipeVariant] = []

    def _worker(
        self, role: str, model: Path, threads: int, log_name: str = "", extra: Sequence[str] = ()
    ) -> ServiceProcess:
        port = free_port()
        args = [
            *worker_args(str(model), port, self.device, self.dtype, threads),
            "--max-speculative-tokens",
            str(self.max_k),
            # Every variant sends the same prompts to these workers: without this, later variants would copy
            # the prompt's keys and values from an earlier one's session and skip the prefill that the
            # baselines (and the first variant) pay.
            "--no-prefix-sharing",
            *extra,
        ]
        log = self.log_dir / f"{log_name or role}.log"
        return ServiceProcess(role, f"127.0.0.1:{port}", args, log)

    @property
    def workers(self) -> list[ServiceProcess]:
        optional = [worker for worker in (self.lookup_draft, self.grpc_target) if worker is not None]
        return [self.draft, self.target, *optional]

    def __enter__(self) -> Services:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Stopped in reverse: clients, coordinators (all at once), workers (both at once), the store.
        self.stack.callback(self.redis.stop)
        self.stack.callback(stop_all, self.workers)
        self.stack.callback(stop_all, self.coordinators)
        self.stack.callback(lambda: [variant.close() for variant in self.variants])
        try:
            self.redis.start()
            for worker in self.workers:
                worker.start(child_env())
            for worker in self.workers:
                worker.wait_serving(STARTUP_TIMEOUT_S)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def draft_for(self, config: SpecConfig) -> ServiceProcess:
        if config.drafter == "prompt-lookup":
            if self.lookup_draft is None:
                raise RuntimeError(f"{config.variant}: the services have no prompt-lookup draft worker")
            return self.lookup_draft
        return self.draft

    def target_for(self, config: SpecConfig) -> ServiceProcess:
        if not config.direct_streams:
            if self.grpc_target is None:
                raise RuntimeError(f"{config.variant}: the services have no target without direct streams")
            return self.grpc_target
        return self.target

    def start_variant(self, config: SpecConfig, prompts: Sequence[Prompt], max_new: int) -> SpecpipeVariant:
        """A coordinator for `config`, SERVING, and a client to it; both stop with the services."""
        port = free_port()
        args = [
            "--port", str(port), "--draft-addr", self.draft_for(config).address,
            "--target-addr", self.target_for(config).address,
            "--redis-url", self.redis.url, "--worker-timeout", "60", *config.flags(self.max_k),
        ]  # fmt: skip
        log = self.log_dir / f"coordinator-{config.variant}.log"
        process = ServiceProcess("coordinator", f"127.0.0.1:{port}", args, log)
        self.coordinators.append(process)
        process.start(child_env())
        try:
            process.wait_serving(STARTUP_TIMEOUT_S)
        except BaseException:
            process.stop()  # now: a coordinator stuck starting must not load the machine during the run
            raise
        variant = SpecpipeVariant(config, process, prompts, max_new)
        self.variants.append(variant)
        return variant


def cost_profile(log_path: Path) -> dict[str, float] | None:
    """The coordinator's own start-up cost profile (adaptive k), parsed from its log."""
    try:
        match = COST_PROFILE.search(log_path.read_text(errors="replace"))
    except OSError:
        return None
    if match is None:
        return None
    keys = (
        "draft_ms_per_token", "verify_base_ms", "verify_ms_per_token",
        "overhead_ms_per_round", "draft_call_ms",
    )  # fmt: skip
    return {key: float(value) for key, value in zip(keys, match.groups(), strict=True) if value is not None}


class SpecpipeVariant:
    """One specpipe configuration: its own coordinator process and client, run prompt by prompt."""

    def __init__(
        self, config: SpecConfig, coordinator: ServiceProcess, prompts: Sequence[Prompt], max_new: int
    ) -> None:
        self.variant = config.variant
        self.config = config
        self.coordinator = coordinator
        self.prompts = prompts
        self.max_new = max_new
        self.client = CoordinatorClient(coordinator.address)

    def new_run(self, mode: Mode) -> VariantRun:
        run = VariantRun(self.variant, mode.name, "specpipe", self.config.describe())
        run.drafted = run.accepted = 0
        run.pipelined = self.config.pipelining
        run.drafter = self.config.drafter
        return run

    def _request(self, i: int, n: int, mode: Mode) -> coordinator_pb2.GenerateRequest:
        return build_request(
            list(self.prompts[i].token_ids), n, temperature=mode.temperature, top_p=mode.top_p,
            seed=mode.seed(i),
            num_speculative_tokens=self.config.request_k,
        )  # fmt: skip

    def warmup(self, mode: Mode) -> str:
        self.client.generate(self._request(0, WARMUP_TOKENS, mode), REQUEST_TIMEOUT_S)
        return ""

    def run_prompt(self, i: int, mode: Mode, run: VariantRun) -> None:
        """One request, timed from the call to the last chunk; its usage comes from the final chunk."""
        request = self._request(i, self.max_new, mode)
        result = cpu.timed(run, lambda: self.client.generate(request, REQUEST_TIMEOUT_S))
        usage = result.usage
        if usage is None:
            raise RuntimeError(f"{self.variant}: the stream ended without usage")
        run.outputs.append(result.token_ids)
        run.target_passes += usage.target_passes
        run.drafted = (run.drafted or 0) + usage.draft_tokens
        run.accepted = (run.accepted or 0) + usage.accepted_tokens
        run.target_forward_s += usage.target_forward_ns / 1e9
        run.draft_forward_s += usage.draft_forward_ns / 1e9

    def close(self) -> None:
        self.client.close()
