"""Where `specpipe serve` finds its models when none are named."""

from __future__ import annotations

import os
from pathlib import Path

from specpipe.models.tiny_pair import build_tiny_pair


def cache_dir() -> Path:
    return Path(os.environ.get("SPECPIPE_CACHE_DIR", Path.home() / ".cache" / "specpipe"))


def default_model_dirs() -> tuple[Path, Path]:
    """(target_dir, draft_dir): a small local pair, built on first use (a few seconds, no network)."""
    return build_tiny_pair(cache_dir() / "tiny-pair")
