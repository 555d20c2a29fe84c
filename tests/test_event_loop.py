"""The services' event loop choice (specpipe/rpc/event_loop.py) and its flag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from specpipe.launcher import PipelineConfig
from specpipe.rpc.event_loop import resolve, run_event_loop, uvloop_available

needs_uvloop = pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed")


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    assert resolve("asyncio") == "asyncio"
    assert run_event_loop(loop_module(), "asyncio").startswith("asyncio")


@needs_uvloop
def test_auto_is_uvloop_where_installed() -> None:
    assert resolve("auto") == "uvloop"
    assert run_event_loop(loop_module()).startswith("uvloop")
    assert run_event_loop(loop_module(), "uvloop").startswith("uvloop")


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="event loop must be one of"):
        resolve("trio")


def test_embedded_serve_runs_every_component_on_the_chosen_loop(
    embedded_configs: list[PipelineConfig], tmp_path: Path
) -> None:
    import specpipe.launcher
    from specpipe.cli import main

    configs = embedded_configs
    assert main(["serve", "--log-dir", str(tmp_path)]) == 0
    assert main(["serve", "--event-loop", "asyncio", "--log-dir", str(tmp_path)]) == 0
    default, chosen = configs
    for config, loop in ((default, "auto"), (chosen, "asyncio")):
        for args in (
            specpipe.launcher.draft_worker_args(config, 1234),
            specpipe.launcher.target_worker_args(config, 1234),
            config.component_args("coordinator"),
        ):
            assert args[args.index("--event-loop") + 1] == loop
    with pytest.raises(ValueError, match="event_loop"):
        specpipe.launcher.PipelineConfig("t", "d", event_loop="trio")


def test_serve_refuses_uvloop_where_it_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import specpipe.rpc.event_loop
    from specpipe.cli import main

    monkeypatch.setattr(specpipe.rpc.event_loop, "uvloop_available", lambda: False)
    assert main(["serve", "target", "--model", str(tmp_path), "--event-loop", "uvloop"]) == 2
    assert "uvloop package is not installed" in capsys.readouterr().err
    assert specpipe.rpc.event_loop.resolve("auto") == "asyncio"
