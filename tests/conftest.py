"""Shared fixtures: a locally built model pair, a real Redis-protocol server process, real gRPC services."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from specpipe.launcher import PipelineConfig, ServiceProcess, free_port, stop_all, worker_args  # noqa: E402
from specpipe.models.tiny_pair import build_tiny_pair  # noqa: E402
from specpipe.rpc.worker_clients import TargetClient  # noqa: E402
from specpipe.store.redis_server import RedisServerProcess  # noqa: E402

# The shared pipeline's coordinator renders chat requests with it (the tiny pair's tokenizer has none).
CHAT_TEMPLATE = Path(__file__).parent / "data" / "chat_template.jinja"


@dataclass(frozen=True)
class ModelPair:
    target_dir: Path
    draft_dir: Path


@dataclass
class Pipeline:
    coordinator_addr: str
    draft: ServiceProcess
    target: ServiceProcess
    coordinator: ServiceProcess
    redis: RedisServerProcess
    pair: ModelPair
    # Prometheus ports by component ("coordinator", "draft", "target"); empty: none.
    metrics_ports: dict[str, int] = field(default_factory=dict)
    http_port: int = -1  # the coordinator's OpenAI-compatible HTTP API

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.log_tail(60)}" for p in (self.draft, self.target, self.coordinator)
        )


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    target_dir, draft_dir = build_tiny_pair(tmp_path_factory.mktemp("models") / "tiny-pair")
    return ModelPair(target_dir, draft_dir)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """For modules of small models and thousands of tiny tensor ops: intra-op threads only add
    synchronisation, and on a busy machine OpenMP spinning makes them crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    server = RedisServerProcess(data_dir=str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


def service_env() -> dict[str, str]:
    """The environment test services run with (logs unbuffered, so a failure's tail is complete)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_service(name: str, args: list[str], address: str, log_dir: Path) -> ServiceProcess:
    process = ServiceProcess(name, address, args, log_dir / f"{name}.log")
    process.start(service_env())
    return process


def worker_process(
    role: str, model_dir: Path, log_dir: Path, log_name: str = "", extra: list[str] | None = None
) -> ServiceProcess:
    """A worker on a free port, not started yet; its log is `log_name or role`.log in log_dir."""
    port = free_port()
    # One torch thread: tiny models gain nothing from more, and the 2-core machine runs 4 processes.
    args = [*worker_args(str(model_dir), port, "cpu", "float32", threads=1), *(extra or [])]
    return ServiceProcess(role, f"127.0.0.1:{port}", args, log_dir / f"{log_name or role}.log")


def start_worker(role: str, model_dir: Path, log_dir: Path, extra: list[str] | None = None) -> ServiceProcess:
    process = worker_process(role, model_dir, log_dir, extra=extra)
    process.start(service_env())
    return process


def start_coordinator(
    draft_addr: str, target_addr: str, redis_url: str, log_dir: Path, extra: list[str] | None = None
) -> ServiceProcess:
    port = free_port()
    args = [
        "--port", str(port), "--draft-addr", draft_addr, "--target-addr", target_addr,
        "--redis-url", redis_url, "--max-new-tokens-limit", "256", "--worker-timeout", "20",
        *(extra or []),
    ]  # fmt: skip
    return start_service("coordinator", args, f"127.0.0.1:{port}", log_dir)


@pytest.fixture(scope="session")
def pipeline(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """The shared pipeline: tests must not break it."""
    pipeline = start_pipeline(model_pair, redis_server, tmp_path_factory.mktemp("logs"))
    yield pipeline
    stop_pipeline(pipeline)


@pytest.fixture(scope="session")
def undelegated_coordinator(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second coordinator on the shared pipeline's workers that runs the rounds itself (--no-delegation);
    the shared one delegates them (the default). Session-scoped like the pipeline: started by the first test
    that asks for it, it stays up (idle but for health checks) until the run ends."""
    coordinator = start_coordinator(
        pipeline.draft.address,
        pipeline.target.address,
        pipeline.redis.url,
        tmp_path_factory.mktemp("undelegated"),
        extra=["--no-delegation"],
    )
    try:
        coordinator.wait_serving(120)
        yield coordinator.address
    finally:
        coordinator.stop()


@pytest.fixture(params=["delegated", "coordinator"])
def coordinator_address(request: pytest.FixtureRequest, pipeline: Pipeline) -> str:
    """A test that takes it runs twice: against the shared coordinator, whose rounds run on the draft worker
    (delegated), and against `undelegated_coordinator`, which runs them itself."""
    if request.param == "delegated":
        return pipeline.coordinator_addr
    return request.getfixturevalue("undelegated_coordinator")


def start_pipeline(
    pair: ModelPair,
    redis: RedisServerProcess,
    log_dir: Path,
    draft_model: Path | None = None,
    draft_extra: list[str] | None = None,
    target_extra: list[str] | None = None,
) -> Pipeline:
    """Draft and target workers and a coordinator, SERVING; the draft runs `draft_model` (default: the
    pair's draft) with `draft_extra` arguments, the target with `target_extra`."""
    ports = {role: free_port() for role in ("coordinator", "draft", "target")}
    draft_args = [*(draft_extra or []), "--metrics-port", str(ports["draft"])]
    draft = start_worker("draft", draft_model or pair.draft_dir, log_dir, extra=draft_args)
    # Direct streams on, as `specpipe serve` runs its target.
    target_args = ["--direct-stream-port", "0", "--metrics-port", str(ports["target"]), *(target_extra or [])]
    target = start_worker("target", pair.target_dir, log_dir, extra=target_args)
    http_port = free_port()
    coordinator_args = [
        "--metrics-port", str(ports["coordinator"]), "--chat-template", str(CHAT_TEMPLATE),
        "--http-port", str(http_port), "--tool-call-parser", "hermes",
    ]  # fmt: skip
    coordinator = start_coordinator(draft.address, target.address, redis.url, log_dir, extra=coordinator_args)
    pipeline = Pipeline(coordinator.address, draft, target, coordinator, redis, pair, ports, http_port)
    try:
        for service in (draft, target, coordinator):
            service.wait_serving(120)
    except BaseException:
        stop_pipeline(pipeline)
        raise
    return pipeline


def stop_pipeline(pipeline: Pipeline) -> None:
    stop_all([pipeline.coordinator, pipeline.target, pipeline.draft])


@pytest.fixture
def own_pipeline(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path: Path
) -> Iterator[Pipeline]:
    """A pipeline this test may break (its workers and coordinator are its own)."""
    pipeline = start_pipeline(model_pair, redis_server, tmp_path)
    yield pipeline
    stop_pipeline(pipeline)


def with_target_client(pipeline: Pipeline, test: Callable[[TargetClient], Awaitable[None]]) -> None:
    """Runs test(client) with a client of the shared pipeline's target worker, closed afterwards."""

    async def main() -> None:
        client = TargetClient(pipeline.target.address)
        try:
            await test(client)
        finally:
            await client.close()

    asyncio.run(main())


def restart(service: ServiceProcess) -> None:
    """Starts a stopped or killed service again with the same arguments (same port)."""
    service.start(service_env())
    service.wait_serving(120)


def target_holders(targets: list[ServiceProcess], session_id: str) -> list[int]:
    """Indices of the target replicas that hold a KV cache for the session (where routing sent it)."""

    async def query() -> list[int]:
        found = []
        for i, target in enumerate(targets):
            client = TargetClient(target.address)
            try:
                if (await client.stats(session_id)).session_cached:
                    found.append(i)
            finally:
                await client.close()
        return found

    return asyncio.run(query())


@pytest.fixture
def embedded_configs(monkeypatch: pytest.MonkeyPatch) -> list[PipelineConfig]:
    """The PipelineConfig of each embedded `specpipe serve` call in the test, which then starts nothing."""
    import specpipe.launcher

    configs: list[PipelineConfig] = []
    monkeypatch.setattr(specpipe.launcher, "run_pipeline", lambda config, extra: configs.append(config) or 0)
    return configs
