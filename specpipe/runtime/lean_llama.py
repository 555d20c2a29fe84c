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

from collections.abc import Callable, Sequence

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
        # [head_dim / 2], on the weights' device: a captured CUDA graph may not copy it there.
        self.inv_freq = body.rotary_emb.inv_freq.detach().float().to(self.token_embedding.device)
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

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head_dim) of the cache."""
        return len(self.layers), self.kv_heads, self.head_dim

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

        def attend(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
        ) -> torch.Tensor:  # [total, heads * head_dim]
            return torch.cat(
                [
                    self._attend(q, k, v, span.offset, span.count, layer, cache, span.start, span.hidden)
                    for span, cache in zip(packed.spans, caches, strict=True)
                ]
            )

        x = self._layers(self.token_embedding[packed.ids], packed.positions, attend)  # [total, hidden]
        packed.commit(caches)
        return packed.split(self._logits(x[packed.logit_rows()]))  # [num_rows, vocab_size] each

    @torch.inference_mode()
    def static_forward(
        self,
        ids: torch.Tensor,  # [count] new token ids
        positions: torch.Tensor,  # [count] their positions
        hidden: torch.Tensor,  # [count, key_len] True where a row must not attend
        keys: Sequence[torch.Tensor],  # per layer [kv_heads, capacity, head_dim], capacity >= key_len
        values: Sequence[torch.Tensor],
        logit_rows: int,
    ) -> torch.Tensor:  # [logit_rows, vocab_size] float32
        """Llama's `StaticForwardModel.static_forward` (specpipe/runtime/graphed_forward.py)."""
        key_len = hidden.shape[1]

        def attend(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
        ) -> torch.Tensor:  # [count, heads * head_dim]
            keys[layer].index_copy_(1, positions, k.transpose(0, 1))
            values[layer].index_copy_(1, positions, v.transpose(0, 1))
            return self._attention(q, keys[layer][:, :key_len], values[layer][:, :key_len], hidden)

        rows = self._layers(self.token_embedding[ids], positions, attend)  # [count, hidden]
        return self._logits(rows[rows.shape[0] - logit_rows :])

    def _layers(
        self,
        x: torch.Tensor,  # [rows, hidden]: the embedded new rows
        positions: torch.Tensor,  # [rows]
        attend: Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor
        ],  # (q [rows, heads, head_dim], k, v [rows, kv_heads, head_dim], layer) -> [rows, heads * head_dim]
    ) -> torch.Tensor:  # [rows, hidden]
        """The decoder layers over the new rows; `attend` is the attention over the cache(s)."""
        cos, sin = self._rotary(positions, x.dtype)  # [rows, head_dim] each
        for layer, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(self.layers):
            h = self._rms_norm(x, norm1)
            q = self._rotate(F.linear(h, *q_proj).view(-1, self.heads, self.head_dim), cos, sin)
            k = self._rotate(F.linear(h, *k_proj).view(-1, self.kv_heads, self.head_dim), cos, sin)
            v = F.linear(h, *v_proj).view(-1, self.kv_heads, self.head_dim)
            x = x + F.linear(attend(q, k, v, layer), *o_proj)
            h = self._rms_norm(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, *gate)) * F.linear(h, *up), *down)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, vocab_size] float32
        return F.linear(self._rms_norm(x, self.final_norm), *self.lm_head).float()

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # [rows, hidden]
        """transformers' LlamaRMSNorm: the statistics in float32, the scale in the model's dtype."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rotary(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [rows, head_dim] each
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [rows, head_dim / 2]
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
        return self._attention(q[rows], keys[:, :end], values[:, :end], hidden)

    def _attention(
        self,
        q: torch.Tensor,  # [count, heads, head_dim]: one session's new rows
        keys: torch.Tensor,  # [kv_heads, key_len, head_dim]: its cache, the new rows' keys included
        values: torch.Tensor,
        hidden: torch.Tensor | None,  # [count, key_len] True where a row must not attend; None: sees all
    ) -> torch.Tensor:  # [count, heads * head_dim]
        count, key_len = q.shape[0], keys.shape[1]
        # [kv_heads, groups * count, head_dim]: the query heads of each key/value head, row-major by group.
        grouped = q.transpose(0, 1).reshape(self.kv_heads, self.groups * count, self.head_dim)
        scores = torch.bmm(grouped, keys.transpose(1, 2)) * self.scale  # [kv_heads, groups*count, key_len]
        if hidden is not None:
            by_group = scores.view(self.kv_heads, self.groups, count, key_len)
            scores = by_group.masked_fill(hidden, float("-inf")).view_as(scores)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attended = torch.bmm(weights, values)  # [kv_heads, groups * count, head_dim]
        return attended.view(self.heads, count, self.head_dim).transpose(0, 1).reshape(count, -1)
