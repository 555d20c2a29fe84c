"""Trains the shipped demo target/draft pair (issue 3): GPT-2-shaped code models on Python stdlib source.

The target (6 x 320) is trained first on next-token prediction; the draft (1 x 128) is trained by
distillation from it, since greedy agreement with the target is what sets the acceptance rate. The draft
also learns from the target's logits while the target trains ("co-distillation": the target's forward pass
is paid for anyway), then gets a dedicated distillation phase against the final target.

Everything is deterministic given the seed and the step counts: a fixed, documented file split, seeded
initialisation and a seeded ``torch.Generator`` for batch sampling. With ``--time-budget-min`` a phase may
stop early (the step reached is recorded); its learning-rate schedule then follows wall-clock progress, so
the cosine decay still completes. The weights are saved as float16 safetensors next to a
``training_record.json`` and a generated model card (``README.md``).

Usage (the shipped pair)::

    python tools/train_demo_models.py --threads 1 --steps 900 --draft-steps 700 --time-budget-min 48

Runs on CPU (slowly) and on a GPU (``--device cuda``, minutes) with the same code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from specpipe.models.bpe_tokenizer import EOS_TOKEN, train_bpe_tokenizer
from specpipe.runtime.model_runner import cache_argument

logger = logging.getLogger("train_demo_models")

VOCAB_SIZE = 4096
N_POSITIONS = 1024
CONTEXT = 256
HELDOUT_MODULUS = 20
EXCLUDED_DIR_PARTS = ("/test/", "/tests/", "idlelib/idle_test", "site-packages")
EXCLUDED_PREFIX = "_sysconfigdata"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "specpipe" / "assets" / "demo-pair"
RECORD_NAME = "training_record.json"
CARD_DATE = "2026-11-23"
QUICK_CHECK_WINDOWS = 2


@dataclass(frozen=True)
class Shape:
    """A GPT-2 shape."""

    n_layer: int
    n_embd: int
    n_head: int


TARGET_SHAPE = Shape(n_layer=6, n_embd=320, n_head=5)
DRAFT_SHAPE = Shape(n_layer=1, n_embd=128, n_head=2)


@dataclass(frozen=True)
class SourceFile:
    """One stdlib file: its path relative to the stdlib root, and its text."""

    rel: str
    text: str


def is_heldout(rel: str) -> bool:
    """The held-out rule: sha256 of the relative path (UTF-8, '/' separators), as an integer, mod 20 == 0."""
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


def stdlib_files(root: str | None = None) -> list[SourceFile]:
    """All corpus files under the stdlib root, sorted by relative path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base).as_posix()
        probe = "/" + rel
        if any(part in probe for part in EXCLUDED_DIR_PARTS) or path.name.startswith(EXCLUDED_PREFIX):
            continue
        if not path.is_file():
            continue
        files.append(SourceFile(rel, path.read_text(encoding="utf-8", errors="replace")))
    files.sort(key=lambda f: f.rel)
    return files


def split_files(files: Sequence[SourceFile], max_files: int = 0) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, heldout) by `is_heldout`; ``max_files`` > 0 keeps only the first few of each (smoke runs)."""
    train = [f for f in files if not is_heldout(f.rel)]
    heldout = [f for f in files if is_heldout(f.rel)]
    if max_files > 0:
        train, heldout = train[:max_files], heldout[: max(1, max_files // 4)]
    return train, heldout


def train_tokenizer(texts: Sequence[str]):  # -> PreTrainedTokenizerFast
    """Byte-level BPE, vocab 4096, ``<|endoftext|>`` = id 0 as bos/eos/pad/unk."""
    return train_bpe_tokenizer(texts, VOCAB_SIZE, N_POSITIONS)


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Texts encoded and joined with ``<|endoftext|>`` between (and after) files, as one 1-D tensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts)):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(shape: Shape, vocab: int, seed: int):  # -> GPT2LMHeadModel
    """A freshly initialised GPT-2 LM (dropout 0, tied embeddings) from ``seed``."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=N_POSITIONS,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` fraction, then cosine decay to 10%."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p))


