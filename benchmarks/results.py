"""What one timed variant produced: tokens, wall time, forward counts and times (plain data, no math)."""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY = "greedy"
SAMPLE = "sample"


@dataclass(frozen=True, slots=True)
class Mode:
    """A decoding mode: greedy (temperature 0) or sampling at `temperature` with seed base + prompt index."""

    name: str
    temperature: float
    seed_base: int = 1000
    top_p: float = 1.0  # nucleus sampling (1.0: off)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def seed(self, prompt_index: int) -> int:
        return self.seed_base + prompt_index


@dataclass(slots=True)
class VariantRun:
    """Totals over all prompts of one variant in one mode."""

    variant: str
    mode: str
    family: str  # "plain", "hf" or "specpipe"
    description: str
    outputs: list[list[int]] = field(default_factory=list)
    wall_s: float = 0.0
    target_passes: int = 0
    drafted: int | None = None  # None where the variant has no draft model (or it cannot be counted)
    accepted: int | None = None
    target_forward_s: float = 0.0
    draft_forward_s: float = 0.0
    threads: int = 1
    pipelined: bool = False  # specpipe drafting the next block during the verify
    drafter: str = "model"  # specpipe: "prompt-lookup" drafts without a model (no draft forward, no prefill)
    error: str = ""
    # Background load accumulated over the timed calls (benchmarks.cpu): other processes' CPU seconds,
    # hypervisor steal seconds, and the wall seconds they were measured over.
    background_other_s: float = 0.0
    background_steal_s: float = 0.0
    background_wall_s: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    def add_background(self, other_s: float, steal_s: float, wall_s: float) -> None:
        self.background_other_s += other_s
        self.background_steal_s += steal_s
        self.background_wall_s += wall_s

    def background_cores(self) -> tuple[float, float] | None:
        """(other processes, steal) in cores on average over the timed calls; None if not measured."""
        if self.background_wall_s <= 0:
            return None
        return (
            self.background_other_s / self.background_wall_s,
            self.background_steal_s / self.background_wall_s,
        )
