"""Structured output (`SamplingParams.output_regex`): the output must match a regular expression, shared by
the draft (q) and the target (p).

The regular expression (a JSON schema, a choice or a regex as the client gave it, compiled to one by the
coordinator: coordinator/structured_requests.py) is compiled with the tokenizer's vocabulary into a token
automaton by outlines-core (the engine TGI's grammars and vLLM's "outlines" backend use): a state per prefix
of a match, the tokens allowed in each, the next state after each. At a row, every token that cannot continue
a match of the output so far is -inf; where the output matches in full and cannot grow, end-of-sequence is
all that is left, so the request ends there.

The output is the session's history from `SamplingParams.output_start` on. In a verify pass, row i follows
history + block[:i], so each row is masked by the state after the draft tokens before it, as plain decoding
would be at that position: a draft token outside its row's mask has p = 0 and is never accepted, and the rows
after it (never reached) are left unmasked. Ids the automaton does not know (special tokens but the
end-of-sequence) are never allowed. Torch and outlines-core only.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from outlines_core import Index, Vocabulary
from transformers import PreTrainedTokenizerBase

from specpipe.errors import InvalidArgumentError, SpecpipeError
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.token_bytes import token_bytes_vocabulary
from specpipe.sampling.vocab_ids import ids_in_vocab

__all__ = ["OutputAutomata"]

MAX_CACHED_AUTOMATA = 64  # each holds a state table over the vocabulary: up to a few MB for a JSON schema
MAX_REMEMBERED_WALKS = 4096  # sessions; each holds its output's token ids
MAX_CACHED_MASKS = 1024  # [vocab_size] bool each: 128 MB at most for a 128k vocabulary
ENDED = -1  # the state after end-of-sequence (outlines-core's states are >= 0)


@dataclass(frozen=True, slots=True)
class _Walk:
    """A session's output as last walked, and the state after it."""

    regex: str
    output: tuple[int, ...]
    state: int


