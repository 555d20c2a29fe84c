"""Routing: consistent hashing on the session id, pool weights, and the load-aware fallback."""

from __future__ import annotations

import collections

from coordinator.routing import Candidate, affinity_order, choose

SESSIONS = [f"session-{i}" for i in range(4000)]


def homes(candidates: list[Candidate]) -> dict[str, str]:
    return {s: choose(s, candidates, imbalance_factor=2.0).key for s in SESSIONS}


def test_same_session_same_replica_and_every_replica_used() -> None:
    replicas = [Candidate(f"10.0.0.{i}:50062", 1.0, 0) for i in range(4)]
    first, second = homes(replicas), homes(list(reversed(replicas)))
    assert first == second  # independent of the order discovery lists them in
    counts = collections.Counter(first.values())
    assert set(counts) == {r.key for r in replicas}
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts


def test_removing_a_replica_moves_only_its_sessions() -> None:
    replicas = [Candidate(f"10.0.0.{i}:50062", 1.0, 0) for i in range(4)]
    before = homes(replicas)
    after = homes(replicas[1:])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == replicas[0].key}
    # And adding it back returns exactly those sessions to it.
    assert homes(replicas) == before


def test_pool_weight_sets_the_share_of_sessions() -> None:
    replicas = [Candidate("h100:1", 3.0, 0), Candidate("l4:1", 1.0, 0)]
    counts = collections.Counter(homes(replicas).values())
    share = counts["h100:1"] / len(SESSIONS)
    assert 0.72 < share < 0.78, share  # 3 / (3 + 1)


def test_overloaded_home_falls_back_to_the_least_loaded() -> None:
    session = "session-7"
    idle = [Candidate(f"r{i}", 1.0, 0) for i in range(3)]
    home = affinity_order(session, idle)[0]
    others = [c for c in idle if c.key != home.key]
    # As busy as the rest, or busier within the factor: stays home (cache warm).
    even = [Candidate(home.key, 1.0, 1), *(Candidate(c.key, 1.0, 1) for c in others)]
    assert choose(session, even, imbalance_factor=2.0).key == home.key
    mild = [Candidate(home.key, 1.0, 2), *(Candidate(c.key, 1.0, 1) for c in others)]
    assert choose(session, mild, imbalance_factor=2.0).key == home.key
    # Busy while another replica idles: goes to the idle one.
    assert choose(session, [Candidate(home.key, 1.0, 1), *others], imbalance_factor=2.0).key != home.key
    # Far busier: goes to the least loaded, weighted by capacity.
    busy = [Candidate(home.key, 1.0, 5), Candidate(others[0].key, 1.0, 2), Candidate(others[1].key, 4.0, 3)]
    assert choose(session, busy, imbalance_factor=2.0).key == others[1].key  # 3/4 < 2/1 < 5/1
