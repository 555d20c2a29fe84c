"""Tokenizer identity and transport: a fingerprint to compare workers, and the files to rebuild it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over what decides token ids: the vocabulary with merges and the special tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model_state = json.loads(backend.to_str())["model"]
        digest.update(json.dumps(model_state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {"all_special_tokens": list(tokenizer.all_special_tokens), "eos": tokenizer.eos_token_id}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def tokenizer_to_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="specpipe-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes], **kwargs: Any) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="specpipe-tok-") as tmp:
        for name, content in files.items():
            if Path(name).name != name:  # never write outside the temporary directory
                raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_bytes(content)
        return AutoTokenizer.from_pretrained(tmp, **kwargs)
