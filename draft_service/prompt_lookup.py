"""Model-free drafting by prompt lookup (n-gram matching): propose what followed the last n tokens before.

The drafter looks for the most recent earlier occurrence of the history's last n tokens (n from `max_ngram`
down to `min_ngram`: a longer match is a better predictor) and proposes the tokens that followed it, up to k.
Repetitive text (code, edits of a given document, retrieval-augmented prompts) often continues a span it
already contains, and a proposal costs microseconds instead of k draft-model forwards (Saxena 2023,
"Prompt Lookup Decoding"; `prompt_lookup_num_tokens` in Hugging Face, the "ngram" method in vLLM).

Exactness does not depend on where proposals come from: each proposed token is a point mass, q(x) = 1, so the
Leviathan rule accepts it with probability p(x) and resamples from the residual otherwise, and greedy and the
coupled rule compare it with the target's own token. Without a match the proposal is empty and the round
verifies no draft tokens (plain decoding for that round).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from draft_service.drafter import DraftProposal, DraftRequest, validate_request
from specpipe.runtime.kv_cache import SessionKVCacheStore
from specpipe.runtime.model_info import WorkerModelInfo
from specpipe.runtime.tokenizer_files import tokenizer_fingerprint, tokenizer_to_files


def find_continuation(history: Sequence[int], max_ngram: int, min_ngram: int, num_tokens: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the history's last n
    tokens, for the largest n in [min_ngram, max_ngram] that has one; [] if none does."""
    length = len(history)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = list(history[length - n :])
        first = pattern[0]
        # Candidate starts, latest first; the occurrence at the very end (the pattern itself) is excluded.
        for start in range(length - n - 1, -1, -1):
            if history[start] == first and list(history[start : start + n]) == pattern:
                follow = list(history[start + n : start + n + num_tokens])
                if follow:
                    return follow
    return []


@dataclass(frozen=True, slots=True)
class VocabularyInfo:
    """What a model-free drafter knows of the model it drafts for: vocabulary, context, pairing info."""

    model_name: str
    vocab_size: int
    max_context: int
    info: WorkerModelInfo

    @classmethod
    def load(cls, model_path: str | Path, max_context: int = 0) -> VocabularyInfo:
        """The tokenizer, config and generation config of a local model directory; no weights are read."""
        local = Path(model_path).is_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local)
        config = AutoConfig.from_pretrained(model_path, local_files_only=local)
        model_context = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0
        )
        context = min(max_context, model_context) if max_context and model_context else model_context
        context = context or max_context
        try:
            eos = GenerationConfig.from_pretrained(model_path, local_files_only=local).eos_token_id
        except OSError:  # no generation_config.json
            eos = getattr(config, "eos_token_id", None)
        eos_list = [] if eos is None else (list(eos) if isinstance(eos, list | tuple) else [eos])
        vocab_size = int(config.vocab_size)
        info = WorkerModelInfo(
            role="draft",
            model_name=str(model_path),
            vocab_size=vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_context=context,
            dtype="none",
            device="cpu",
            eos_token_ids=tuple(int(e) for e in eos_list),
            drafter=PromptLookupDrafter.name,
            tokenizer_files=tokenizer_to_files(tokenizer),
        )
        return cls(str(model_path), vocab_size, context, info)


class PromptLookupDrafter:
    """Proposes continuations found in the session's own history; holds no per-session state."""

    name = "prompt-lookup"

    def __init__(
        self, vocabulary: VocabularyInfo, max_draft_tokens: int, max_ngram: int, min_ngram: int
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.vocabulary = vocabulary
        self.max_draft_tokens = max_draft_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # Always empty: the worker's cache release and stats RPCs work on it as on a model drafter's caches.
        self.caches = SessionKVCacheStore(max_sessions=1)

    def propose(self, request: DraftRequest) -> DraftProposal:
        vocabulary = self.vocabulary
        validate_request(request, self.max_draft_tokens, vocabulary.vocab_size, vocabulary.max_context)
        started = time.perf_counter_ns()
        tokens = find_continuation(request.token_ids, self.max_ngram, self.min_ngram, request.num_tokens)
        lookup_ns = time.perf_counter_ns() - started  # reported as the "forward": the drafting cost
        sampling = request.sampling
        draft_probs = None
        if tokens and not sampling.is_greedy and sampling.acceptance != "coupled":
            point_mass = torch.ones(1, dtype=torch.float32)  # q(x) = 1 on the proposed token
            draft_probs = [([token], point_mass) for token in tokens]
        return DraftProposal(token_ids=tokens, draft_probs=draft_probs, forward_ns=lookup_ns, cached_tokens=0)
