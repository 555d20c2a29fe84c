"""The committed generated code equals a fresh regeneration from proto/ (CI fails when it is stale)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "generate_protos.py"), "--out", str(tmp_path)], check=True
    )
    fresh = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / "specpipe" / "v1").iterdir()
        if p.is_file()
    }
    committed_dir = REPO_ROOT / "specpipe" / "v1"
    committed = {p.relative_to(REPO_ROOT): p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run tools/generate_protos.py"
    stale = [str(name) for name, content in fresh.items() if committed[name] != content]
    assert not stale, f"stale generated code: {stale}; run python tools/generate_protos.py"