def sample_batch(stream: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of CONTEXT + 1 tokens."""
    starts = torch.randint(0, len(stream) - CONTEXT - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + CONTEXT + 1] for s in starts.tolist()])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def kd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) per token, averaged over tokens."""
    v = draft_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(draft_logits.reshape(-1, v).float(), -1),
        F.log_softmax(target_logits.reshape(-1, v).float(), -1),
        log_target=True,
        reduction="batchmean",
    )


@dataclass
class PhaseResult:
    """What a training phase reached."""

    steps_planned: int
    steps_done: int
    budget_s: float | None
    budget_bound: bool
    wall_s: float
    final_loss: float
    loss_curve: list[tuple[int, float]]
    final_draft_kd: float | None = None


class Phase:
    """Step/time bookkeeping for one phase: LR progress, early stop, a smoothed loss log."""

    def __init__(self, name: str, steps: int, budget_s: float | None, warmup: float) -> None:
        self.name, self.steps, self.budget_s, self.warmup = name, steps, budget_s, warmup
        self.start = time.perf_counter()
        self.curve: list[tuple[int, float]] = []
        self.window: list[float] = []
        self.budget_bound = False

    def elapsed(self) -> float:
        """Seconds since the phase began."""
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Fraction done: by steps, or by wall-clock when a budget binds sooner."""
        p = step / max(1, self.steps)
        if self.budget_s:
            p = max(p, self.elapsed() / self.budget_s)
        return p

    def should_stop(self, step: int) -> bool:
        """True once the steps or the budget are spent."""
        if step >= self.steps:
            return True
        if self.budget_s is not None and self.elapsed() >= self.budget_s:
            self.budget_bound = True
            return True
        return False

    def log(self, step: int, loss: float, extra: str = "") -> None:
        """Keeps a running mean; logs and records it every 25 steps."""
        self.window.append(loss)
        if (step + 1) % 25 == 0 or step + 1 == self.steps:
            mean = sum(self.window) / len(self.window)
            self.curve.append((step + 1, round(mean, 4)))
            self.window = []
            logger.info(
                "%s step %d/%d loss %.4f %s(%.0f s)",
                self.name,
                step + 1,
                self.steps,
                mean,
                extra,
                self.elapsed(),
            )

    def smoothed(self, losses: Sequence[float]) -> float:
        """Mean of the last (up to) 25 step losses."""
        tail = list(losses)[-25:]
        return float(sum(tail) / max(1, len(tail)))

    def result(
        self, steps_done: int, losses: Sequence[float], final_draft_kd: float | None = None
    ) -> PhaseResult:
        """What the phase reached, for the training record."""
        return PhaseResult(
            steps_planned=self.steps,
            steps_done=steps_done,
            budget_s=self.budget_s,
            budget_bound=self.budget_bound,
            wall_s=round(self.elapsed(), 1),
            final_loss=round(self.smoothed(losses), 4),
            loss_curve=self.curve,
            final_draft_kd=final_draft_kd,
        )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Sets every param group's learning rate."""
    for group in opt.param_groups:
        group["lr"] = lr


