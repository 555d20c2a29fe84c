"""A Hugging Face causal LM behind a per-session KV cache: the only place workers touch the model."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from specpipe.runtime import lean_gpt2, lean_llama
from specpipe.runtime.graphed_forward import GraphedForward, SlotKVCache
from specpipe.runtime.kv_cache import (
    MIN_SHARED_PREFIX,
    SessionKV,
    SessionKVCacheStore,
    common_prefix_length,
    copy_prefix,
    copyable,
)

if TYPE_CHECKING:
    from specpipe.config import WorkerConfig

logger = logging.getLogger(__name__)
# The torch thread count set on each thread by a runner (CausalLMRunner._use_torch_threads).
_THREADS_APPLIED = threading.local()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_argument(model: torch.nn.Module) -> str:
    """The name of the KV-cache argument of the model's forward: transformers 5.x renamed `past_key_values`
    to `cache` (the old name warns from 5.24 on and goes away in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def lean_forward_for(model: torch.nn.Module) -> lean_gpt2.LeanGPT2 | lean_llama.LeanLlama | None:
    """The lean forward of the model's architecture (GPT-2, Llama), or None: transformers' forward then."""
    if lean_gpt2.supports(model):
        return lean_gpt2.LeanGPT2(model)
    if lean_llama.supports(model):
        return lean_llama.LeanLlama(model)
    return None


def in_vocab(token_ids: Collection[int], vocab_size: int) -> bool:
    """Every id in [0, vocab_size): min and max run at C speed over the whole history of every call."""
    return not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size)


@dataclass(frozen=True, slots=True)
class ForwardResult:
    logits: torch.Tensor  # [num_rows, vocab_size] float32, on the CPU
    cached_tokens: int  # positions reused from the session's cache
    forward_ns: int


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """What `CausalLMRunner.decode` did: its tokens went to the caller's `next_token`."""

    cached_tokens: int  # positions reused from the session's cache by the first step
    forward_ns: int  # the steps' model time and the cache bookkeeping, not the time in next_token


