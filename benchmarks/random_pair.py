"""`specpipe bench random-pair`: a randomly initialised Llama target and draft saved as a local pair, for cost
profiling at sizes no shipped pair has (issue 4: "a randomly initialised 7B-shaped Llama for cost profiling
with a controlled-acceptance draft").

Both models share the demo pair's tokenizer (copied beside them, so `from_pretrained` loads each directory
on its own, offline) and its vocabulary; the shapes are those of known Llamas with that vocabulary. Random
models agree on almost nothing, so run the latency benchmark on the pair with `--controlled-acceptance A`:

    specpipe bench random-pair --target-shape 200m --draft-shape 68m --out /tmp/pair
    specpipe bench latency --target-model /tmp/pair/target --draft-model /tmp/pair/draft \\
        --controlled-acceptance 0.8 --modes greedy

Weights are created on `--device` in `--dtype` (a 7B target never exists in float32) with a fixed seed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specpipe.runtime.model_runner import DTYPES

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TOKENIZER = REPO / "specpipe" / "assets" / "demo-pair" / "target"

# hidden, intermediate, layers, attention heads, key/value heads (the vocabulary is the tokenizer's).
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    "200m": (1024, 2816, 16, 16, 8),  # a CPU-sized target: 197M parameters with the 4096-token vocabulary
    "160m": (768, 3072, 12, 12, 12),  # JackFram/llama-160m
    "68m": (768, 3072, 2, 12, 12),  # JackFram/llama-68m, a draft of the Llama family
    "tiny": (64, 128, 2, 4, 2),  # for tests
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench random-pair",
        description="Saves a randomly initialised Llama target and draft, sharing the demo pair's tokenizer, "
        "as OUT/target and OUT/draft, for `specpipe bench latency --controlled-acceptance`.",
    )
    p.add_argument("--target-shape", choices=sorted(SHAPES), default="200m", help="default: %(default)s")
    p.add_argument("--draft-shape", choices=sorted(SHAPES), default="68m", help="default: %(default)s")
    p.add_argument("--out", type=Path, required=True, help="directory to write target/ and draft/ into")
    p.add_argument("--device", default="cpu", help="where the weights are created (cpu or cuda[:N])")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="of the random weights (default: %(default)s)")
    p.add_argument(
        "--context", type=int, default=2048, help="the models' max_position_embeddings (default: %(default)s)"
    )
    return p.parse_args(argv)


def random_llama(
    shape: str, vocab_size: int, context: int, device: str, dtype: torch.dtype, eos_token_id: int | None
) -> LlamaForCausalLM:
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=context,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: never a float32 copy of a big model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def save_pair(
    out: Path,
    target_shape: str,
    draft_shape: str,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    context: int = 2048,
    tokenizer_dir: Path = SHIPPED_TOKENIZER,
) -> tuple[Path, Path]:
    """Writes out/target and out/draft (weights, config, tokenizer); returns both directories."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    directories = []
    for role, shape in (("target", target_shape), ("draft", draft_shape)):
        torch.manual_seed(seed + (role == "draft"))
        model = random_llama(shape, vocab_size, context, device, DTYPES[dtype], eos)
        directory = out / role
        model.save_pretrained(directory)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, directory / name)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{role}: random Llama ({shape}), {parameters / 1e6:.1f}M parameters, {dtype}: {directory}")
        directories.append(directory)
        del model
    return directories[0], directories[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    save_pair(args.out, args.target_shape, args.draft_shape, args.device, args.dtype, args.seed, args.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
