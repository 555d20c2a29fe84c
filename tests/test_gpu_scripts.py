"""The GPU checks' wheel list covers every dependency the services import on the lent machine.

The device image has some of the project's dependencies and cannot download the rest, so
`benchmarks/gpu_wheels.sh` names each dependency as fetched, in the image, or not needed there; a dependency
added to pyproject.toml without a place in those lists fails here rather than on the GPU machine.
"""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
WHEELS_SCRIPT = ROOT / "benchmarks" / "gpu_wheels.sh"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies, as the installed distribution's metadata has them (not the extras)."""
    parsed = [Requirement(spec) for spec in requires("specpipe") or []]
    return [requirement for requirement in parsed if "extra" not in str(requirement.marker or "")]


def project_dependencies() -> set[str]:
    return {canonical(requirement.name) for requirement in project_requirements()}


def listed_in_comment(script: str, heading: str) -> set[str]:
    """The package names after `heading` in the script's header comment, up to the next list."""
    names: list[str] = []
    lines = iter(script.splitlines())
    for line in lines:
        if heading in line:
            names += line.split(heading, 1)[1].split()
            for continuation in lines:
                text = continuation.lstrip("#").strip()
                if not continuation.startswith("#     "):
                    break
                names += text.split()
            break
    return {canonical(name) for name in names if re.fullmatch(r"[A-Za-z0-9_.-]+", name)}


def fetched(script: str) -> set[str]:
    return {canonical(name) for name in re.findall(r"([A-Za-z0-9_.-]+)==[0-9]", script)}


def test_every_dependency_is_fetched_in_the_image_or_not_needed_on_the_gpu_machine() -> None:
    script = WHEELS_SCRIPT.read_text()
    in_image = listed_in_comment(script, "(its package list, ../.library/device/KINDS.md):")
    not_needed = listed_in_comment(script, "the checks do not take):")
    placed = fetched(script) | in_image | not_needed
    assert {"grpcio", "protobuf", "outlines-core"} <= fetched(script)
    assert "torch" in in_image
    assert project_dependencies() - placed == set()


def test_fetched_pins_satisfy_the_project_ranges() -> None:
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9_.]*)", WHEELS_SCRIPT.read_text())
    pinned_versions = {canonical(name): version for name, version in pins}
    for requirement in project_requirements():
        pinned = pinned_versions.get(canonical(requirement.name))
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)
