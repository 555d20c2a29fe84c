"""A lean forward for GPT-2-architecture models over a preallocated KV cache, for drafts and batching targets.

A small draft model's forward is almost all framework overhead, not arithmetic: on the 2-core CPU the demo
draft (1 layer x 128) takes 1.39 ms per token through transformers' `GPT2LMHeadModel.forward` and 0.46 ms
here, where each layer is a dozen torch calls on tensors the module already holds (no mask building, no
output dataclasses, no cache objects growing by concatenation). Cheaper drafting is the whole point of a
draft model, so draft workers use this path when the model is a GPT-2 it supports.

The math is GPT-2's (pre-LayerNorm blocks, fused QKV, learned positions, tied LM head); the numbers agree
with transformers' to float rounding (the tanh GELU is fused, and attention reads strided cache views), not
bit for bit. That is fine for a draft, whose proposals never change what the target accepts. A target keeps
transformers' forward unless it batches sessions (`forward_packed` needs this path): its greedy outputs are
tested equal to `transformers` decoding either way (docs/architecture.md, "Cross-session batching").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from specpipe.runtime.packing import INITIAL_CAPACITY, Packed, PreallocatedKVCache, causal_mask

__all__ = ["INITIAL_CAPACITY", "LeanGPT2", "PreallocatedKVCache", "supports"]


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a GPT-2 LM whose forward this module reproduces."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) == "gpt2"
        and type(model).__name__ == "GPT2LMHeadModel"
        and config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        and not config.add_cross_attention
        and not config.scale_attn_by_inverse_layer_idx
        and not config.reorder_and_upcast_attn
        and config.scale_attn_weights
    )


class LeanGPT2:
    """Next-token logits of a GPT2LMHeadModel's weights, computed step by step on a PreallocatedKVCache."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a GPT-2 LM this lean forward supports")
        config = model.config
        self.heads = config.n_head
        self.width = config.n_embd
        self.head_dim = self.width // self.heads
        self.eps = config.layer_norm_epsilon
        self.max_length = config.n_positions
        body = model.transformer
        self.token_embedding = body.wte.weight  # [vocab, width]
        self.position_embedding = body.wpe.weight  # [positions, width]
        self.blocks = [
            (
                (block.ln_1.weight, block.ln_1.bias),
                (block.attn.c_attn.weight, block.attn.c_attn.bias),  # Conv1D: [width, 3 * width]
                (block.attn.c_proj.weight, block.attn.c_proj.bias),
                (block.ln_2.weight, block.ln_2.bias),
                (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
                (block.mlp.c_proj.weight, block.mlp.c_proj.bias),
            )
            for block in body.h
        ]
        self.final_norm = (body.ln_f.weight, body.ln_f.bias)
        # [width, vocab]: a contiguous transposed copy; x @ it is 1.3-1.7x faster than F.linear with the
        # [vocab, width] weight for a few rows on the CPU (one more copy of a draft's LM head in memory).
        self.lm_head_t = model.lm_head.weight.detach().t().contiguous()
        self.scale = self.head_dim**-0.5

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head_dim) of the cache."""
        return len(self.blocks), self.heads, self.head_dim

    def new_cache(self) -> PreallocatedKVCache:
        return PreallocatedKVCache(
            len(self.blocks), self.heads, self.head_dim, self.max_length, like=self.token_embedding
        )

    @torch.inference_mode()
    def forward(
        self,
        new_ids: Sequence[int],
        cache: PreallocatedKVCache,
        num_rows: int,
    ) -> torch.Tensor:  # [num_rows, vocab_size]
        """Appends `new_ids` after the cache's valid positions; logits for the last `num_rows` of them."""
        n = len(new_ids)
        start = cache.length
        end = start + n
        cache.reserve(end)
        device = self.token_embedding.device
        ids = torch.tensor(new_ids, dtype=torch.long, device=device)  # [n]
        x = self.token_embedding[ids] + self.position_embedding[start:end]  # [n, width]
        hidden = causal_mask(n, start, device)  # [n, end] or None
        x = self._layers(x, lambda qkv, layer: self._attend(qkv, layer, cache, start, hidden))
        cache.length = end
        return self._logits(x[n - num_rows :])  # [num_rows, vocab_size]

    @torch.inference_mode()
    def forward_packed(
        self,
        items: Sequence[tuple[Sequence[int], PreallocatedKVCache, int]],  # (new_ids, cache, num_rows) each
    ) -> list[torch.Tensor]:  # [num_rows, vocab_size] per item
        """`forward` for several sessions in one pass.

        The sessions' new rows are packed into one [total, width] matrix, so every layer's matrix products
        read the weights once for all of them (the point of batching); attention runs per session, over its
        own cache. A session's numbers differ from its own `forward` only as any change of the number of rows
        in a matrix product changes them (float rounding: the same difference as verifying a block against
        decoding it token by token).
        """
        if len(items) == 1:
            new_ids, cache, num_rows = items[0]
            return [self.forward(new_ids, cache, num_rows)]
        packed = Packed.of(items, self.token_embedding.device)
        caches = [cache for _, cache, _ in items]

        def attend(qkv: torch.Tensor, layer: int) -> torch.Tensor:  # [total, 3 * width] -> [total, width]
            return torch.cat(
                [
                    self._attend(
                        qkv[span.offset : span.offset + span.count], layer, cache, span.start, span.hidden
                    )
                    for span, cache in zip(packed.spans, caches, strict=True)
                ]
            )

        x = self.token_embedding[packed.ids] + self.position_embedding[packed.positions]  # [total, width]
        x = self._layers(x, attend)
        packed.commit(caches)
        return packed.split(self._logits(x[packed.logit_rows()]))  # [num_rows, vocab_size] each

    @torch.inference_mode()
    def static_forward(
        self,
        ids: torch.Tensor,  # [count] new token ids
        positions: torch.Tensor,  # [count] their positions
        hidden: torch.Tensor,  # [count, key_len] True where a row must not attend
        keys: Sequence[torch.Tensor],  # per layer [heads, capacity, head_dim], capacity >= key_len
        values: Sequence[torch.Tensor],
        logit_rows: int,
    ) -> torch.Tensor:  # [logit_rows, vocab_size] float32
        """GPT-2's `StaticForwardModel.static_forward` (specpipe/runtime/graphed_forward.py)."""
        count, key_len = hidden.shape

        def attend(qkv: torch.Tensor, layer: int) -> torch.Tensor:  # [count, 3 * width] -> [count, width]
            q, k, v = qkv.view(count, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [heads, count, hd]
            keys[layer].index_copy_(1, positions, k)
            values[layer].index_copy_(1, positions, v)
            return self._attention(q, keys[layer][:, :key_len], values[layer][:, :key_len], hidden)

        x = self.token_embedding[ids] + self.position_embedding[positions]  # [count, width]
        return self._logits(self._layers(x, attend)[count - logit_rows :])

    def _layers(
        self,
        x: torch.Tensor,  # [rows, width]: the embedded new rows
        attend: Callable[
            [torch.Tensor, int], torch.Tensor
        ],  # (qkv [rows, 3 * width], layer) -> [rows, width]
    ) -> torch.Tensor:  # [rows, width]
        """The transformer blocks over the new rows; `attend` is the attention over the cache(s)."""
        width = self.width
        for layer, (norm1, attn_in, attn_out, norm2, mlp_in, mlp_out) in enumerate(self.blocks):
            h = F.layer_norm(x, (width,), *norm1, self.eps)
            qkv = torch.addmm(attn_in[1], h, attn_in[0])  # [rows, 3 * width]
            x = x + torch.addmm(attn_out[1], attend(qkv, layer), attn_out[0])
            h = F.layer_norm(x, (width,), *norm2, self.eps)
            h = F.gelu(torch.addmm(mlp_in[1], h, mlp_in[0]), approximate="tanh")  # GPT-2's gelu_new
            x = x + torch.addmm(mlp_out[1], h, mlp_out[0])
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:  # [rows, width] -> [rows, vocab_size] float32
        h = F.layer_norm(x, (self.width,), *self.final_norm, self.eps)
        return (h @ self.lm_head_t).float()

    def _attend(
        self,
        qkv: torch.Tensor,  # [n, 3 * width]: one session's new rows
        layer: int,
        cache: PreallocatedKVCache,
        start: int,
        hidden: torch.Tensor | None,  # [n, start + n] True where a position must not be seen; None for n = 1
    ) -> torch.Tensor:  # [n, width]
        """The attention output of one session's new rows, after writing their keys and values at
        [start, start + n) of the layer's cache."""
        n = qkv.shape[0]
        end = start + n
        q, k, v = qkv.view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # each [heads, n, head_dim]
        keys, values = cache.keys[layer], cache.values[layer]
        keys[:, start:end] = k
        values[:, start:end] = v
        return self._attention(q, keys[:, :end], values[:, :end], hidden)

    def _attention(
        self,
        q: torch.Tensor,  # [heads, n, head_dim]: one session's new rows
        keys: torch.Tensor,  # [heads, key_len, head_dim]: its cache, the new rows' keys included
        values: torch.Tensor,
        hidden: torch.Tensor | None,  # [n, key_len] True where a row must not attend; None: sees all
    ) -> torch.Tensor:  # [n, width]
        # Attention as two batched matmuls: about twice as fast as scaled_dot_product_attention for a
        # few query rows on the CPU.
        scores = torch.baddbmm(
            q.new_empty(()), q, keys.transpose(1, 2), beta=0.0, alpha=self.scale
        )  # [heads, n, key_len]
        if hidden is not None:
            scores.masked_fill_(hidden, float("-inf"))
        attended = torch.bmm(scores.softmax(dim=-1), values)  # [heads, n, head_dim]
        return attended.transpose(0, 1).reshape(q.shape[1], self.width)