class OutputAutomata:
    """A worker's (or the coordinator's) automata, one per regular expression, built from its tokenizer's
    vocabulary on first use and kept for the next requests (LRU), with the token mask of each state met.

    A match ends with the tokenizer's end-of-sequence token: the draft and the target share the tokenizer
    (the coordinator pairs them by its fingerprint), so their masks agree; the models' generation configs
    may list other EOS ids, and need not agree."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._vocabulary: Vocabulary | None = None
        self._automata: OrderedDict[str, Index] = OrderedDict()
        # The mask of a state: [vocab_size] bool, by (regex, state, vocab_size, device). A state in a JSON
        # string allows most of the vocabulary: its list of ids costs ~4 ms to turn into a tensor at 50k.
        self._masks: OrderedDict[tuple[str, int, int, str], torch.Tensor] = OrderedDict()
        # Builds in progress, so concurrent requests for one regex wait for one build rather than each run
        # it (the coordinator builds on worker threads; a worker, on its model thread).
        self._building: dict[str, concurrent.futures.Future[Index]] = {}
        self._walks: OrderedDict[str, _Walk] = OrderedDict()  # each session's last walk (LRU)
        self._lock = threading.Lock()

    @property
    def ends(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({eos})

    def check_output(self, regex: str, output: Sequence[int]) -> None:
        """INVALID_ARGUMENT where a session's committed output leaves the automaton of `regex` (a resumed
        request asking for another constraint than its output was made under)."""
        automaton = self.automaton(regex)
        state, walked = _walk(automaton, automaton.get_initial_state(), output, self.ends)
        if state is None:
            raise InvalidArgumentError(
                f"sampling.output_regex: the session's output so far leaves it at its token {walked}"
            )

    def is_built(self, regex: str) -> bool:
        with self._lock:
            return regex in self._automata

    def automaton(self, regex: str) -> Index:
        """The token automaton of `regex`; INVALID_ARGUMENT where it is malformed or no token sequence of the
        vocabulary can match it."""
        with self._lock:
            found = self._automata.get(regex)
            if found is not None:
                self._automata.move_to_end(regex)
                return found
            building = self._building.get(regex)
            owner = building is None
            if building is None:
                building = self._building[regex] = concurrent.futures.Future()
        if not owner:
            return building.result()  # raises the owner's error too
        # The owner resolves the future and clears the entry whatever happens (an error of any kind, a
        # panic outlines-core raises as a BaseException): a waiter must never wait on a build that is gone.
        try:
            built = Index(regex, self._token_vocabulary())
        except (SpecpipeError, KeyboardInterrupt, SystemExit) as exc:
            building.set_exception(exc)
            raise
        except BaseException as exc:  # outlines-core's errors (ValueError..., a Rust panic) name the problem
            error = InvalidArgumentError(f"sampling.output_regex: {type(exc).__name__}: {exc}")
            building.set_exception(error)
            raise error from None
        else:
            with self._lock:
                self._cache(regex, built)
            building.set_result(built)
            return built
        finally:
            with self._lock:
                del self._building[regex]

    def _token_vocabulary(self) -> Vocabulary:
        with self._lock:
            vocabulary = self._vocabulary
        if vocabulary is None:
            # The same for every caller: a race only builds it twice.
            vocabulary = token_bytes_vocabulary(self.tokenizer)
            with self._lock:
                self._vocabulary = vocabulary
        return vocabulary

    def _cache(self, regex: str, built: Index) -> None:
        """Keeps a built automaton, dropping the least recently used one and its states' masks (under the
        lock)."""
        self._automata[regex] = built
        if len(self._automata) > MAX_CACHED_AUTOMATA:
            evicted, _ = self._automata.popitem(last=False)
            for key in [key for key in self._masks if key[0] == evicted]:
                del self._masks[key]

    def mask(
        self,
        logits: torch.Tensor,  # [n, vocab_size]: row i scores the position after history + block[:i]
        history: Sequence[int],
        block: Sequence[int],  # at least n - 1 tokens
        sampling: SamplingParams,
        session_id: str = "",  # where given, the state after the output is walked on from the session's last
    ) -> torch.Tensor:  # [n, vocab_size] float32, a new tensor
        """Every row's logits with the tokens that cannot continue a match of the output before it at -inf."""
        regex = sampling.output_regex
        automaton = self.automaton(regex)
        ends = self.ends
        state = self._state_after_output(automaton, regex, history, sampling.output_start, session_id)
        scores = logits.to(torch.float32).clone()
        vocab_size = scores.shape[-1]
        for row in range(scores.shape[0]):
            if row > 0 and state is not None and len(history) + row - 1 >= sampling.output_start:
                state = _next_state(automaton, state, block[row - 1], ends)
            if state is None:
                # A draft token the automaton forbids came before this row: it has p = 0 and is never
                # accepted, so this row is never reached. Left unmasked.
                continue
            allowed = self._state_mask(regex, automaton, state, vocab_size, scores.device)
            scores[row] = scores[row].masked_fill(~allowed, float("-inf"))
        return scores

    def _state_after_output(
        self, automaton: Index, regex: str, history: Sequence[int], output_start: int, session_id: str
    ) -> int | None:
        """The state after history[output_start:]. A session's last walk is remembered: the next call (its
        next draft step, its next verify) walks only the tokens since, where the output still starts with the
        walked ones; the state depends on those tokens only, so any match is right. (A walk from the start
        costs ~0.45 ms at 2000 tokens, at every draft step and verify.)"""
        output = tuple(history[output_start:])
        state = automaton.get_initial_state()
        start = 0
        with self._lock:
            walk = self._walks.get(session_id) if session_id else None
            if walk is not None:
                self._walks.move_to_end(session_id)
        if walk is not None and walk.regex == regex and output[: len(walk.output)] == walk.output:
            start, state = len(walk.output), walk.state
        state, _ = _walk(automaton, state, output[start:], self.ends)
        if state is None:
            # A history that assumes a draft token the automaton forbids (a block drafted or verified ahead of
            # the verdict on the one before, which holds a token from a row the masks left empty): it is never
            # committed, so its rows are never reached. (A committed output always fits: the coordinator
            # checks a resumed one, OutputAutomata.check_output.) Left unmasked.
            return None
        if session_id:
            with self._lock:
                self._walks[session_id] = _Walk(regex, output, state)
                if len(self._walks) > MAX_REMEMBERED_WALKS:
                    self._walks.popitem(last=False)
        return state

    def _state_mask(
        self, regex: str, automaton: Index, state: int, vocab_size: int, device: torch.device
    ) -> torch.Tensor:  # [vocab_size] bool, on `device`
        key = (regex, state, vocab_size, str(device))
        with self._lock:
            found = self._masks.get(key)
            if found is not None:
                self._masks.move_to_end(key)
                return found
        ends = self.ends
        if state == ENDED:
            ids = list(ends)
        else:
            ids = [t for t in automaton.get_allowed_tokens(state) if t not in ends]
            if automaton.is_final_state(state):
                ids.extend(ends)
        allowed = torch.zeros(vocab_size, dtype=torch.bool)  # [vocab_size]
        allowed[ids_in_vocab(ids, vocab_size)] = True
        allowed = allowed.to(device)
        with self._lock:
            self._masks[key] = allowed
            if len(self._masks) > MAX_CACHED_MASKS:
                self._masks.popitem(last=False)
        return allowed


def _walk(
    automaton: Index, state: int, tokens: Sequence[int], ends: frozenset[int]
) -> tuple[int | None, int]:
    """The state after `tokens` from `state`, and how many of them it walked: all, or up to the first the
    automaton forbids (the state then None)."""
    for walked, token_id in enumerate(tokens):
        after = _next_state(automaton, state, token_id, ends)
        if after is None:
            return None, walked
        state = after
    return state, len(tokens)


def _next_state(automaton: Index, state: int, token_id: int, ends: frozenset[int]) -> int | None:
    """The state after `token_id`; None where the automaton forbids it. An end token, allowed where a match
    is complete, leads to ENDED: a draft drafting past the end of the output (pipelined, on the assumption
    that its block is accepted), or a request that ignores EOS, goes on with end tokens only."""
    if state == ENDED:
        return ENDED if token_id in ends else None
    if token_id in ends:
        return ENDED if automaton.is_final_state(state) else None
    return automaton.get_next_state(state, token_id)