class CausalLMRunner:
    """Computes next-token logits for a session's token ids, reusing its KV cache for the shared prefix.

    Not thread-safe: the worker runs every call on one model thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_context: int,
        max_cached_sessions: int,
        max_cache_bytes: int = 0,
        lean_forward: bool = False,
        static_kv_slots: int = 0,
        cuda_graphs: bool = True,
        prefix_sharing: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.caches = SessionKVCacheStore(max_cached_sessions, max_cache_bytes)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # The lean path where asked for and the architecture has one (else transformers' forward); over static
        # KV slots, with CUDA graphs on a GPU, where static_kv_slots asks for that.
        lean = lean_forward_for(model) if lean_forward or static_kv_slots else None
        self.lean: lean_gpt2.LeanGPT2 | lean_llama.LeanLlama | GraphedForward | None = lean
        if static_kv_slots:
            if lean is None:
                name = type(model).__name__
                raise ValueError(f"static KV slots need a lean forward (GPT-2, Llama), not {name}")
            self.lean = GraphedForward(lean, static_kv_slots, max_context, cuda_graphs=cuda_graphs)
        # A new history starts from another session's cached prefix where one holds it (kv_cache.py); not over
        # static KV slots, whose caches are slots of one buffer.
        self._cache_kwarg = cache_argument(model)
        self.prefix_sharing = prefix_sharing and not static_kv_slots and copyable(self._new_cache())
        if prefix_sharing and not static_kv_slots and not self.prefix_sharing:
            logger.info("prefix sharing off: %s's caches cannot be copied by prefix", type(model).__name__)
        # Only the last num_rows positions need logits: on a prefill the LM head over every prompt position
        # is ~10% of the forward. Architectures without the argument compute them all and we slice.
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Called with each forward's duration in ns (the worker's metrics), on the thread that ran it.
        self.forward_observer: Callable[[int], None] | None = None
        # torch intra-op threads for this runner's forwards (0: torch's default), applied on each thread that
        # runs one (`_use_torch_threads`).
        self.torch_threads = 0

    def _use_torch_threads(self) -> None:
        """Applies `torch_threads` on the calling thread, once per thread. torch.set_num_threads reaches only
        the thread that calls it for the BLAS/OpenMP kernels of a matrix product: a worker's other threads (a
        direct stream's, its event loop) ran their forwards' products on every core, whatever --threads said
        (docs/benchmarks.md, run 29: +0.4-2.2% tokens/s on the demo pair once fixed)."""
        if self.torch_threads and getattr(_THREADS_APPLIED, "count", 0) != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
            _THREADS_APPLIED.count = self.torch_threads

    @classmethod
    def from_config(cls, config: WorkerConfig) -> CausalLMRunner:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        runner = cls.load(
            config.model_path,
            config.device,
            config.dtype,
            config.max_cached_sessions,
            config.max_context,
            max_cache_bytes=config.max_cache_bytes,
            lean_forward=config.lean_forward,
            static_kv_slots=config.static_kv_slots,
            cuda_graphs=config.cuda_graphs,
            prefix_sharing=config.prefix_sharing,
        )
        runner.torch_threads = config.torch_threads
        runner.capture_graphs()  # a worker's: before it serves
        return runner

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        device: str,
        dtype: str,
        max_cached_sessions: int,
        max_context: int = 0,
        max_cache_bytes: int = 0,
        lean_forward: bool = False,
        static_kv_slots: int = 0,
        cuda_graphs: bool = True,
        prefix_sharing: bool = True,
    ) -> CausalLMRunner:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        started = time.perf_counter()
        # A local directory never touches a hub; anything else is a hub id, fetched where the network allows
        # (and from the local cache with HF_HUB_OFFLINE=1).
        local = Path(model_path).is_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype], local_files_only=local)
        model = model.to(device).eval()
        model_context = int(
            getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0)
        )
        context = min(max_context, model_context) if max_context and model_context else model_context
        logger.info("loaded %s on %s/%s in %.1fs", model_path, device, dtype, time.perf_counter() - started)
        runner = cls(
            model,
            tokenizer,
            str(model_path),
            context or max_context,
            max_cached_sessions,
            max_cache_bytes,
            lean_forward=lean_forward,
            static_kv_slots=static_kv_slots,
            cuda_graphs=cuda_graphs,
            prefix_sharing=prefix_sharing,
        )
        if isinstance(runner.lean, GraphedForward):
            graphed = runner.lean
            logger.info(
                "forward: %s over %d static KV slots of %d positions (%.1f MiB), %s",
                type(graphed.model).__name__,
                graphed.pool.slots,
                graphed.capacity,
                graphed.pool.nbytes / 2**20,
                "CUDA graphs" if graphed.cuda_graphs else "eager",
            )
        elif lean_forward:
            logger.info(
                "forward: %s",
                type(runner.lean).__name__ if runner.lean else "transformers (no lean path for it)",
            )
        return runner

    def capture_graphs(self) -> int:
        """With static KV slots on a GPU: captures the CUDA graphs of the first context bucket before serving
        (see GraphedForward.capture_first_bucket); the graphs captured, 0 otherwise."""
        if not isinstance(self.lean, GraphedForward):
            return 0
        started = time.perf_counter()
        captured = self.lean.capture_first_bucket()
        if captured:
            logger.info("captured %d CUDA graphs in %.1fs", captured, time.perf_counter() - started)
        return captured

    def in_vocab(self, token_ids: Sequence[int]) -> bool:
        return in_vocab(token_ids, self.vocab_size)

    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]

    @torch.inference_mode()
    def forward(self, session_id: str, token_ids: Sequence[int], num_rows: int) -> ForwardResult:
        """Logits predicting the tokens after each of the last `num_rows` positions of `token_ids`.

        Row i of the result is the distribution over the token at position len(token_ids) - num_rows + i + 1.
        Afterwards the session's cache holds all of `token_ids`.
        """
        self._use_torch_threads()
        started = time.perf_counter_ns()
        ids, entry, reuse = self._reuse_cache(session_id, token_ids, num_rows)
        try:
            logits = self._logits(ids[reuse:], entry.past, num_rows)
        except BaseException:
            self.caches.release(session_id)  # a failed forward may have left the cache half-updated
            raise
        entry.token_ids = ids
        self.caches.account(session_id)
        forward_ns = time.perf_counter_ns() - started
        if self.forward_observer is not None:
            self.forward_observer(forward_ns)
        return ForwardResult(logits, reuse, forward_ns)

    @torch.inference_mode()
    def decode(
        self, session_id: str, token_ids: Sequence[int], steps: int, next_token: Callable[[torch.Tensor], int]
    ) -> DecodeResult:
        """`steps` autoregressive steps after `token_ids`: each step's logits [1, vocab_size] go to
        `next_token`, whose answer the next step feeds. Afterwards the cache holds `token_ids` and every token
        but the last (which was never fed).

        The same as `steps` calls of `forward` with the history grown by a token each, without their per-call
        bookkeeping (the history's copy and prefix match, the cache's accounting): one draft step of the demo
        draft is ~0.55 ms, and that bookkeeping was ~13% of it in process (6 steps: 3.36 against 3.86 ms).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._use_torch_threads()
        started = time.perf_counter_ns()
        ids, entry, reuse = self._reuse_cache(session_id, token_ids, 1)
        feed = ids[reuse:]
        chosen: list[int] = []
        in_next_token_ns = 0
        try:
            for _ in range(steps):
                step_started = time.perf_counter_ns()
                logits = self._logits(feed, entry.past, 1)  # [1, vocab_size]
                chose_at = time.perf_counter_ns()
                if self.forward_observer is not None:
                    self.forward_observer(chose_at - step_started)
                feed = [next_token(logits)]
                chosen.append(feed[0])
                in_next_token_ns += time.perf_counter_ns() - chose_at
        except BaseException:
            self.caches.release(session_id)  # a failed step may have left the cache half-updated
            raise
        entry.token_ids = [*ids, *chosen[:-1]]
        self.caches.account(session_id)
        return DecodeResult(reuse, time.perf_counter_ns() - started - in_next_token_ns)

    def _logits(
        self, new_ids: Sequence[int], past: Any, num_rows: int
    ) -> torch.Tensor:  # [num_rows, vocab_size] float32 on the CPU
        """The forward of `new_ids` after the positions `past` (the session's cache) holds, which then holds
        them too."""
        if self.lean is not None:
            return self.lean.forward(new_ids, past, num_rows).cpu()
        ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self.device)  # [1, n_new]
        kwargs: dict[str, object] = {self._cache_kwarg: past}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = num_rows
        out = self.model(input_ids=ids, use_cache=True, **kwargs)
        return out.logits[0, -num_rows:, :].float().cpu()

    @property
    def packs_sessions(self) -> bool:
        """Whether `forward_many` runs several sessions in one pass (else it runs them one by one)."""
        return self.lean is not None and not isinstance(self.lean, GraphedForward)

    @torch.inference_mode()
    def forward_many(self, calls: Sequence[tuple[str, Sequence[int], int]]) -> list[ForwardResult]:
        """`forward` of several sessions (distinct ids), each a (session_id, token_ids, num_rows), in one pass
        where the model has a packed forward (`packs_sessions`). Each result's forward_ns is the whole pass:
        the time its session waited for its logits."""
        if not self.packs_sessions or len(calls) == 1:
            return [self.forward(*call) for call in calls]
        if len({session_id for session_id, _, _ in calls}) != len(calls):
            raise ValueError("forward_many takes each session at most once")
        self._use_torch_threads()
        started = time.perf_counter_ns()
        prepared = [self._reuse_cache(*call) for call in calls]
        assert self.lean is not None and not isinstance(self.lean, GraphedForward)
        try:
            logits = self.lean.forward_packed(
                [
                    (ids[reuse:], entry.past, num_rows)
                    for (ids, entry, reuse), (_, _, num_rows) in zip(prepared, calls, strict=True)
                ]
            )  # [num_rows, vocab_size] each
        except BaseException:
            for session_id, _, _ in calls:
                self.caches.release(session_id)
            raise
        for (session_id, _, _), (ids, entry, _) in zip(calls, prepared, strict=True):
            entry.token_ids = ids
            self.caches.account(session_id)
        forward_ns = time.perf_counter_ns() - started
        if self.forward_observer is not None:
            self.forward_observer(forward_ns)
        return [
            ForwardResult(rows.cpu(), reuse, forward_ns)
            for rows, (_, _, reuse) in zip(logits, prepared, strict=True)
        ]

    def _reuse_cache(
        self, session_id: str, token_ids: Sequence[int], num_rows: int
    ) -> tuple[list[int], SessionKV, int]:
        """The ids, the session's cache entry cropped to the prefix it shares with them, and that prefix's
        length: the positions the forward need not compute again."""
        ids = list(token_ids)
        if not 1 <= num_rows <= len(ids):
            raise ValueError(f"num_rows must be in [1, {len(ids)}], got {num_rows}")
        entry = self.caches.get_or_create(session_id)
        # The last num_rows positions must be fed to get their logits, so they are never reused.
        reuse = min(common_prefix_length(entry.token_ids, ids), len(ids) - num_rows)
        if entry.past is not None:
            # A static KV slot another session has taken over reads as empty: rebuilt from the history.
            reuse = min(reuse, entry.past.get_seq_length())
        limit = len(ids) - num_rows
        if self.prefix_sharing and limit - reuse >= MIN_SHARED_PREFIX:  # a prefill: is it cached elsewhere?
            shared = self.caches.shared_prefix(session_id, ids, reuse, limit)
            if shared is not None:
                donor, length = shared
                copy = copy_prefix(donor.past, length, len(ids), self._new_cache)
                if copy is not None:  # the session's own cache goes: the copy holds more of the history
                    self.caches.count_shared(length - reuse)
                    entry.past, entry.token_ids = copy, ids[:length]
                    return ids, entry, length
        if isinstance(entry.past, SlotKVCache) and entry.past.owned and reuse == 0:
            entry.past.crop(0)  # a new history for the session: it keeps its slot
        elif entry.past is None or reuse == 0:
            entry.past = self._new_cache()
            reuse = 0
        elif entry.past.get_seq_length() > reuse:
            entry.past.crop(reuse - entry.past.get_seq_length())  # negative: drop that many positions
        entry.token_ids = ids[:reuse]
        return ids, entry, reuse

    def _new_cache(self) -> Any:
        return self.lean.new_cache() if self.lean else DynamicCache(config=self.model.config)
