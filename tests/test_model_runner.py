"""The per-session KV cache: prefix reuse, rollback of rejected tokens, and LRU eviction under a budget."""

from __future__ import annotations

import pytest
import torch

from specpipe.runtime.kv_cache import MIN_SHARED_PREFIX, SessionKVCacheStore, common_prefix_length
from specpipe.runtime.model_runner import CausalLMRunner
from tests.conftest import ModelPair

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def fresh_logits(runner: CausalLMRunner, ids: list[int], rows: int) -> torch.Tensor:
    with torch.inference_mode():
        return runner.model(torch.tensor([ids])).logits[0, -rows:].float()


def test_common_prefix_length() -> None:
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3, 4], [1, 2]) == 2
    assert common_prefix_length([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert common_prefix_length([7], [1]) == 0


@pytest.mark.parametrize("lean_forward", [False, True], ids=["transformers", "lean"])
def test_prefix_reuse_and_rollback_match_a_fresh_forward(model_pair: ModelPair, lean_forward: bool) -> None:
    runner = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", max_cached_sessions=4, lean_forward=lean_forward
    )
    ids = list(range(3, 40))
    first = runner.forward("s", ids, num_rows=1)
    assert first.cached_tokens == 0
    extended = [*ids, 50, 51, 52]
    second = runner.forward("s", extended, num_rows=4)
    assert second.cached_tokens == len(extended) - 4  # everything before the 4 scored positions
    torch.testing.assert_close(second.logits, fresh_logits(runner, extended, 4), rtol=1e-4, atol=1e-4)
    rolled_back = [*ids, 60]  # the draft suffix 50, 51, 52 was rejected
    third = runner.forward("s", rolled_back, num_rows=2)
    assert third.cached_tokens == len(ids) - 1
    torch.testing.assert_close(third.logits, fresh_logits(runner, rolled_back, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lean_forward", [False, True], ids=["transformers", "lean"])
def test_a_new_session_starts_from_another_sessions_cached_prefix(
    model_pair: ModelPair, lean_forward: bool
) -> None:
    """A shared system prompt (or n completions of one prompt) is computed once: a new history copies the
    longest prefix another session holds (at least MIN_SHARED_PREFIX positions), with the logits a fresh
    forward gives, and the donor's own cache stays as it was."""
    runner = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", max_cached_sessions=4, lean_forward=lean_forward
    )
    shared = list(range(3, 3 + 2 * MIN_SHARED_PREFIX))
    runner.forward("a", [*shared, 90, 91], num_rows=1)
    b_ids = [*shared, 70, 71, 72]
    b = runner.forward("b", b_ids, num_rows=2)
    assert b.cached_tokens == len(shared) and runner.caches.shared_tokens == len(shared)
    torch.testing.assert_close(b.logits, fresh_logits(runner, b_ids, 2), rtol=1e-4, atol=1e-4)
    a_ids = [*shared, 90, 91, 92]
    a = runner.forward("a", a_ids, num_rows=1)  # the donor's cache is its own still
    assert a.cached_tokens == len(a_ids) - 1
    torch.testing.assert_close(a.logits, fresh_logits(runner, a_ids, 1), rtol=1e-4, atol=1e-4)
    steps = runner.decode("c", [*shared, 5], 3, lambda logits: int(logits.argmax()))  # a draft's path too
    assert steps.cached_tokens == len(shared)
    short = runner.forward("d", [*shared[: MIN_SHARED_PREFIX - 1], 8, 9], num_rows=1)
    assert short.cached_tokens == 0  # too short a prefix to copy
    # A session whose own cache gives most of its history keeps it: a donor holding a few positions more is
    # not worth a copy of every layer.
    counted = (runner.caches.shared_prefixes, runner.caches.shared_tokens)
    runner.forward("e", [*a_ids, 93], num_rows=1)  # e: a's history and one more token (copied from a)
    later = runner.forward("a", [*a_ids, 93, *range(100, 120)], num_rows=1)
    assert later.cached_tokens == len(a_ids)  # its own prefix, though e holds one more
    assert runner.caches.shared_prefixes == counted[0] + 1
    alone = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", 4, lean_forward=lean_forward, prefix_sharing=False
    )
    alone.forward("a", [*shared, 90, 91], num_rows=1)
    assert alone.forward("b", b_ids, num_rows=2).cached_tokens == 0


@pytest.mark.parametrize("lean_forward", [False, True], ids=["transformers", "lean"])
def test_budget_evicts_least_recently_used_and_stays_exact(model_pair: ModelPair, lean_forward: bool) -> None:
    probe = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", max_cached_sessions=8, lean_forward=lean_forward
    )
    probe.forward("probe", list(range(3, 67)), num_rows=1)
    one_session = probe.caches.total_bytes
    budget = int(one_session * 1.5)  # room for one 64-token session, not two
    runner = CausalLMRunner.load(
        model_pair.target_dir, "cpu", "float32", 8, max_cache_bytes=budget, lean_forward=lean_forward
    )
    histories = {name: list(range(start, start + 64)) for name, start in (("a", 3), ("b", 100), ("c", 200))}
    for step in range(3):
        for name, history in histories.items():
            history.append(5 + step)
            result = runner.forward(name, history, num_rows=1)
            torch.testing.assert_close(result.logits, fresh_logits(runner, history, 1), rtol=1e-4, atol=1e-4)
            assert len(runner.caches) == 1 or runner.caches.total_bytes <= budget
    assert runner.caches.evictions >= 6
    assert runner.caches.release("c") and runner.caches.total_bytes == 0


