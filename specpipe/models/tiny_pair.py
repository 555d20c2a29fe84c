"""A small, local target/draft GPT-2 pair with one shared byte-level BPE tokenizer.

Used by the tests and, until a trained demo pair ships, as the default models of ``specpipe serve``.
Everything is built offline from Python standard-library sources: no model hub is involved.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from specpipe.models.bpe_tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)

MARKER_NAME = "tiny_pair.json"
# Bumped whenever the build recipe changes, so pairs built by an older recipe are rebuilt.
FORMAT_VERSION = 1
# Non-ASCII text so multi-byte characters occur in the corpus; it is short on purpose so that most of
# these characters stay unmerged and need several byte-level tokens each.
_NON_ASCII_LINES = (
    "naïve café — 日本語のテキスト, emoji 🙂, Ünïcödé\n",
    "Größe, façade, smörgåsbord, déjà vu, 東京, Ελληνικά, русский 🚀\n",
)
# Files that differ per machine, not per Python version: excluded so the corpus stays reproducible.
_EXCLUDED_PREFIXES = ("_sysconfigdata",)


@dataclass(frozen=True, slots=True)
class TinyPairSpec:
    """What to build: sizes, seed, and the knobs that set how often the draft agrees with the target."""

    vocab_size: int = 512
    n_positions: int = 512
    target_layers: int = 2
    draft_layers: int = 1
    n_embd: int = 64
    n_head: int = 4
    seed: int = 0
    train_steps: int = 0
    # Weight init std. GPT-2's 0.02 makes an untrained model with tied embeddings echo its input token
    # forever; a larger std lets attention/MLP outputs matter, so greedy text varies.
    init_std: float = 0.2
    # Scale of the target's later blocks' output projections: the lower it is, the closer the target is
    # to the draft (which only has the first blocks). 0.2 gives ~0.63-0.74 greedy agreement on stdlib
    # code for seeds 0-2 (0.25: ~0.58, 0.15: ~0.72-0.8).
    late_block_scale: float = 0.2
    corpus_files: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.draft_layers <= self.target_layers:
            raise ValueError("need 0 < draft_layers <= target_layers")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        if self.vocab_size < 257:
            raise ValueError("a byte-level vocabulary needs at least 257 entries")


def corpus_texts(spec: TinyPairSpec = TinyPairSpec()) -> list[str]:
    """The deterministic tokenizer/training corpus: sorted stdlib ``*.py`` files plus non-ASCII lines."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = [
        p
        for p in sorted(glob.glob(os.path.join(stdlib, "*.py")))
        if not os.path.basename(p).startswith(_EXCLUDED_PREFIXES)
    ][: spec.corpus_files]
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    texts.append("".join(_NON_ASCII_LINES))
    return texts


def train_tokenizer(
    spec: TinyPairSpec = TinyPairSpec(), texts: Sequence[str] | None = None
) -> PreTrainedTokenizerFast:
    """Trains the shared byte-level BPE tokenizer (deterministic; well under a second)."""
    if texts is None:
        texts = corpus_texts(spec)
    return train_bpe_tokenizer(texts, spec.vocab_size, spec.n_positions)


