"""Chained verification: a stream's next block verified without waiting for the coordinator.

The coordinator's pipelined draft prepares block i+1 while the target verifies block i, assuming block i is
accepted whole and guessing its bonus token. Sent to the target as soon as the draft has it (`chained`), the
block is already queued on the stream when verify i ends, so the target starts it at once: a round whose
assumption held costs no coordinator round trip between the two forward passes.

Whether the assumption held is decided here, on the worker, by comparing histories: block i+1 is verified
only if the history it extends is exactly the one verdict i produced (history i + accepted tokens + next
token); else it is skipped without a forward pass and the coordinator redrafts as without chaining. The
verdict of a chained block is the one an ordinary request with the same history and block would get, so
chaining changes when blocks are verified, never what is accepted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from target_service.verifier import Verdict, Verifier, VerifyBlock


@dataclass(slots=True)
class ChainCounters:
    """Per worker: chained requests verified and skipped (reported by GetStats)."""

    verified: int = 0
    skipped: int = 0


class OpenChains:
    """The chains of the streams open now, by session. Releasing a session breaks its chains: a chained block
    still queued behind the release is then skipped, instead of verified with a forward that would rebuild the
    cache just freed (a delegated request stopped by a failure or a client leaving closes its stream normally,
    with such a block possibly queued). A block that is not chained is still verified, so a released chain
    also frees its session's cache when its stream ends (TargetServicer.end_chain). Touched only where the
    chains verify: on the model thread, or on the event loop while that thread is idle."""

    def __init__(self) -> None:
        self._by_session: defaultdict[str, set[VerifyChain]] = defaultdict(set)

    def track(self, chain: VerifyChain) -> None:
        self._by_session[chain.session_id].add(chain)

    def forget(self, chain: VerifyChain) -> None:
        chains = self._by_session.get(chain.session_id)
        if chains is not None:
            chains.discard(chain)
            if not chains:
                del self._by_session[chain.session_id]

    def break_session(self, session_id: str) -> None:
        for chain in self._by_session.get(session_id, ()):
            chain.after_last = None
            chain.released = True


class VerifyChain:
    """One stream's verifier: remembers the history its last verdict produced."""

    def __init__(
        self, verifier: Verifier, counters: ChainCounters, open_chains: OpenChains | None = None
    ) -> None:
        self.verifier = verifier
        self.counters = counters
        self.open_chains = open_chains
        self.session_id = ""
        # history + accepted draft tokens + next token of the last verified block; None after a skip.
        self.after_last: tuple[int, ...] | None = None
        self.released = False  # its session was released while the stream was open

    def verify(self, block: VerifyBlock) -> Verdict:
        skipped = self.admit(block)
        if skipped is not None:
            return skipped
        return self.record(block, self.verifier.verify(block))

    def admit(self, block: VerifyBlock) -> Verdict | None:
        """Before a block's forward pass: the skip verdict of a chained block whose assumption failed, else
        None (verify it)."""
        if self.open_chains is not None and block.session_id != self.session_id:
            self.open_chains.forget(self)  # a stream carries one session; this keeps the index right anyway
            self.session_id = block.session_id
            self.open_chains.track(self)
        if block.chained:
            if block.token_ids != self.after_last:
                self.after_last = None  # a block chained to this skipped one has nothing to extend
                self.counters.skipped += 1
                return Verdict.skip()
            self.counters.verified += 1
        return None

    def record(self, block: VerifyBlock, verdict: Verdict) -> Verdict:
        """After a block's verification: the history its verdict produced is the one a next block extends."""
        accepted = block.draft_token_ids[: verdict.num_accepted]
        self.after_last = (*block.token_ids, *accepted, verdict.next_token_id)
        return verdict