def test_session_count_bound() -> None:
    store = SessionKVCacheStore(max_sessions=2)
    for name in ("a", "b", "c"):
        store.get_or_create(name)
    assert "a" not in store and "b" in store and "c" in store and store.evictions == 1


@pytest.mark.parametrize("lean_forward", [False, True], ids=["transformers", "lean"])
def test_decode_equals_one_forward_per_step(model_pair: ModelPair, lean_forward: bool) -> None:
    """`decode` (the draft's steps in one call): the tokens and the cache of a `forward` per step; its
    forward_ns leaves out the time spent choosing tokens; a failing step frees the session's cache."""
    import time

    runners = [
        CausalLMRunner.load(model_pair.draft_dir, "cpu", "float32", max_cached_sessions=4, lean_forward=lean)
        for lean in (lean_forward, lean_forward)
    ]
    history = list(range(3, 30))
    by_forward = list(history)
    for _ in range(5):
        by_forward.append(int(runners[0].forward("s", by_forward, 1).logits[0].argmax()))
    steps_seen: list[int] = []
    runners[1].forward_observer = steps_seen.append

    def slow_argmax(logits: torch.Tensor) -> int:  # [1, vocab_size]
        time.sleep(0.02)  # choosing is not the model's time
        return int(logits[0].argmax())

    result = runners[1].decode("s", history, 5, slow_argmax)
    assert result.cached_tokens == 0 and len(steps_seen) == 5
    assert result.forward_ns < 5 * 20_000_000
    # Both caches hold the history and every token but the last: a next call reuses them alike.
    follow = [*by_forward, 7]
    for runner in runners:
        assert runner.forward("s", follow, 2).cached_tokens == len(by_forward) - 1
    decoded: list[int] = []

    def record(logits: torch.Tensor) -> int:
        decoded.append(int(logits[0].argmax()))
        return decoded[-1]

    runners[1].decode("t", history, 5, record)
    assert [*history, *decoded] == by_forward

    def fail(logits: torch.Tensor) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runners[1].decode("s", follow, 3, fail)
    assert "s" not in runners[1].caches
    with pytest.raises(ValueError, match="steps must be >= 1"):
        runners[1].decode("s", history, 0, record)


def test_the_thread_count_applies_on_every_thread_that_runs_a_forward(
    model_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.set_num_threads reaches only its caller's BLAS/OpenMP threads, so the runner applies its count on
    each thread that runs a forward (a worker's stream threads and event loop too), once per thread."""
    import threading

    runner = CausalLMRunner.load(model_pair.target_dir, "cpu", "float32", max_cached_sessions=4)
    runner.torch_threads = 1
    applied: list[tuple[int, int]] = []  # (thread, count); a finished thread's ident may be reused
    monkeypatch.setattr(torch, "set_num_threads", lambda n: applied.append((threading.get_ident(), n)))

    def two_forwards(session_id: str) -> None:
        runner.forward(session_id, [1, 2, 3], 1)
        runner.decode(session_id, [1, 2, 3, 4], 2, lambda logits: int(logits.argmax()))

    threads = [threading.Thread(target=two_forwards, args=(f"s{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
        thread.join()
    assert [n for _, n in applied] == [1, 1]  # once per thread, though each ran a forward and a decode
    runner.torch_threads = 0  # torch's default: the runner leaves the thread alone
    thread = threading.Thread(target=two_forwards, args=("s9",))
    thread.start()
    thread.join()
    assert len(applied) == 2
