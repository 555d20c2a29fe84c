"""specpipe through its real services: a Redis-protocol server, the draft and target workers (started once)
and one coordinator process per configuration, all on loopback; requests go through CoordinatorClient."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cpu
from benchmarks.prompts import Prompt
from benchmarks.results import Mode, VariantRun
from specpipe.client import CoordinatorClient, build_request
from specpipe.launcher import ServiceProcess, free_port, worker_args
from specpipe.store.redis_server import RedisServerProcess

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
WARMUP_TOKENS = 8
COST_PROFILE = re.compile(
    r"cost profile: draft ([\d.]+) ms/token, verify ([\d.]+) ms \+ ([\d.]+) ms/token, "
    r"overhead ([\d.]+) ms/round"
)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """One coordinator configuration; `request_k` is the request's num_speculative_tokens (None: default)."""

    variant: str
    pipelining: bool
    adaptive: bool
    k: int  # the coordinator's --num-speculative-tokens (used when not adaptive)
    request_k: int | None

    def flags(self, max_k: int) -> list[str]:
        return [
            "--pipelining" if self.pipelining else "--no-pipelining",
            "--adaptive-k" if self.adaptive else "--no-adaptive-k",
            "--num-speculative-tokens", str(self.k),
            "--max-speculative-tokens", str(max_k),
        ]  # fmt: skip

    def describe(self) -> str:
        if self.request_k == 0:
            return "specpipe services, k = 0 (plain target decoding through the services)"
        k = "adaptive k" if self.adaptive else f"k = {self.k}"
        return f"specpipe services, {k}, pipelining {'on' if self.pipelining else 'off'}"


def spec_configs(fixed_ks: Sequence[int]) -> dict[str, SpecConfig]:
    """Every specpipe variant by name: k = 0, fixed k with and without pipelining, adaptive k."""
    configs = {"specpipe-k0": SpecConfig("specpipe-k0", False, False, 0, 0)}
    for pipelining in (False, True):
        suffix = "-pipe" if pipelining else ""
        for k in fixed_ks:
            name = f"specpipe-k{k}{suffix}"
            configs[name] = SpecConfig(name, pipelining, False, k, None)
        name = f"specpipe-adaptive{suffix}"
        configs[name] = SpecConfig(name, pipelining, True, 4, None)
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
        self, target_dir: Path, draft_dir: Path, log_dir: Path, max_k: int, threads: int = 1
    ) -> None:
        self.log_dir = log_dir
        self.max_k = max_k
        self.stack = ExitStack()
        self.redis = RedisServerProcess(data_dir=str(log_dir / "redis"))
        self.draft = self._worker("draft", draft_dir, threads)
        self.target = self._worker("target", target_dir, threads)

    def _worker(self, role: str, model: Path, threads: int) -> ServiceProcess:
        port = free_port()
        args = [
            *worker_args(str(model), port, "cpu", "float32", threads),
            "--max-speculative-tokens",
            str(self.max_k),
        ]
        return ServiceProcess(role, f"127.0.0.1:{port}", args, self.log_dir / f"{role}.log")

    def __enter__(self) -> Services:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.stack.callback(self.redis.stop)
        for worker in (self.draft, self.target):
            worker.start(child_env())
            self.stack.callback(worker.stop)
        for worker in (self.draft, self.target):
            worker.wait_serving(STARTUP_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    @contextmanager
    def coordinator(self, config: SpecConfig) -> Iterator[ServiceProcess]:
        port = free_port()
        args = [
            "--port", str(port), "--draft-addr", self.draft.address, "--target-addr", self.target.address,
            "--redis-url", self.redis.url, "--worker-timeout", "60", *config.flags(self.max_k),
        ]  # fmt: skip
        log = self.log_dir / f"coordinator-{config.variant}.log"
        process = ServiceProcess("coordinator", f"127.0.0.1:{port}", args, log)
        process.start(child_env())
        try:
            process.wait_serving(STARTUP_TIMEOUT_S)
            yield process
        finally:
            process.stop()


def cost_profile(log_path: Path) -> dict[str, float] | None:
    """The coordinator's own start-up cost profile (adaptive k), parsed from its log."""
    try:
        match = COST_PROFILE.search(log_path.read_text(errors="replace"))
    except OSError:
        return None
    if match is None:
        return None
    keys = ("draft_ms_per_token", "verify_base_ms", "verify_ms_per_token", "overhead_ms_per_round")
    return {key: float(value) for key, value in zip(keys, match.groups(), strict=True)}


def run_specpipe(
    client: CoordinatorClient, config: SpecConfig, prompts: Sequence[Prompt], mode: Mode, max_new: int
) -> VariantRun:
    """One short warm-up request, then every prompt, timed from the call to the last chunk."""
    run = VariantRun(config.variant, mode.name, "specpipe", config.describe())
    run.drafted = run.accepted = 0
    target_ns = draft_ns = 0

    def request(i: int, n: int):  # -> coordinator_pb2.GenerateRequest
        return build_request(
            list(prompts[i].token_ids),
            n,
            temperature=mode.temperature,
            seed=mode.seed(i),
            num_speculative_tokens=config.request_k,
        )

    client.generate(request(0, WARMUP_TOKENS), REQUEST_TIMEOUT_S)
    before = cpu.sample()
    for i in range(len(prompts)):
        req = request(i, max_new)
        started = time.perf_counter()
        result = client.generate(req, REQUEST_TIMEOUT_S)
        run.wall_s += time.perf_counter() - started
        run.outputs.append(result.token_ids)
        usage = result.usage
        if usage is None:
            raise RuntimeError(f"{config.variant}: the stream ended without usage")
        run.target_passes += usage.target_passes
        run.drafted += usage.draft_tokens
        run.accepted += usage.accepted_tokens
        target_ns += usage.target_forward_ns
        draft_ns += usage.draft_forward_ns
    run.background = cpu.background(before, cpu.sample())
    run.target_forward_s = target_ns / 1e9
    run.draft_forward_s = draft_ns / 1e9
    return run
