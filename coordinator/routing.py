"""Which replica serves a session: affinity by consistent hashing, with a load-aware fallback.

Pure functions over candidates; no grpc. Affinity uses weighted rendezvous hashing (highest random weight):
every (session, replica) pair gets a pseudo-random score scaled by the replica's pool weight, and the
highest score wins. It is consistent: adding or removing a replica moves only the sessions that it gains or
held, so the other replicas' KV caches stay warm, and a pool of weight w attracts a share of sessions
proportional to w (Schindelhauer & Schomaker's weighted form: score = -w / ln(u)).

Load: each replica counts its outstanding requests (each has at most one round in flight, so this is the
number of outstanding rounds); its weighted load is outstanding / pool weight. When the affinity replica is
busy and its weighted load exceeds `imbalance_factor` times the least-loaded replica's, the session goes to
the least-loaded one instead (its cache is rebuilt there from the history the coordinator sends). Workers
run one session's forward at a time, so an idle replica beats a warm cache behind a queue.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str  # stable identity of the replica (its address)
    weight: float  # its pool's capacity weight, > 0
    outstanding: int  # requests in flight on it now


def rendezvous_score(session_id: str, candidate: Candidate) -> float:
    digest = hashlib.blake2b(f"{session_id}\0{candidate.key}".encode(), digest_size=8).digest()
    # u uniform in (0, 1), never 0 or 1.
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
    return -candidate.weight / math.log(u)


def affinity_order(session_id: str, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates by descending rendezvous score: the first is the session's home replica."""
    return sorted(candidates, key=lambda c: (-rendezvous_score(session_id, c), c.key))


def weighted_load(candidate: Candidate) -> float:
    return candidate.outstanding / candidate.weight


def choose(session_id: str, candidates: Sequence[Candidate], imbalance_factor: float) -> Candidate:
    """The replica for a session: its affinity replica unless that one is overloaded relative to the rest."""
    if not candidates:
        raise ValueError("no candidates")
    order = affinity_order(session_id, candidates)
    home = order[0]
    least = min(weighted_load(c) for c in order)
    if home.outstanding == 0 or weighted_load(home) <= imbalance_factor * least:
        return home
    # The least loaded, ties broken by affinity order (so the choice is still stable per session).
    return min(order, key=weighted_load)
