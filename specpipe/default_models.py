"""Where `specpipe serve` finds its models when none are named."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_PAIR_DIR = Path(__file__).resolve().parent / "assets" / "demo-pair"


def cache_dir() -> Path:
    return Path(os.environ.get("SPECPIPE_CACHE_DIR", Path.home() / ".cache" / "specpipe"))


def shipped_demo_pair() -> tuple[Path, Path] | None:
    """The trained pair installed with the package (see specpipe/assets/demo-pair/README.md), if present."""
    target, draft = DEMO_PAIR_DIR / "target", DEMO_PAIR_DIR / "draft"
    if (target / "config.json").is_file() and (draft / "config.json").is_file():
        return target, draft
    return None


def default_model_dirs() -> tuple[Path, Path]:
    """(target_dir, draft_dir): the shipped demo pair, else a small random pair built locally on first use."""
    shipped = shipped_demo_pair()
    if shipped is not None:
        return shipped
    from specpipe.models.tiny_pair import build_tiny_pair

    return build_tiny_pair(cache_dir() / "tiny-pair")
