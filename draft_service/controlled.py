"""A draft with a chosen acceptance rate, for profiling the pipeline on targets no trained draft matches.

Issue 4 asks for the benchmark on a GPU with a large target, for example a randomly initialised 7B-shaped
Llama "for cost profiling with a controlled-acceptance draft": a random draft agrees with a random target
almost never, so speculation there would measure nothing but rejections. This drafter runs the draft model's
forwards as usual (so drafting costs what it costs) and then proposes, for each greedy position, the
target's own token with probability `acceptance` and a different token otherwise. The target's tokens come
from a reference file: each prompt with its plain greedy continuation through the target, which
`specpipe bench latency --controlled-acceptance A` computes before it starts the workers.

Whether a position is a hit is a pure function of (seed, reference, position), so runs repeat exactly, and
since the target stops checking a block at its first rejection, every verified position is one independent
trial: the acceptance per draft token is `acceptance`, and E(k) = (1 - a^(k+1)) / (1 - a) (Leviathan et al.).
The target still verifies every block: outputs are the target's own whatever the draft proposes. Histories
that are not in the file (another prompt, or past the end of its continuation) get the model's own argmax.
Sampled requests are drafted by the model as usual.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

PREFIX_KEY_TOKENS = 16  # references are indexed by their first tokens, then compared in full


class ReferenceContinuations:
    """Token sequences (a prompt and its target's greedy continuation), found by a history they extend."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.sequences = [list(s) for s in sequences if s]
        self._by_prefix: dict[tuple[int, ...], list[int]] = {}
        for index, sequence in enumerate(self.sequences):
            self._by_prefix.setdefault(tuple(sequence[:PREFIX_KEY_TOKENS]), []).append(index)
        self._last: int | None = None  # the reference the previous lookup found (the same session, mostly)

    @classmethod
    def from_file(cls, path: str | Path) -> ReferenceContinuations:
        """A JSON list of token id lists."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: no such file") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        if not isinstance(data, list) or not all(
            isinstance(s, list) and all(isinstance(t, int) for t in s) for s in data
        ):
            raise ValueError(f"{path}: expected a JSON list of token id lists")
        return cls(data)

    def find(self, history: Sequence[int]) -> int | None:
        """The index of a reference that `history` is a prefix of and that goes on after it, or None."""
        if self._last is not None and self._extends(self._last, history):
            return self._last
        if len(history) >= PREFIX_KEY_TOKENS:
            candidates: Sequence[int] = self._by_prefix.get(tuple(history[:PREFIX_KEY_TOKENS]), ())
        else:
            candidates = range(len(self.sequences))  # shorter than the index key: every reference
        for index in candidates:
            if self._extends(index, history):
                self._last = index
                return index
        return None

    def _extends(self, index: int, history: Sequence[int]) -> bool:
        sequence = self.sequences[index]
        return len(sequence) > len(history) and sequence[: len(history)] == list(history)


class ControlledAcceptance:
    """The drafter's greedy steer (`ModelDrafter.steer`): at each position a reference covers, the target's
    token with probability `acceptance`, else another one; elsewhere the model's own argmax."""

    def __init__(self, references: ReferenceContinuations, acceptance: float, vocab_size: int, seed: int = 0):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.references = references
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.seed = seed

    def hit(self, reference: int, position: int) -> bool:
        """Whether the draft proposes the target's token at `position` of `reference`: a keyed uniform draw
        below `acceptance`, the same in every run."""
        digest = hashlib.blake2b(f"{self.seed}:{reference}:{position}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64 < self.acceptance

    def __call__(self, history: Sequence[int], model_token: int) -> int:
        reference = self.references.find(history)
        if reference is None:
            return model_token
        position = len(history)
        target_token = self.references.sequences[reference][position]
        if self.hit(reference, position):
            return target_token
        return (target_token + 1) % self.vocab_size  # any other token: the target rejects it
