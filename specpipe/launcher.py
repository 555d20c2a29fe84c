"""`specpipe serve` with no component: the whole pipeline on this machine, each part its own process.

Starts a Redis-protocol server (unless --redis-url names one), a draft worker, a target worker and the
coordinator, waits for each to report SERVING over grpc.health.v1, and stops them all together.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specpipe.rpc.event_loop import EVENT_LOOPS
from specpipe.store.redis_server import RedisServerProcess

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def health_status(address: str, timeout_s: float = 1.0) -> int:
    """The overall grpc.health.v1 status of a server, or -1 if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return -1
        return int(reply.status)


@dataclass
class ServiceProcess:
    """One `specpipe serve <component>` child process, with its log file."""

    name: str
    address: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        command = [sys.executable, "-m", "specpipe", "serve", self.name, *self.args]
        logger.debug("starting %s: %s", self.name, " ".join(command))
        self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail()}"
                )
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name} not SERVING on {self.address} after {timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def stop_all(processes: Sequence[ServiceProcess]) -> None:
    """Stops the processes concurrently: each takes about a second to drain and exit."""
    if processes:
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda process: process.stop(), processes))


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    target_model: str
    draft_model: str
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str = ""  # empty = start an embedded Redis-protocol server
    device: str = "cpu"
    # The draft worker's device ("" = `device`): a GPU of its own (cuda:1), since a draft and a target
    # sharing one GPU from two processes take turns on it (docs/benchmarks.md, "GPU: an NVIDIA H200").
    draft_device: str = ""
    dtype: str = "float32"
    num_speculative_tokens: int = 4
    torch_threads: int = 0
    # "model": the draft worker runs draft_model; "prompt-lookup": it runs model-free prompt lookup over the
    # target's tokenizer (draft_model unused).
    drafter: str = "model"
    startup_timeout_s: float = 600.0
    log_dir: str = ""  # empty = a temporary directory
    # The target serves direct streams (on a free port) for the draft's delegated rounds.
    direct_streams: bool = True
    # Prometheus metrics: the coordinator's on this port, the draft's on the next, the target's on the one
    # after (0: each on a free port, -1: none).
    metrics_port: int = -1
    # The workers' cross-session batching (1 = none; see specpipe/rpc/session_batcher.py).
    max_batch_sessions: int = 1
    # The model workers' static KV slots and CUDA graphs (0 = off; see specpipe/runtime/graphed_forward.py).
    static_kv_slots: int = 0
    cuda_graphs: bool = True
    # Every component's event loop (specpipe/rpc/event_loop.py).
    event_loop: str = "auto"
    # The workers start a new history from another session's cached prefix (specpipe/runtime/kv_cache.py).
    prefix_sharing: bool = True
    # The coordinator's OpenAI-compatible HTTP API (coordinator/openai_api): vLLM's port by default, 0 = a
    # free one, -1 = none.
    http_port: int = 8000

    def __post_init__(self) -> None:
        if self.max_batch_sessions < 1:
            raise ValueError(f"max_batch_sessions must be >= 1, got {self.max_batch_sessions}")
        if self.static_kv_slots < 0:
            raise ValueError(f"static_kv_slots must be >= 0, got {self.static_kv_slots}")
        if self.static_kv_slots and self.max_batch_sessions > 1:
            raise ValueError("static KV slots run one session per forward: they do not batch sessions")
        if not self.target_model or not self.draft_model:
            raise ValueError("target_model and draft_model are required")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65533:
            raise ValueError(
                f"metrics_port must be in [-1, 65533] (it and the next two ports), got {self.metrics_port}"
            )
        if not -1 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [-1, 65535], got {self.http_port}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {EVENT_LOOPS}, got {self.event_loop!r}")
        from specpipe.config import DRAFTERS  # here: the launcher itself needs no torch until a config exists

        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if self.draft_device and self.drafter != "model":
            raise ValueError("draft_device places a draft model: a prompt-lookup draft runs none")

    def forward_args(self) -> list[str]:
        """The model workers' batching, static KV slots and prefix sharing (a prompt-lookup draft has no
        model: none)."""
        args = ["--max-batch-sessions", str(self.max_batch_sessions)] if self.max_batch_sessions > 1 else []
        args += [] if self.prefix_sharing else ["--no-prefix-sharing"]
        if self.static_kv_slots:
            args += ["--static-kv-slots", str(self.static_kv_slots)]
            args += [] if self.cuda_graphs else ["--no-cuda-graphs"]
        return args

    def component_args(self, component: str) -> list[str]:
        """What every component is started with: its --metrics-port and the event loop."""
        return [*self.metrics_args(component), "--event-loop", self.event_loop]

    def metrics_args(self, component: str) -> list[str]:
        """A component's --metrics-port: coordinator, draft and target on consecutive ports."""
        if self.metrics_port < 0:
            return []
        offset = ("coordinator", "draft", "target").index(component)
        return ["--metrics-port", str(self.metrics_port + offset if self.metrics_port else 0)]


