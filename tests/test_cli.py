"""The main job: `specpipe serve` with no flags runs everything; `specpipe generate` streams from it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from specpipe.launcher import PipelineConfig, free_port, health_status


def test_serve_with_no_flags_then_generate(tmp_path: Path) -> None:
    env = {**os.environ, "SPECPIPE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    port, http_port = free_port(), free_port()
    # No flags but the ports, so this test does not collide with a developer's running server on 50051/8000.
    serve = subprocess.Popen(
        [sys.executable, "-m", "specpipe", "serve", "--port", str(port), "--http-port", str(http_port),
         "--threads", "1", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        deadline = time.monotonic() + 180
        banner = ""
        while time.monotonic() < deadline and "specpipe serving on" not in banner:
            line = serve.stdout.readline()
            if not line and serve.poll() is not None:
                break
            banner = line
        assert f"specpipe serving on 127.0.0.1:{port}" in banner, banner
        out = subprocess.run(
            [sys.executable, "-m", "specpipe", "generate", "def fibonacci(n):", "--addr", f"127.0.0.1:{port}",
             "--max-new-tokens", "16"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("def fibonacci(n):")
        stats = re.search(
            r"tokens=(\d+) .*target passes=(\d+) .*draft tokens=(\d+) accepted=(\d+)", out.stderr
        )
        assert stats, out.stderr
        assert int(stats.group(1)) == 16
        with_logprobs = subprocess.run(
            [sys.executable, "-m", "specpipe", "generate", "def fibonacci(n):", "--addr", f"127.0.0.1:{port}",
             "--max-new-tokens", "4", "--logprobs", "2", "--prompt-logprobs", "1"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert with_logprobs.returncode == 0, with_logprobs.stderr
        _, prompt_part, generated_part = re.split(r"^(?:prompt|generated tokens') log-probs:$",
                                                  with_logprobs.stdout, flags=re.MULTILINE)  # fmt: skip
        lines = [line for line in generated_part.splitlines() if " logprob " in line]
        assert len(lines) == 4 and all(len(line.split()) == 7 for line in lines), with_logprobs.stdout
        lines = [line for line in prompt_part.splitlines() if " logprob " in line]
        assert len(lines) >= 2 and all(len(line.split()) == 6 for line in lines), with_logprobs.stdout
        assert (
            serve.stdout.readline().strip()
            == f"specpipe OpenAI-compatible API on http://127.0.0.1:{http_port}/v1"
        )
        http_request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/completions",
            data=json.dumps({"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(http_request, timeout=60) as response:
            completion = json.loads(response.read())
        assert out.stdout.startswith("def fibonacci(n):" + completion["choices"][0]["text"])
        two = subprocess.run(
            [sys.executable, "-m", "specpipe", "generate", "def f(x):", "--addr", f"127.0.0.1:{port}",
             "--max-new-tokens", "8", "-n", "2", "--temperature", "1.0",
             "--choice", " yes", "--choice", " no"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert two.returncode == 0, two.stderr
        completions = re.findall(r"^--- completion (\d) ---\ndef f\(x\):( yes| no)$", two.stdout, re.M)
        assert [index for index, _ in completions] == ["0", "1"], two.stdout
        assert len(set(re.findall(r"\[session (\w+)\]", two.stderr))) == 2, two.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "specpipe", "generate", "x", "--addr", f"127.0.0.1:{port}",
             "--top-p", "2"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0
    # Every component stopped with it (no orphaned coordinator, workers or Redis left behind).
    assert health_status(f"127.0.0.1:{port}") == -1
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "logs")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_embedded_serve_passes_the_speculation_switches_to_its_coordinator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`specpipe serve --no-pipelining` (and the other on/off flags) reach the coordinator it starts."""
    import specpipe.launcher
    from specpipe.cli import main

    started: list[list[str]] = []
    monkeypatch.setattr(
        specpipe.launcher, "run_pipeline", lambda config, extra: started.append(list(extra)) or 0
    )
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    assert {"--adaptive-k", "--pipelining", "--chaining", "--delegation"} <= set(started[-1])
    assert main(["serve", "--no-delegation", "--log-dir", str(tmp_path)]) == 0
    assert "--no-delegation" in started[-1]
    assert (
        main(["serve", "--no-adaptive-k", "--no-pipelining", "--no-chaining", "--log-dir", str(tmp_path)])
        == 0
    )
    assert {"--no-adaptive-k", "--no-pipelining", "--no-chaining"} <= set(started[-1])


