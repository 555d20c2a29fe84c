"""A lean forward for Llama-architecture models over a preallocated KV cache, one session or several packed.

The architecture of most large targets (Llama 2/3, and the 7B shape `specpipe bench floor` profiles):
pre-RMSNorm blocks, rotary positions, grouped-query attention, a SiLU-gated MLP. It exists for the same two
reasons as the GPT-2 one (specpipe/runtime/lean_gpt2.py): no per-call framework overhead (masks, cache
objects, output dataclasses), and a packed pass that serves several sessions at once (`forward_packed`),
which cross-session batching needs (docs/architecture.md, "Cross-session batching").

The math follows transformers' `LlamaForCausalLM` op for op where the numbers depend on it (RMSNorm in
float32, rotary tables from the model's own `inv_freq`, softmax in float32), so the logits agree with
transformers' to float rounding (attention is two batched matmuls here, scaled dot-product attention
there), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from specpipe.runtime.packing import Packed, PreallocatedKVCache

__all__ = ["LeanLlama", "supports"]


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a Llama LM whose forward this module reproduces (default rotary positions only)."""
    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    return (
        getattr(config, "model_type", None) == "llama"
        and type(model).__name__ == "LlamaForCausalLM"
        and config.hidden_act == "silu"
        and rope.get("rope_type", "default") == "default"
        and float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) == 1.0
    )


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None): F.linear's


def _linear(module: torch.nn.Linear) -> Linear:
    return module.weight, module.bias


class LeanLlama:
    """Next-token logits of a LlamaForCausalLM's weights, computed on PreallocatedKVCaches."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama LM this lean forward supports")
        config = model.config
        body = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_length = config.max_position_embeddings
        self.scale = self.head_dim**-0.5
        self.token_embedding = body.embed_tokens.weight  # [vocab, hidden]
        self.inv_freq = body.rotary_emb.inv_freq.detach().float()  # [head_dim / 2]
        self.layers = [
            (
                layer.input_layernorm.weight,
                _linear(layer.self_attn.q_proj),
                _linear(layer.self_attn.k_proj),
                _linear(layer.self_attn.v_proj),
                _linear(layer.self_attn.o_proj),
                layer.post_attention_layernorm.weight,
                _linear(layer.mlp.gate_proj),
                _linear(layer.mlp.up_proj),
                _linear(layer.mlp.down_proj),
            )
            for layer in body.layers
        ]
        self.final_norm = body.norm.weight
        self.lm_head = _linear(model.lm_head)

    def new_cache(self) -> PreallocatedKVCache:
        return PreallocatedKVCache(
            len(self.layers), self.kv_heads, self.head_dim, self.max_length, like=self.token_embedding
        )

    def forward(
        self, new_ids: Sequence[int], cache: PreallocatedKVCache, num_rows: int
    ) -> torch.Tensor:  # [num_rows, vocab_size]
        """Appends `new_ids` after the cache's valid positions; logits for the last `num_rows` of them."""
        return self.forward_packed([(new_ids, cache, num_rows)])[0]

    @torch.inference_mode()
    def forward_packed(
        self,
        items: Sequence[tuple[Sequence[int], PreallocatedKVCache, int]],  # (new_ids, cache, num_rows) each
    ) -> list[torch.Tensor]:  # [num_rows, vocab_size] per item
        """`forward` for several sessions in one pass: every matrix product over all their rows at once,
        attention per session over its own cache (see lean_gpt2.LeanGPT2.forward_packed)."""
        packed = Packed.of(items, self.token_embedding.device)
        caches = [cache for _, cache, _ in items]
        x = self.token_embedding[packed.ids]  # [total, hidden]
        cos, sin = self._rotary(packed.positions, x.dtype)  # [total, head_dim] each
        for layer, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(self.layers):
            h = self._rms_norm(x, norm1)
            q = self._rotate(F.linear(h, *q_proj).view(-1, self.heads, self.head_dim), cos, sin)
            k = self._rotate(F.linear(h, *k_proj).view(-1, self.kv_heads, self.head_dim), cos, sin)
            v = F.linear(h, *v_proj).view(-1, self.kv_heads, self.head_dim)
            attended = torch.cat(
                [
                    self._attend(q, k, v, span.offset, span.count, layer, cache, span.start, span.hidden)
                    for span, cache in zip(packed.spans, caches, strict=True)
                ]
            )  # [total, heads * head_dim]
            x = x + F.linear(attended, *o_proj)
            h = self._rms_norm(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, *gate)) * F.linear(h, *up), *down)
        packed.commit(caches)
        h = self._rms_norm(x[packed.logit_rows()], self.final_norm)
        return packed.split(F.linear(h, *self.lm_head).float())  # [num_rows, vocab_size] each

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # [rows, hidden]
        """transformers' LlamaRMSNorm: the statistics in float32, the scale in the model's dtype."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rotary(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [rows, head_dim] each
        freqs = (
            positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        )  # [rows, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rotate(
        x: torch.Tensor,  # [rows, heads, head_dim]
        cos: torch.Tensor,  # [rows, head_dim]
        sin: torch.Tensor,
    ) -> torch.Tensor:  # [rows, heads, head_dim]: transformers' apply_rotary_pos_emb
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    def _attend(
        self,
        q: torch.Tensor,  # [total, heads, head_dim]: every session's rows
        k: torch.Tensor,  # [total, kv_heads, head_dim]
        v: torch.Tensor,
        offset: int,
        count: int,
        layer: int,
        cache: PreallocatedKVCache,
        start: int,
        hidden: torch.Tensor | None,  # [count, start + count] True where a row must not attend
    ) -> torch.Tensor:  # [count, heads * head_dim]
        """One session's attention output, after writing its keys and values at [start, start + count) of the
        layer's cache. Query head h reads key/value head h // groups, as transformers' repeat_kv."""
        end = start + count
        rows = slice(offset, offset + count)
        keys, values = cache.keys[layer], cache.values[layer]  # [kv_heads, capacity, head_dim]
        keys[:, start:end] = k[rows].transpose(0, 1)
        values[:, start:end] = v[rows].transpose(0, 1)
        # [kv_heads, groups * count, head_dim]: the query heads of each key/value head, row-major by group.
        grouped = q[rows].transpose(0, 1).reshape(self.kv_heads, self.groups * count, self.head_dim)
        scores = (
            torch.bmm(grouped, keys[:, :end].transpose(1, 2)) * self.scale
        )  # [kv_heads, groups*count, end]
        if hidden is not None:
            scores = scores.view(self.kv_heads, self.groups, count, end).masked_fill(hidden, float("-inf"))
            scores = scores.view(self.kv_heads, self.groups * count, end)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attended = torch.bmm(weights, values[:, :end])  # [kv_heads, groups * count, head_dim]
        return attended.view(self.heads, count, self.head_dim).transpose(0, 1).reshape(count, -1)
