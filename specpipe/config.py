"""Configuration of a model worker (draft or target), built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from specpipe.runtime.model_runner import DTYPES

WORKER_ROLES = ("draft", "target")
DRAFTERS = ("model", "prompt-lookup")  # draft workers: a small causal LM, or model-free prompt lookup


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str
    model_path: str
    host: str = "127.0.0.1"
    port: int = 50061
    device: str = "cpu"
    dtype: str = "float32"
    # Sessions whose KV cache is kept; the least recently used one is evicted (and rebuilt on its next call).
    max_cached_sessions: int = 64
    # Bytes of KV cache kept across sessions (0 = unlimited); least recently used sessions are evicted.
    max_cache_bytes: int = 0
    # 0 = the model's own context length.
    max_context: int = 0
    # The largest k a draft worker accepts in one Propose call.
    max_draft_tokens: int = 32
    # torch intra-op threads; 0 = torch's default. Small models on shared CPUs run best with 1.
    torch_threads: int = 0
    # The lean forward (specpipe/runtime/lean_gpt2.py) where the architecture has one. The CLI turns it on
    # for drafts; targets keep transformers' forward, whose numbers greedy outputs must equal exactly.
    lean_forward: bool = False
    # KV caches of this many sessions in preallocated slots, forwards with static shapes over them
    # (specpipe/runtime/graphed_forward.py; 0 = off), replayed as CUDA graphs on a GPU unless cuda_graphs is
    # off. A session beyond the slots takes the least recently used one; the other is rebuilt when it returns.
    static_kv_slots: int = 0
    cuda_graphs: bool = True
    # Draft workers: what proposes tokens. "prompt-lookup" loads only the tokenizer and config of model_path
    # (the target's directory will do) and matches n-grams of max_ngram down to min_ngram tokens.
    drafter: str = "model"
    max_ngram: int = 3
    min_ngram: int = 1
    shutdown_grace_s: float = 10.0
    # Targets: the direct-stream listener's port (specpipe/rpc/direct_frames.py); 0 = a free port, -1 = none.
    direct_stream_port: int = -1
    # Prometheus metrics over HTTP (specpipe/rpc/worker_metrics.py); 0 = a free port, -1 = none.
    metrics_port: int = -1
    # Cross-session batching (specpipe/rpc/session_batcher.py): the most sessions one forward pass serves
    # (1 = none: a target verifies, a draft drafts one session per pass), and the most new tokens it takes (a
    # longer request, such as a prefill, runs alone).
    max_batch_sessions: int = 1
    max_batch_tokens: int = 512
    # A new history starts from another session's cached prefix where one holds it (specpipe/runtime/
    # kv_cache.py): a shared system prompt or n completions of one prompt are computed once.
    prefix_sharing: bool = True
    # Draft workers, for cost profiling (draft_service/controlled.py): greedy drafts propose the target's
    # token from reference_file with this probability per position, another token otherwise (None = off).
    controlled_acceptance: float | None = None
    reference_file: str = ""

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {WORKER_ROLES}, got {self.role!r}")
        if not self.model_path:
            raise ValueError("model_path is required")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.max_cached_sessions < 1:
            raise ValueError(f"max_cached_sessions must be >= 1, got {self.max_cached_sessions}")
        if self.max_cache_bytes < 0:
            raise ValueError(f"max_cache_bytes must be >= 0, got {self.max_cache_bytes}")
        if self.max_context < 0:
            raise ValueError(f"max_context must be >= 0, got {self.max_context}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if self.drafter != "model" and self.role != "draft":
            raise ValueError(f"only a draft worker runs a drafter, not a {self.role} worker")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if not -1 <= self.direct_stream_port < 65536:
            raise ValueError(f"direct_stream_port must be in [-1, 65535], got {self.direct_stream_port}")
        if self.direct_stream_port >= 0 and self.role != "target":
            raise ValueError(f"only a target worker serves direct streams, not a {self.role} worker")
        if self.max_batch_sessions < 1 or self.max_batch_tokens < 1:
            raise ValueError(
                f"max_batch_sessions and max_batch_tokens must be >= 1, "
                f"got {self.max_batch_sessions} and {self.max_batch_tokens}"
            )
        if self.static_kv_slots < 0:
            raise ValueError(f"static_kv_slots must be >= 0, got {self.static_kv_slots}")
        if self.static_kv_slots and self.drafter != "model":
            raise ValueError(f"a {self.drafter} drafter runs no model: it has no KV cache to keep in slots")
        if self.static_kv_slots and self.max_batch_sessions > 1:
            raise ValueError("static KV slots run one session per forward: they do not batch sessions")
        if self.max_batch_sessions > 1 and self.drafter != "model":
            raise ValueError(f"a {self.drafter} drafter runs no model: it has no passes to batch")
        if self.controlled_acceptance is not None:
            if self.role != "draft" or self.drafter != "model":
                raise ValueError("controlled acceptance steers a draft model: a draft worker's, with a model")
            if not 0.0 <= self.controlled_acceptance <= 1.0:
                raise ValueError(f"controlled_acceptance must be in [0, 1], got {self.controlled_acceptance}")
            if not self.reference_file:
                raise ValueError("controlled acceptance needs a reference file (the target's continuations)")
        elif self.reference_file:
            raise ValueError("a reference file is only read with controlled acceptance")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
