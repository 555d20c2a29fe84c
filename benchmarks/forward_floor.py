"""How far a target's verify forward is from its memory-bandwidth floor.

A forward of a few new tokens on a KV cache has to read every weight once, and the cache: its floor is
(weight bytes + KV-cache bytes) / memory bandwidth. This measures, on one device, in one run:

- the read bandwidth: the faster of a large matrix-vector product and a large copy (`read_bandwidth`);
- the model's weight bytes (tied weights once) and the cache's bytes at the chosen context;
- the forward time of k + 1 new tokens after `context` cached tokens, k = 0..max_k (median of `runs`, the
  cache cropped back after each), logits for those rows only, as specpipe's target worker computes them.

The model is a local checkpoint (`--model DIR`, default the shipped demo target) or a randomly initialised
Llama of a named shape (`--llama-shape 7b`): forward cost depends on the shapes, not the values, so a
7B-shaped model profiles a 7B target without downloading one. Where eager execution is launch-bound (GPU,
small batch) the forward sits far above the floor. Definitions: docs/benchmarks.md.

    specpipe bench floor                                    # demo target, CPU
    specpipe bench floor --llama-shape 7b --device cuda --dtype bfloat16

Where the model has a lean forward (GPT-2, Llama) it also times that forward alone, one packed pass of
`--batch-sessions` sessions' blocks, as a batching worker runs it (the packed pass over the sessions is the
cost of a round of all of them), and the forward over a static KV slot (specpipe/runtime/graphed_forward.py,
a worker's `--static-kv-slots`): on a GPU a replayed CUDA graph, captured before the timed runs; on the CPU
the same static forward run eagerly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import random_pair
from benchmarks.inprocess import synchronize

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "specpipe" / "assets" / "demo-pair" / "target"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The shapes `bench random-pair` builds, with the vocabulary of the Llamas they come from (32000; the test
# shape's 512): hidden, intermediate, layers, heads, key/value heads, vocabulary.
LLAMA_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    name: (*shape, 512 if name == "tiny" else 32000) for name, shape in random_pair.SHAPES.items()
}


@dataclass(frozen=True, slots=True)
class ForwardRow:
    k: int  # draft tokens verified: the forward feeds k + 1 new tokens
    forward_ms: float  # transformers' forward, as a target that does not batch runs it
    # The lean forward (specpipe/runtime/lean_gpt2.py, lean_llama.py), where the model has one: one session,
    # and one packed pass of `batch_sessions` sessions' blocks (cross-session batching). None: not measured.
    lean_forward_ms: float | None = None
    packed_forward_ms: float | None = None
    # The forward over a static KV slot: a CUDA graph's replay on a GPU, the eager static forward elsewhere.
    static_forward_ms: float | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench floor",
        description="A target's verify forward time for k + 1 new tokens against its memory-bandwidth floor.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a local checkpoint (default: the shipped demo target)")
    source.add_argument("--llama-shape", choices=sorted(LLAMA_SHAPES), help="a random Llama of this shape")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, else float32"
    )
    p.add_argument("--context", type=int, default=512, help="tokens in the KV cache before each forward")
    p.add_argument("--max-k", type=int, default=8, help="verify blocks of 1 to max-k + 1 tokens")
    p.add_argument("--runs", type=int, default=20, help="timed runs per block size (median)")
    p.add_argument(
        "--probe-mib", type=int, default=0, help="bandwidth probe size (default: 1024 GPU, 256 CPU)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument(
        "--batch-sessions", type=int, default=4,
        help="also time the lean forward (where the model has one) alone and in one packed pass of this many "
        "sessions' blocks, as a batching worker runs it (1: the lean forward alone)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.context < 1 or args.max_k < 0 or args.runs < 1 or args.batch_sessions < 1:
        p.error("--context, --runs and --batch-sessions must be >= 1, --max-k >= 0")
    return args


def median_ms(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 2) -> float:
    """Median wall time of fn in ms, the device synchronised around each call."""
    samples = []
    for i in range(warmup + runs):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples)


def gemv_bandwidth(device: torch.device, dtype: torch.dtype, mib: int, runs: int) -> float:
    """Bytes per second read by a matrix-vector product over a `mib` matrix (what decoding mostly does)."""
    side = int((mib * 2**20 / torch.tensor([], dtype=dtype).element_size()) ** 0.5)
    matrix = torch.ones(side, side, dtype=dtype, device=device)
    vector = torch.ones(side, dtype=dtype, device=device)
    ms = median_ms(lambda: torch.mv(matrix, vector), device, runs)
    return matrix.numel() * matrix.element_size() / (ms / 1000.0)


def copy_bandwidth(device: torch.device, mib: int, runs: int) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and the bytes written."""
    source = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device, runs)
    return 2.0 * source.numel() / (ms / 1000.0)