def make_opt(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def train_target(
    args: argparse.Namespace,
    target,
    draft,
    stream: torch.Tensor,
    device: torch.device,
    budget_s: float | None,
) -> PhaseResult:
    """Next-token training of the target; the draft co-distils from the target's logits on each batch."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = make_opt(target, args.lr, 0.1)
    dopt = make_opt(draft, args.draft_lr, 0.0) if args.co_distill else None
    phase = Phase("target", args.steps, budget_s, args.warmup)
    losses: list[float] = []
    kd_losses: list[float] = []
    target.train()
    draft.train()
    step = 0
    while not phase.should_stop(step):
        lr = lr_factor(phase.progress(step), args.warmup)
        set_lr(opt, args.lr * lr)
        batch = sample_batch(stream, args.batch, gen).to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = target(input_ids=inputs).logits
        loss = lm_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        extra = ""
        if dopt is not None:
            kd = kd_loss(draft(input_ids=inputs).logits, logits.detach())
            dopt.zero_grad(set_to_none=True)
            kd.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            dopt.step()
            kd_losses.append(kd.item())
            extra = f"draft-kd {phase.smoothed(kd_losses):.4f} "
        phase.log(step, loss.item(), extra)
        step += 1
    target.eval()
    return phase.result(step, losses, round(phase.smoothed(kd_losses), 4) if kd_losses else None)


def train_draft(
    args: argparse.Namespace,
    target,
    draft,
    stream: torch.Tensor,
    device: torch.device,
    budget_s: float | None,
) -> PhaseResult:
    """Distils the draft from the (frozen) target: KL(target || draft) + lm_weight * next-token loss."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = make_opt(draft, args.draft_lr, 0.0)
    phase = Phase("draft", args.draft_steps, budget_s, args.draft_warmup)
    losses: list[float] = []
    target.eval()
    draft.train()
    step = 0
    while not phase.should_stop(step):
        set_lr(opt, args.draft_lr * lr_factor(phase.progress(step), args.draft_warmup))
        batch = sample_batch(stream, args.draft_batch, gen).to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher = target(input_ids=inputs).logits
        logits = draft(input_ids=inputs).logits
        loss = kd_loss(logits, teacher)
        if args.draft_lm_weight > 0:
            loss = loss + args.draft_lm_weight * lm_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        phase.log(step, loss.item())
        step += 1
    draft.eval()
    return phase.result(step, losses)


def eval_windows(stream: torch.Tensor, limit: int) -> torch.Tensor:
    """Consecutive non-overlapping CONTEXT-token windows of the held-out stream (at most ``limit``)."""
    n = len(stream) // CONTEXT
    if limit > 0:
        n = min(n, limit)
    return stream[: n * CONTEXT].reshape(n, CONTEXT)


@torch.no_grad()
def evaluate(target, draft, windows: torch.Tensor, device: torch.device, batch: int = 8) -> dict[str, float]:
    """Teacher-forced greedy agreement (argmax draft == argmax target, all positions) and held-out losses."""
    agree = total = 0
    t_loss = d_loss = 0.0
    n_loss = 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(device)
        t = target(input_ids=ids).logits.float()
        d = draft(input_ids=ids).logits.float()
        agree += (t.argmax(-1) == d.argmax(-1)).sum().item()
        total += ids.numel()
        k = ids[:, 1:].numel()
        t_loss += lm_loss(t[:, :-1], ids[:, 1:]).item() * k
        d_loss += lm_loss(d[:, :-1], ids[:, 1:]).item() * k
        n_loss += k
    return {
        "agreement": round(agree / max(1, total), 4),
        "positions": total,
        "windows": len(windows),
        "target_loss": round(t_loss / max(1, n_loss), 4),
        "draft_loss": round(d_loss / max(1, n_loss), 4),
    }


def agreement(target, draft, windows: torch.Tensor) -> float:
    """Greedy agreement on a few windows (the check the tests repeat)."""
    with torch.no_grad():
        t = target(input_ids=windows).logits.argmax(-1)
        d = draft(input_ids=windows).logits.argmax(-1)
    return round((t == d).float().mean().item(), 4)


@torch.inference_mode()  # as the workers run: autograd bookkeeping would dominate the tiny draft's cost
def forward_costs_ms(
    models: Sequence[torch.nn.Module], vocab: int, runs: int, seed: int
) -> list[tuple[float, float]]:
    """(median, min) ms of one new token's forward with CONTEXT - 1 tokens in the KV cache, per model.

    Each model is timed on its own, as it runs in its own worker process: timing them in alternation on
    one thread would make each evict the other's weights from the CPU caches and overstate the small
    draft's cost (measured: 1.85 ms alternating vs about 1.0 ms on its own for the 1 x 128 draft).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, CONTEXT), generator=gen)
    last = ids[:, -1:]
    results = []
    for model in models:
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        times = []
        with_cache = {cache_argument(model): cache}
        for i in range(runs + 10):
            t0 = time.perf_counter()
            model(input_ids=last, use_cache=True, **with_cache)
            dt = time.perf_counter() - t0
            cache.crop(-1)  # drop the token just appended (transformers 5: negative = tokens to remove)
            if i >= 10:
                times.append(dt * 1000.0)
        results.append((round(statistics.median(times), 3), round(min(times), 3)))
    return results


def save_pair(out: Path, target, draft, tokenizer) -> dict[str, int]:
    """float16 safetensors + the shared tokenizer into out/target and out/draft; returns weight sizes."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sizes = {}
    for name, model in (("target", target), ("draft", draft)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        half = model.to(torch.float16)
        half.save_pretrained(d, safe_serialization=True)
        model.to(torch.float32)
        tokenizer.save_pretrained(d)
        sizes[name] = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    return sizes


def load_pair(out: Path):
    """(target, draft, tokenizer) loaded from disk in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32).eval()
    return target, draft, AutoTokenizer.from_pretrained(out / "target")


def run_eval(out: Path, record: dict, heldout: Sequence[SourceFile], args: argparse.Namespace) -> None:
    """Reloads the saved (float16) pair as float32 and fills the record's evaluation and cost fields."""
    target, draft, tokenizer = load_pair(out)
    device = torch.device(args.device)
    stream = token_stream(tokenizer, [f.text for f in heldout])
    windows = eval_windows(stream, args.eval_windows)
    started = time.perf_counter()
    record["heldout_eval"] = evaluate(target.to(device), draft.to(device), windows, device)
    record["heldout_eval"]["tokens_in_heldout_stream"] = len(stream)
    quick = windows[:QUICK_CHECK_WINDOWS].cpu()
    target.to("cpu")
    draft.to("cpu")
    record["quick_check"] = {
        "note": "first 2 held-out windows; tests/test_demo_pair.py recomputes agreement on them",
        "agreement": agreement(target, draft, quick),
        "input_ids": quick.tolist(),
    }
    logger.info("held-out eval %s (%.0f s)", record["heldout_eval"], time.perf_counter() - started)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (t_ms, t_min), (d_ms, d_min) = forward_costs_ms(
            [target, draft], len(tokenizer), args.cost_runs, args.seed
        )
    finally:
        torch.set_num_threads(threads)
    record["forward_cost"] = {
        "method": f"CPU, 1 thread, float32, KV cache of {CONTEXT - 1} tokens + 1 new token, "
        f"median of {args.cost_runs} runs each, each model timed on its own (warm caches, as in its worker)",
        "target_ms": t_ms,
        "draft_ms": d_ms,
        "c": round(d_ms / t_ms, 4),
        "target_min_ms": t_min,
        "draft_min_ms": d_min,
        "c_of_minimums": round(d_min / t_min, 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    logger.info("forward cost %s", record["forward_cost"])


def write_card(out: Path, record: dict) -> None:
    """Writes the model card (README.md) from the record."""
    ev, fc, tr = record["heldout_eval"], record["forward_cost"], record["training"]
    tgt, dft = tr["target"], tr["draft"]
    goal_agree = "met" if ev["agreement"] >= 0.70 else "NOT met"
    goal_c = "met" if fc["c"] <= 0.15 else "NOT met"
    held = record["data"]["heldout_files"]
    held_list = "\n".join(f"- `{rel}`" for rel in held)
    shapes = record["shapes"]
    sizes = record["weights_bytes"]
    lines = [
        "# specpipe demo pair: stdlib code-completion target and draft",
        "",
        "A small GPT-2-shaped target/draft pair trained by `tools/train_demo_models.py` on the Python "
        "standard library's source, shipped so `specpipe serve` runs real models offline. It completes "
        "Python code (badly: it is tiny and saw a few million tokens), but its draft agrees with its target "
        "often enough to show real speculative-decoding acceptance.",
        "",
        "## Shapes",
        "",
        "| model | layers | n_embd | n_head | n_positions | vocab | parameters | weights (float16) |",
        "|---|---|---|---|---|---|---|---|",
        f"| target | {shapes['target']['n_layer']} | {shapes['target']['n_embd']} | "
        f"{shapes['target']['n_head']} | {N_POSITIONS} | {record['tokenizer']['vocab_size']} | "
        f"{record['params']['target']:,} | {sizes['target'] / 1e6:.2f} MB |",
        f"| draft | {shapes['draft']['n_layer']} | {shapes['draft']['n_embd']} | "
        f"{shapes['draft']['n_head']} | {N_POSITIONS} | {record['tokenizer']['vocab_size']} | "
        f"{record['params']['draft']:,} | {sizes['draft'] / 1e6:.2f} MB |",
        "",
        f"Weights total {sum(sizes.values()) / 1e6:.2f} MB (float16 safetensors, tied input/output "
        "embeddings). Load with `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` so "
        "computation stays float32 (the specpipe workers do).",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer and decoder, add_prefix_space=False), "
        f"vocabulary {record['tokenizer']['vocab_size']}, `{EOS_TOKEN}` = id 0 as bos/eos/pad/unk, "
        "trained on the training files only. The same files are saved in `target/` and `draft/`.",
        "",
        "## Training data",
        "",
        f"The interpreter's own standard library (Python {record['data']['python_version']}): every "
        '`**/*.py` under `sysconfig.get_paths()["stdlib"]`, excluding test directories (`/test/`, '
        "`/tests/`, `idlelib/idle_test`), `site-packages` and `_sysconfigdata*`, read as UTF-8 with "
        'errors="replace", sorted by relative path, joined with `<|endoftext|>` between files. '
        f"{record['data']['n_train_files']} training files ({record['data']['train_tokens']:,} tokens), "
        f"{len(held)} held-out files ({ev['tokens_in_heldout_stream']:,} tokens).",
        "",
        "**Held-out rule:** a file is held out when `int(sha256(relative_path).hexdigest(), 16) % 20 == 0` "
        "(relative path with `/` separators, UTF-8). Held-out files are never trained on (tokenizer "
        "included). The held-out files are:",
        "",
        held_list,
        "",
        "## Training",
        "",
        f"1. **Target**: next-token prediction on random {CONTEXT}-token windows, batch "
        f"{tr['hyperparameters']['batch']}, AdamW (betas 0.9/0.95, weight decay 0.1), peak lr "
        f"{tr['hyperparameters']['lr']}, linear warmup then cosine decay to 10%, dropout 0, grad clip 1.0. "
        f"{tgt['steps_done']} steps (planned {tgt['steps_planned']}; time budget "
        f"{'reached' if tgt['budget_bound'] else 'not reached'}), {tgt['wall_s']:.0f} s. Final training "
        f"loss {tgt['final_loss']} (mean of the last 25 steps). While the target trained, the draft "
        "co-distilled from the target's logits on each batch (KL(target || draft)); final co-distillation "
        f"KL {tgt['final_draft_kd']}.",
        f"2. **Draft**: distillation from the frozen final target, KL(target || draft) on the target's "
        f"soft next-token distributions (plus {tr['hyperparameters']['draft_lm_weight']} x the plain LM "
        f"loss), batch {tr['hyperparameters']['draft_batch']}, peak lr {tr['hyperparameters']['draft_lr']}, "
        f"warmup + cosine. {dft['steps_done']} steps (planned {dft['steps_planned']}; time budget "
        f"{'reached' if dft['budget_bound'] else 'not reached'}), {dft['wall_s']:.0f} s. Final loss "
        f"{dft['final_loss']}.",
        "",
        "With a time budget the learning-rate schedule follows whichever of steps or wall-clock runs out "
        "first, so a phase stopped by the budget still finishes its decay. A run stopped by its budget is "
        "therefore not bit-reproducible (the step reached and the schedule depend on the machine's speed "
        "and load): rerunning the command gives a comparable pair, not identical weights; without a "
        "binding budget the run is deterministic. Total wall time (tokenizer, training, saving, evaluation): "
        f"{record['wall_time_s']:.0f} s.",
        "",
        "## Results (held-out files)",
        "",
        f"- **Greedy agreement** (argmax of draft logits == argmax of target logits, teacher-forced on "
        f"{ev['windows']} consecutive {CONTEXT}-token windows of the held-out stream, {ev['positions']:,} "
        f"positions, weights as shipped in float16, computed in float32): **{ev['agreement']:.4f}** "
        f"(goal >= 0.70: {goal_agree}).",
        f"- Held-out next-token loss: target {ev['target_loss']}, draft {ev['draft_loss']} (nats/token).",
        f"- **Forward cost** ({fc['method']}): target {fc['target_ms']} ms, draft {fc['draft_ms']} ms, "
        f"**c = {fc['c']:.3f}** (goal <= 0.15: {goal_c}). The 1-minute load average was "
        f"{fc.get('load_average_1min', 'n/a')} during the timing (other processes shared the cores); "
        "a 1-layer "
        "draft's one-millisecond forwards suffer more from preemption than the target's. The fastest of the "
        "runs (closest to an idle "
        f"machine): target {fc.get('target_min_ms')} ms, draft {fc.get('draft_min_ms')} ms, "
        f"c = {fc.get('c_of_minimums')}.",
        "",
        f"Measured {CARD_DATE} on {record['machine']['description']}.",
        "",
        "## Reproduce",
        "",
        "```bash",
        record["command"],
        "```",
        "",
        "The agreement and costs above were (re)measured by:",
        "",
        "```bash",
        record.get("eval_command", record["command"]),
        "```",
        "",
        f"`{RECORD_NAME}` holds everything: the split, hyperparameters, sizes, loss curves, step counts, "
        "wall times, agreement and forward costs. `--eval-only` re-measures agreement and costs of a saved "
        "pair.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir (target/, draft/, record)")
    p.add_argument("--steps", type=int, default=900, help="target training steps")
    p.add_argument("--draft-steps", type=int, default=700, help="draft distillation steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="wall-clock budget for both training phases together; each stops early when spent",
    )
    p.add_argument(
        "--draft-budget-min",
        type=float,
        default=12.0,
        help="part of --time-budget-min reserved for the draft phase",
    )
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the pair saved in --out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--draft-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the target phase")
    p.add_argument("--draft-warmup", type=float, default=0.03)
    p.add_argument("--draft-lm-weight", type=float, default=0.0, help="weight of the LM loss in the draft's")
    p.add_argument(
        "--no-co-distill",
        dest="co_distill",
        action="store_false",
        help="do not train the draft on the target's logits while the target trains",
    )
    p.add_argument("--max-files", type=int, default=0, help="smoke runs: only the first N training files")
    p.add_argument("--eval-windows", type=int, default=400, help="cap on held-out windows (0: all)")
    p.add_argument("--cost-runs", type=int, default=300, help="timed forwards per model for the cost")
    p.add_argument("--stdlib", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def command_line(argv: Sequence[str]) -> str:
    """The command as run (for the record and the card)."""
    return " ".join(["python", "tools/train_demo_models.py", *argv])


def machine() -> dict[str, str]:
    """Where this ran."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "description": f"{os.cpu_count()}-core {cpu} CPU, PyTorch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }


def train(args: argparse.Namespace, argv: Sequence[str], log: Callable[[str], None]) -> dict:
    """The full run: data, tokenizer, target, draft, save; returns the record (without eval)."""
    started = time.perf_counter()
    files = stdlib_files(args.stdlib)
    train_files, heldout = split_files(files, args.max_files)
    log(f"{len(train_files)} training files, {len(heldout)} held-out files")
    tokenizer = train_tokenizer([f.text for f in train_files])
    stream = token_stream(tokenizer, [f.text for f in train_files])
    log(
        f"tokenizer trained ({len(tokenizer)} tokens); training stream {len(stream):,} tokens "
        f"({time.perf_counter() - started:.0f} s)"
    )
    device = torch.device(args.device)
    vocab = len(tokenizer)
    target = build_model(TARGET_SHAPE, vocab, args.seed).to(device)
    draft = build_model(DRAFT_SHAPE, vocab, args.seed + 1).to(device)
    budget = args.time_budget_min * 60.0 if args.time_budget_min else None
    t_budget = (
        None
        if budget is None
        else max(60.0, budget - args.draft_budget_min * 60.0 - (time.perf_counter() - started))
    )
    tgt = train_target(args, target, draft, stream, device, t_budget)
    d_budget = None if budget is None else max(30.0, budget - (time.perf_counter() - started))
    dft = train_draft(args, target, draft, stream, device, d_budget)
    sizes = save_pair(args.out, target, draft, tokenizer)
    hyper = {
        k: getattr(args, k)
        for k in (
            "batch",
            "draft_batch",
            "lr",
            "draft_lr",
            "warmup",
            "draft_warmup",
            "draft_lm_weight",
            "co_distill",
            "seed",
            "threads",
            "device",
        )
    }
    hyper.update(
        {
            "context": CONTEXT,
            "optimizer": "AdamW(betas=(0.9, 0.95)), wd 0.1 target / 0 draft",
            "schedule": "linear warmup, cosine to 10%",
            "grad_clip": 1.0,
            "dropout": 0.0,
            "draft_loss": "KL(target||draft) + draft_lm_weight * CE",
        }
    )
    return {
        "command": command_line(argv),
        "date": CARD_DATE,
        "machine": machine(),
        "data": {
            "python_version": platform.python_version(),
            "stdlib_root": "sysconfig.get_paths()['stdlib']",
            "heldout_rule": "int(sha256(relative_path.encode('utf-8')).hexdigest(), 16) % 20 == 0",
            "excluded": list(EXCLUDED_DIR_PARTS) + [EXCLUDED_PREFIX + "*"],
            "max_files": args.max_files,
            "n_train_files": len(train_files),
            "train_files_sha256": hashlib.sha256("\n".join(f.rel for f in train_files).encode()).hexdigest(),
            "train_chars": sum(len(f.text) for f in train_files),
            "train_tokens": len(stream),
            "heldout_files": [f.rel for f in heldout],
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab, "special": {EOS_TOKEN: 0}},
        "shapes": {"target": asdict(TARGET_SHAPE), "draft": asdict(DRAFT_SHAPE), "n_positions": N_POSITIONS},
        "params": {"target": n_params(target), "draft": n_params(draft)},
        "weights_bytes": sizes,
        "training": {"hyperparameters": hyper, "target": asdict(tgt), "draft": asdict(dft)},
        "train_wall_time_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(max(1, args.threads)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if args.threads == 1 else "true")
    torch.set_num_threads(max(1, args.threads))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    started = time.perf_counter()
    out: Path = args.out
    record_path = out / RECORD_NAME
    if args.eval_only:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        files = {f.rel: f for f in stdlib_files(args.stdlib)}
        heldout = [files[rel] for rel in record["data"]["heldout_files"]]
    else:
        out.mkdir(parents=True, exist_ok=True)
        record = train(args, argv, logger.info)
        files = {f.rel: f for f in stdlib_files(args.stdlib)}
        heldout = [files[rel] for rel in record["data"]["heldout_files"]]
    run_eval(out, record, heldout, args)
    record["eval_command"] = command_line(argv)
    if not args.eval_only:
        record["wall_time_s"] = round(time.perf_counter() - started, 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_card(out, record)
    ev, fc = record["heldout_eval"], record["forward_cost"]
    print(
        f"agreement {ev['agreement']:.4f} over {ev['positions']} held-out positions; "
        f"target {fc['target_ms']} ms, draft {fc['draft_ms']} ms, c = {fc['c']:.3f}; "
        f"weights {sum(record['weights_bytes'].values()) / 1e6:.2f} MB; "
        f"target steps {record['training']['target']['steps_done']}, "
        f"draft steps {record['training']['draft']['steps_done']}; wall {record['wall_time_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