def test_embedded_serve_serves_every_components_metrics_on_consecutive_ports(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    import specpipe.launcher
    from specpipe.cli import main

    configs = embedded_configs
    for ports in ([], ["--metrics-port", "9400"], ["--metrics-port", "0"]):
        assert main(["serve", *ports, "--log-dir", str(tmp_path)]) == 0
    none, consecutive, free = configs
    assert none.metrics_args("coordinator") == []
    assert "--metrics-port" not in specpipe.launcher.draft_worker_args(none, 1234)
    assert "--metrics-port" not in specpipe.launcher.target_worker_args(none, 1234)
    assert consecutive.metrics_args("coordinator") == ["--metrics-port", "9400"]
    draft_args = specpipe.launcher.draft_worker_args(consecutive, 1234)
    target_args = specpipe.launcher.target_worker_args(consecutive, 1234)
    assert draft_args[draft_args.index("--metrics-port") + 1] == "9401"
    assert target_args[target_args.index("--metrics-port") + 1] == "9402"
    assert {free.metrics_args(name)[1] for name in ("coordinator", "draft", "target")} == {"0"}
    with pytest.raises(ValueError, match="metrics_port"):
        specpipe.launcher.PipelineConfig("t", "d", metrics_port=65534)


def test_embedded_serve_serves_the_http_api_on_8000_unless_told(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    from specpipe.cli import main

    for ports in ([], ["--http-port", "-1"], ["--http-port", "9000"]):
        assert main(["serve", *ports, "--log-dir", str(tmp_path)]) == 0
    assert [config.http_port for config in embedded_configs] == [8000, -1, 9000]
    assert main(["serve", "--http-port", "70000", "--log-dir", str(tmp_path)]) == 2
    assert main(["serve", "--api-key-file", str(tmp_path / "missing"), "--log-dir", str(tmp_path)]) == 2


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from specpipe.cli import FlagError, api_key

    monkeypatch.setenv("SPECPIPE_API_KEY", "from-env")
    assert api_key(argparse.Namespace(api_key_file="")) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(argparse.Namespace(api_key_file=str(tmp_path / "key"))) == "from-file"
    monkeypatch.delenv("SPECPIPE_API_KEY")
    assert api_key(argparse.Namespace(api_key_file="")) == ""
    # A key asked for but empty must not leave the APIs open.
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(FlagError, match="is empty"):
        api_key(argparse.Namespace(api_key_file=str(tmp_path / "empty")))
    monkeypatch.setenv("SPECPIPE_API_KEY", " ")
    with pytest.raises(FlagError, match="set but empty"):
        api_key(argparse.Namespace(api_key_file=""))
    monkeypatch.delenv("SPECPIPE_API_KEY")

    from specpipe.client import key_metadata  # what `specpipe generate` and the clients send

    monkeypatch.setenv("SPECPIPE_API_KEY", "from-env")
    assert key_metadata(None) == (("authorization", "Bearer from-env"),)
    assert key_metadata("given") == (("authorization", "Bearer given"),) and key_metadata("") is None


def test_embedded_serve_splits_the_cores_between_its_workers_unless_told(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    import specpipe.launcher
    from specpipe.cli import embedded_worker_threads, main

    assert [embedded_worker_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    assert main(["serve", "--threads", "3", "--log-dir", str(tmp_path)]) == 0
    default, told = embedded_configs
    for config, threads in ((default, embedded_worker_threads()), (told, 3)):
        for args in (
            specpipe.launcher.draft_worker_args(config, 1234),
            specpipe.launcher.target_worker_args(config, 1234),
        ):
            assert args[args.index("--threads") + 1] == str(threads)


def test_embedded_serve_gives_its_target_direct_streams_unless_told_not_to(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    import specpipe.launcher
    from specpipe.cli import main
    from specpipe.config import WorkerConfig

    configs = embedded_configs
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    assert main(["serve", "--no-direct-streams", "--log-dir", str(tmp_path)]) == 0
    with_direct, without = (specpipe.launcher.target_worker_args(config, 1234) for config in configs)
    assert with_direct[-2:] == ["--direct-stream-port", "0"]
    assert "--direct-stream-port" not in without
    with pytest.raises(ValueError, match="only a target worker serves direct streams"):
        WorkerConfig(role="draft", model_path=".", direct_stream_port=0)
    with pytest.raises(ValueError, match="direct_stream_port"):
        WorkerConfig(role="target", model_path=".", direct_stream_port=70000)


def test_batching_reaches_the_workers_and_turns_the_targets_lean_forward_on(
    embedded_configs: list[PipelineConfig], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`specpipe serve --max-batch-sessions N` passes N to both workers (not to a prompt-lookup draft, which
    has no passes to batch); a batching target defaults to the lean forward (its packed passes need it), one
    that does not batch keeps transformers'."""
    import argparse

    import specpipe.launcher
    from specpipe.cli import default_lean_forward, main
    from specpipe.config import WorkerConfig

    configs = embedded_configs
    assert main(["serve", "--max-batch-sessions", "6", "--log-dir", str(tmp_path)]) == 0
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    assert (
        main(["serve", "--max-batch-sessions", "6", "--drafter", "prompt-lookup", "--log-dir", str(tmp_path)])
        == 0
    )
    batching, alone, lookup = configs
    for worker_args in (specpipe.launcher.target_worker_args, specpipe.launcher.draft_worker_args):
        args = worker_args(batching, 1234)
        assert args[args.index("--max-batch-sessions") + 1] == "6"
        assert "--max-batch-sessions" not in worker_args(alone, 1234)
    assert "--max-batch-sessions" not in specpipe.launcher.draft_worker_args(lookup, 1234)
    assert "--max-batch-sessions" in specpipe.launcher.target_worker_args(lookup, 1234)

    def lean(component: str, sessions: int) -> bool:
        return default_lean_forward(argparse.Namespace(component=component, max_batch_sessions=sessions))

    assert lean("target", 4) and lean("draft", 1) and not lean("target", 1)
    WorkerConfig(role="draft", model_path=".", max_batch_sessions=2)
    with pytest.raises(ValueError, match="has no passes to batch"):
        WorkerConfig(role="draft", model_path=".", drafter="prompt-lookup", max_batch_sessions=2)
    # Asked of a prompt-lookup draft worker directly: refused with the reason, before anything starts.
    lookup_args = ["--drafter", "prompt-lookup", "--max-batch-sessions", "2"]
    assert main(["serve", "draft", "--model", str(tmp_path), *lookup_args]) == 2
    assert "serve draft: a prompt-lookup drafter runs no model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_batch_sessions"):
        WorkerConfig(role="target", model_path=".", max_batch_sessions=0)
    with pytest.raises(ValueError, match="max_batch_sessions"):
        specpipe.launcher.PipelineConfig("t", "d", max_batch_sessions=0)


def test_serve_refuses_flags_a_component_cannot_run_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each config's ValueError (the embedded pipeline's, the coordinator's, a worker's) reaches the terminal
    as one line naming the problem, with exit status 2, before anything starts."""
    from specpipe.cli import main

    assert main(["serve", "--max-batch-sessions", "0", "--log-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "specpipe serve: max_batch_sessions must be >= 1, got 0\n"
    coordinator = ["--draft-addr", "a:1", "--target-addr", "b:2", "--redis-url", "redis://127.0.0.1:1"]
    assert main(["serve", "coordinator", *coordinator, "--max-speculative-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("specpipe serve coordinator: num_speculative_tokens must be")
    assert main(["serve", "target", "--model", str(tmp_path), "--max-batch-tokens", "0"]) == 2
    assert "specpipe serve target: max_batch_sessions and max_batch_tokens must be >= 1" in (
        capsys.readouterr().err
    )


def test_every_serve_and_generate_option_says_what_it_does() -> None:
    """`--help` is the reference a user reads first: no option of `serve` or `generate` without a line."""
    import argparse

    from specpipe.cli import add_generate_parser, add_serve_parser

    subparsers = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(subparsers)
    add_generate_parser(subparsers)
    for name, parser in subparsers.choices.items():
        silent = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert silent == [], (name, silent)


@pytest.mark.parametrize(
    "module",
    [
        "benchmarks.latency",
        "benchmarks.load",
        "benchmarks.batching",
        "benchmarks.prefix_sharing",
        "benchmarks.forward_floor",
        "benchmarks.random_pair",
    ],
)
def test_every_bench_option_says_what_it_does(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib

    parsers: list[argparse.ArgumentParser] = []

    def capture(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args([])
    silent = [a.dest for a in parsers[0]._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert silent == []


def test_generate_refuses_a_negative_count_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """protobuf refuses a negative value for an unsigned field before anything is sent: one line, exit 2."""
    from specpipe.cli import main

    assert main(["generate", "x", "--addr", "127.0.0.1:1", "--logprobs", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specpipe generate:") and len(err.strip().splitlines()) == 1


def test_the_draft_worker_may_run_on_a_device_of_its_own(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    """`specpipe serve --draft-device D` starts the draft worker on D and the target on --device."""
    import specpipe.launcher
    from specpipe.cli import main

    assert main(["serve", "--device", "cuda:0", "--draft-device", "cuda:1", "--log-dir", str(tmp_path)]) == 0
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    apart, together = embedded_configs

    def device(args: list[str]) -> str:
        return args[args.index("--device") + 1]

    assert device(specpipe.launcher.draft_worker_args(apart, 1234)) == "cuda:1"
    assert device(specpipe.launcher.target_worker_args(apart, 1234)) == "cuda:0"
    assert device(specpipe.launcher.draft_worker_args(together, 1234)) == "cpu"
    with pytest.raises(ValueError, match="prompt-lookup draft runs none"):
        specpipe.launcher.PipelineConfig("t", "d", drafter="prompt-lookup", draft_device="cuda:1")