def read_bandwidth(device: torch.device, dtype: torch.dtype, mib: int, runs: int) -> float:
    """The faster of the two probes: the floor is then the lower of the two, so no forward beats it by a
    better access pattern."""
    return max(gemv_bandwidth(device, dtype, mib, runs), copy_bandwidth(device, mib, runs))


def random_llama(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    vocab_size = LLAMA_SHAPES[shape][-1]
    return random_pair.random_llama(shape, vocab_size, 4096, str(device), dtype, eos_token_id=None)


def load_model(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, str]:
    if args.llama_shape:
        return random_llama(args.llama_shape, device, dtype), f"random Llama, {args.llama_shape} shape"
    from transformers import AutoModelForCausalLM

    path = args.model or DEMO_TARGET
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), str(path)


def weight_bytes(model: torch.nn.Module) -> int:
    """Every parameter once (`parameters()` yields a tied weight once) and the buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: object) -> int:
    """Bytes of the key and value tensors a DynamicCache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def measure_forwards(
    model: torch.nn.Module, device: torch.device, context: int, max_k: int, runs: int
) -> tuple[list[float], int]:
    """Median ms of the forward of k + 1 new tokens after `context` cached tokens, k = 0..max_k, and the
    cache's bytes at `context`."""
    from transformers import DynamicCache

    from specpipe.runtime.model_runner import cache_argument

    vocab = int(model.get_output_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context + max_k + 1), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model): cache}
    model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1, **with_cache)
    held = cache_bytes(cache)
    times = []
    for k in range(max_k + 1):
        block = ids[:, context : context + k + 1]

        def forward(block: torch.Tensor = block) -> None:
            model(input_ids=block, use_cache=True, logits_to_keep=block.shape[1], **with_cache)
            cache.crop(-block.shape[1])  # negative: drop the tokens just appended

        times.append(median_ms(forward, device, runs))
    return times, held