def worker_args(model: str, port: int, device: str, dtype: str, threads: int = 0) -> list[str]:
    return [
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--device", device, "--dtype", dtype, "--threads", str(threads),
    ]  # fmt: skip


def target_worker_args(config: PipelineConfig, port: int) -> list[str]:
    args = worker_args(config.target_model, port, config.device, config.dtype, config.torch_threads)
    args += [*config.component_args("target"), *config.forward_args()]
    return [*args, "--direct-stream-port", "0"] if config.direct_streams else args


def draft_worker_args(config: PipelineConfig, port: int) -> list[str]:
    if config.drafter == "prompt-lookup":
        args = worker_args(config.target_model, port, config.device, config.dtype, config.torch_threads)
        return [*args, *config.component_args("draft"), "--drafter", "prompt-lookup"]
    device = config.draft_device or config.device
    args = worker_args(config.draft_model, port, device, config.dtype, config.torch_threads)
    return [*args, *config.component_args("draft"), *config.forward_args()]


def run_pipeline(config: PipelineConfig, extra_coordinator_args: Sequence[str] = ()) -> int:
    """Runs until SIGINT/SIGTERM or until a component dies; returns the exit code."""
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="specpipe-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        redis_url = config.redis_url
        if not redis_url:
            redis_server = RedisServerProcess(data_dir=str(log_dir / "redis"))
            redis_server.start()
            stack.callback(redis_server.stop)
            redis_url = redis_server.url
            logger.info("session store: embedded Redis-protocol server at 127.0.0.1:%d", redis_server.port)
        draft_port, target_port = free_port(), free_port()
        draft = ServiceProcess(
            "draft",
            f"127.0.0.1:{draft_port}",
            draft_worker_args(config, draft_port),
            log_dir / "draft.log",
        )
        target = ServiceProcess(
            "target",
            f"127.0.0.1:{target_port}",
            target_worker_args(config, target_port),
            log_dir / "target.log",
        )
        coordinator = ServiceProcess(
            "coordinator",
            f"{config.host}:{config.port}",
            [
                "--host",
                config.host,
                "--port",
                str(config.port),
                "--draft-addr",
                draft.address,
                "--target-addr",
                target.address,
                "--redis-url",
                redis_url,
                "--num-speculative-tokens",
                str(config.num_speculative_tokens),
                *config.component_args("coordinator"),
                "--http-port",
                str(config.http_port),
                *extra_coordinator_args,
            ],
            log_dir / "coordinator.log",
        )
        children = [draft, target, coordinator]
        # The coordinator first (it drains its requests, which need the workers), then both workers at once.
        stack.callback(stop_all, [draft, target])
        stack.callback(coordinator.stop)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for child in children:
            child.start(env)
        try:
            for child in children:
                child.wait_serving(config.startup_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            print(f"specpipe: start-up failed: {exc}", file=sys.stderr)
            return 1
        print(
            f"specpipe serving on {coordinator.address} "
            f"(target {config.target_model}, draft {config.draft_model}; logs in {log_dir})",
            flush=True,
        )
        if config.http_port > 0:
            print(f"specpipe OpenAI-compatible API on http://{config.host}:{config.http_port}/v1", flush=True)
        if config.metrics_port > 0:
            urls = ", ".join(
                f"{name} http://{host}:{config.metrics_port + offset}/metrics"
                for offset, (name, host) in enumerate(
                    (("coordinator", config.host), ("draft", "127.0.0.1"), ("target", "127.0.0.1"))
                )
            )
            print(f"specpipe metrics: {urls}", flush=True)
        while not stop_requested:
            for child in children:
                if child.popen is not None and child.popen.poll() is not None:
                    print(f"specpipe: {child.name} exited:\n{child.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        print("specpipe: stopping", file=sys.stderr, flush=True)
    return 0