def greedy_agreement(
    target: torch.nn.Module, draft: torch.nn.Module, token_ids: Sequence[int] | torch.Tensor
) -> float:
    """Fraction of positions where target and draft argmax next tokens agree (one forward pass)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("token_ids is empty")
    with torch.no_grad():
        t = target(input_ids=ids).logits.argmax(-1)
        d = draft(input_ids=ids).logits.argmax(-1)
    return (t == d).float().mean().item()


def _config(spec: TinyPairSpec, vocab_size: int, n_layer: int, eos_id: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=n_layer,
        n_head=spec.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
        initializer_range=spec.init_std,
    )


def _train(
    model: GPT2LMHeadModel, spec: TinyPairSpec, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]
) -> None:
    """A few quick next-token steps on the corpus (off by default: ~0.1-0.3 s a step at the default size)."""
    eos = tokenizer.eos_token_id
    data: list[int] = []
    for text in texts or corpus_texts(spec):
        # The backend directly: the wrapper warns about texts longer than model_max_length.
        data += tokenizer.backend_tokenizer.encode(text).ids + [eos]
    stream = torch.tensor(data)
    seq = min(128, spec.n_positions, len(data) - 1)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(spec.train_steps):
        starts = torch.randint(0, len(data) - seq, (16,), generator=gen)
        batch = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        # Own loss rather than labels=: transformers 5 logs a warning about the config's loss_type.
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_models(
    spec: TinyPairSpec, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str] = ()
) -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """Builds (target, draft) in memory; the draft shares the target's embeddings, ln_f and first blocks."""
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        target = GPT2LMHeadModel(_config(spec, vocab, spec.target_layers, eos)).to(torch.float32)
        if spec.train_steps > 0:
            _train(target, spec, tokenizer, texts)
        draft = GPT2LMHeadModel(_config(spec, vocab, spec.draft_layers, eos)).to(torch.float32)
    with torch.no_grad():
        for block in target.transformer.h[spec.draft_layers :]:
            block.attn.c_proj.weight.mul_(spec.late_block_scale)
            block.mlp.c_proj.weight.mul_(spec.late_block_scale)
        src, dst = target.transformer, draft.transformer
        dst.wte.load_state_dict(src.wte.state_dict())
        dst.wpe.load_state_dict(src.wpe.state_dict())
        dst.ln_f.load_state_dict(src.ln_f.state_dict())
        for i in range(spec.draft_layers):
            dst.h[i].load_state_dict(src.h[i].state_dict())
    for model in (target, draft):
        model.eval()
        # Explicit pad id: generate() would otherwise warn and pick eos itself.
        model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return target, draft


def _marker(spec: TinyPairSpec, texts: Sequence[str]) -> dict[str, object]:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return {"format": FORMAT_VERSION, "spec": asdict(spec), "corpus_sha256": digest.hexdigest()}


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _is_complete(out_dir: Path, marker: dict[str, object]) -> bool:
    try:
        with open(out_dir / MARKER_NAME, encoding="utf-8") as f:
            if json.load(f) != marker:
                return False
    except (OSError, ValueError):
        return False
    return all((out_dir / sub / name).is_file() for sub in ("target", "draft") for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    # save_pretrained draws a tqdm bar per call; restore the caller's setting afterwards.
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_pair(tmp: Path, spec: TinyPairSpec, texts: Sequence[str], marker: dict[str, object]) -> None:
    tokenizer = train_tokenizer(spec, texts)
    target, draft = build_models(spec, tokenizer, texts)
    with _quiet_progress_bars():
        for name, model in (("target", target), ("draft", draft)):
            model.save_pretrained(tmp / name, safe_serialization=True)
            tokenizer.save_pretrained(tmp / name)
    # The marker is written last: its presence means the rest is complete.
    with open(tmp / MARKER_NAME, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2, sort_keys=True)


def build_tiny_pair(
    out_dir: str | os.PathLike[str], spec: TinyPairSpec = TinyPairSpec()
) -> tuple[Path, Path]:
    """Builds (or reuses) the pair under ``out_dir``; returns (out_dir/"target", out_dir/"draft").

    Both directories load with ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``. The pair is
    built in a temporary sibling directory and renamed into place, so ``out_dir`` never holds half a pair.
    ``out_dir`` belongs to this function: an existing one with other contents is refused, not replaced.
    """
    out = Path(out_dir).resolve()
    target_dir, draft_dir = out / "target", out / "draft"
    texts = corpus_texts(spec)
    marker = _marker(spec, texts)
    if _is_complete(out, marker):
        return target_dir, draft_dir
    if out.exists():
        foreign = {p.name for p in out.iterdir()} - {"target", "draft", MARKER_NAME}
        if foreign:
            raise FileExistsError(f"{out} holds files that are not a tiny pair: {sorted(foreign)}")

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _write_pair(tmp, spec, texts, marker)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(out, marker):
        # A concurrent builder with a different spec replaced ours in between.
        raise RuntimeError(f"{out} was changed while building the tiny pair")
    logger.info("built tiny pair in %s (%.2f s)", out, time.perf_counter() - started)
    return target_dir, draft_dir


def _replace_dir(new: Path, out: Path) -> None:
    """Renames ``new`` to ``out``; an old ``out`` is first moved aside, then deleted."""
    try:
        os.replace(new, out)  # atomic; also succeeds when ``out`` is an empty directory
        return
    except OSError:
        if not out.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        try:
            os.replace(out, old / "pair")
        except FileNotFoundError:
            pass  # a concurrent builder moved it away already
        try:
            os.replace(new, out)
        except OSError:
            # Lost a race to a concurrent builder: keep its (complete) pair if the spec matches.
            if not out.exists():
                raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