@torch.inference_mode()
def measure_lean_forwards(
    model: torch.nn.Module, device: torch.device, context: int, max_k: int, runs: int, sessions: int
) -> list[tuple[float, float | None, float]] | None:
    """Per k = 0..max_k: median ms of the lean forward of k + 1 new tokens after `context` cached tokens, of
    one packed pass of `sessions` such blocks (None for one session), and of the forward over a static KV
    slot (a CUDA graph on a GPU); None where there is no lean path."""
    from specpipe.runtime.graphed_forward import GraphedForward
    from specpipe.runtime.model_runner import lean_forward_for

    lean = lean_forward_for(model)
    if lean is None:
        return None
    vocab = int(model.get_output_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(1)
    histories = torch.randint(0, vocab, (sessions, context + max_k + 1), generator=generator).tolist()
    caches = [lean.new_cache() for _ in range(sessions)]
    for history, cache in zip(histories, caches, strict=True):
        lean.forward(history[:context], cache, 1)
    graphed = GraphedForward(lean, slots=1, max_context=context + max_k + 1)
    slot = graphed.new_cache()
    graphed.forward(histories[0][:context], slot, 1)
    rows: list[tuple[float, float | None, float]] = []
    for k in range(max_k + 1):
        block = histories[0][context : context + k + 1]

        def alone(block: list[int] = block) -> None:
            lean.forward(block, caches[0], len(block))
            caches[0].crop(context)

        def packed(k: int = k) -> None:
            lean.forward_packed(
                [(h[context : context + k + 1], c, k + 1) for h, c in zip(histories, caches, strict=True)]
            )
            for cache in caches:
                cache.crop(context)

        def static(block: list[int] = block) -> None:  # the first call captures the graph (a warm-up run)
            graphed.forward(block, slot, len(block))
            slot.crop(context)

        rows.append(
            (
                median_ms(alone, device, runs),
                median_ms(packed, device, runs) if sessions > 1 else None,
                median_ms(static, device, runs),
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class FloorResult:
    date: str
    command: str
    device: str
    torch: str
    model: str
    dtype: str
    context: int
    runs: int
    weight_bytes: int
    kv_cache_bytes: int
    read_bandwidth_gb_s: float
    rows: list[ForwardRow]
    batch_sessions: int = 1  # the sessions of a row's packed pass
    cuda_graphs: bool = False  # whether a row's static_forward_ms is a CUDA graph's replay

    @property
    def floor_ms(self) -> float:
        return (self.weight_bytes + self.kv_cache_bytes) / (self.read_bandwidth_gb_s * 1e9) * 1000.0

    def over_floor(self, row: ForwardRow) -> float:
        return row.forward_ms / self.floor_ms

    def to_dict(self) -> dict[str, object]:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "rows"}
        rows = [{**asdict(r), "floor_ms": self.floor_ms, "over_floor": self.over_floor(r)} for r in self.rows]
        return {**fields, "floor_ms": self.floor_ms, "rows": rows}

    def summary(self) -> str:
        lines = [
            f"{self.model} ({self.dtype}) on {self.device}, {self.date}",
            f"weights {self.weight_bytes / 2**20:.1f} MiB + KV cache {self.kv_cache_bytes / 2**20:.1f} MiB "
            f"at {self.context} tokens; read bandwidth {self.read_bandwidth_gb_s:.1f} GB/s "
            f"-> floor {self.floor_ms:.3f} ms per forward",
            f"{'k':>3}  {'new tokens':>10}  {'forward ms':>10}  {'x floor':>8}"
            + (f"  {'lean ms':>8}" if self.rows and self.rows[0].lean_forward_ms is not None else "")
            + (
                f"  {f'{self.batch_sessions} packed ms':>15}  {'per session':>11}"
                if self.rows and self.rows[0].packed_forward_ms is not None
                else ""
            )
            + (
                f"  {'graph ms' if self.cuda_graphs else 'static ms':>9}  {'x floor':>8}"
                if self.rows and self.rows[0].static_forward_ms is not None
                else ""
            ),
        ]
        for row in self.rows:
            line = f"{row.k:>3}  {row.k + 1:>10}  {row.forward_ms:>10.3f}  {self.over_floor(row):>7.1f}x"
            if row.lean_forward_ms is not None:
                line += f"  {row.lean_forward_ms:>8.3f}"
            if row.packed_forward_ms is not None:
                per_session = row.packed_forward_ms / self.batch_sessions
                line += f"  {row.packed_forward_ms:>15.3f}  {per_session:>11.3f}"
            if row.static_forward_ms is not None:
                line += f"  {row.static_forward_ms:>9.3f}  {row.static_forward_ms / self.floor_ms:>7.1f}x"
            lines.append(line)
        return "\n".join(lines)


def run(args: argparse.Namespace, command: str) -> FloorResult:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    model, source = load_model(args, device, dtype)
    probe_mib = args.probe_mib or (1024 if device.type == "cuda" else 256)
    bandwidth = read_bandwidth(device, dtype, probe_mib, max(5, args.runs // 2))
    forwards, kv_bytes = measure_forwards(model, device, args.context, args.max_k, args.runs)
    lean = measure_lean_forwards(model, device, args.context, args.max_k, args.runs, args.batch_sessions)
    weights = weight_bytes(model)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU, {torch.get_num_threads()} torch threads"
    return FloorResult(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        device=device_name,
        torch=torch.__version__,
        model=source,
        dtype=str(dtype).removeprefix("torch."),
        context=args.context,
        runs=args.runs,
        weight_bytes=weights,
        kv_cache_bytes=kv_bytes,
        read_bandwidth_gb_s=bandwidth / 1e9,
        rows=[
            ForwardRow(k, ms, *(lean[k] if lean is not None else (None, None, None)))
            for k, ms in enumerate(forwards)
        ],
        batch_sessions=args.batch_sessions,
        cuda_graphs=lean is not None and device.type == "cuda",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    argv = list(sys.argv[1:] if argv is None else argv)
    result = run(args, " ".join(["specpipe bench floor", *argv]))
    print(result.summary())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
