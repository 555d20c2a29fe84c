"""SessionStore against a real valkey-server / redis-server process (no in-process fakes)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio

from specpipe.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from specpipe.store.redis_server import RedisServerProcess
from specpipe.store.session_store import CommittedRound, SessionState, SessionStats, SessionStore

T = TypeVar("T")

SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 1}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServerProcess]:
    srv = RedisServerProcess()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def run_with_store(url: str, body: Callable[[SessionStore], Awaitable[T]], **kwargs: object) -> T:
    """Run body on a fresh store inside its own event loop (redis.asyncio clients are loop-bound)."""

    async def main() -> T:
        store = SessionStore.from_url(url, **kwargs)  # type: ignore[arg-type]
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def new_id() -> str:
    return uuid.uuid4().hex


def test_create_load_round_trip(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[SessionState, SessionState]:
        created = await store.create(
            sid, [1, 2, 3, 2**31 - 1, -5], prompt_len=5, sampling=SAMPLING, owner="c1"
        )
        return created, await store.load(sid)

    created, loaded = run_with_store(server.url, body)
    assert loaded.token_ids == (1, 2, 3, 2**31 - 1, -5)
    assert loaded.prompt_len == 5
    assert loaded.sampling == SAMPLING
    assert loaded.version == 0
    assert loaded.stats == SessionStats()
    assert loaded.owner == "c1"
    assert loaded.created_at == pytest.approx(time.time(), abs=5)
    assert loaded.created_at == loaded.updated_at == created.created_at
    assert 3590 < loaded.ttl_s <= 3600
    assert created.token_ids == loaded.token_ids and created.version == loaded.version


def test_create_existing_id_fails(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> SessionState:
        await store.create(sid, [1], prompt_len=1, sampling={})
        with pytest.raises(FailedPreconditionError, match="already exists"):
            await store.create(sid, [9, 9], prompt_len=2, sampling={})
        return await store.load(sid)

    assert run_with_store(server.url, body).token_ids == (1,)


def test_invalid_arguments(server: RedisServerProcess) -> None:
    async def body(store: SessionStore) -> None:
        with pytest.raises(InvalidArgumentError, match="prompt_len"):
            await store.create(new_id(), [1, 2], prompt_len=3, sampling={})
        with pytest.raises(InvalidArgumentError, match="int32"):
            await store.create(new_id(), [2**31], prompt_len=1, sampling={})
        with pytest.raises(InvalidArgumentError, match="session_id"):
            await store.load("a:tokens")
        with pytest.raises(InvalidArgumentError, match="session_id"):
            await store.load("")

    run_with_store(server.url, body)


def test_commit_round_appends_and_bumps_version(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[list[int], SessionState]:
        await store.create(sid, [10, 11], prompt_len=2, sampling=SAMPLING)
        versions = [
            await store.commit_round(sid, 0, [12, 13, 14], SessionStats(3, 4, 2, 1, 1)),
            await store.commit_round(sid, 1, [15], SessionStats(1, 4, 0, 1, 1)),
            await store.commit_round(sid, 2, [], SessionStats()),
        ]
        return versions, await store.load(sid)

    versions, state = run_with_store(server.url, body)
    assert versions == [1, 2, 3]
    assert state.version == 3
    assert state.token_ids == (10, 11, 12, 13, 14, 15)
    assert state.prompt_len == 2
    assert state.stats == SessionStats(
        generated_tokens=4, draft_tokens=8, accepted_tokens=2, target_passes=2, rounds=2
    )
    assert state.updated_at >= state.created_at


def test_stale_version_rejected_and_nothing_written(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[SessionState, SessionState]:
        await store.create(sid, [1, 2], prompt_len=2, sampling={})
        await store.commit_round(sid, 0, [3], SessionStats(generated_tokens=1, rounds=1))
        before = await store.load(sid)
        with pytest.raises(FailedPreconditionError, match="stale session version: expected 0, found 1"):
            await store.commit_round(sid, 0, [99, 98], SessionStats(generated_tokens=2, rounds=1))
        with pytest.raises(FailedPreconditionError, match="expected 5, found 1"):
            await store.append_prompt(sid, 5, [77], {"temperature": 0})
        return before, await store.load(sid)

    before, after = run_with_store(server.url, body)
    assert after.token_ids == before.token_ids == (1, 2, 3)
    assert after.version == before.version == 1
    assert after.stats == before.stats
    assert after.sampling == before.sampling == {}
    assert after.updated_at == before.updated_at


def test_concurrent_writers_exactly_one_wins(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[list[object], SessionState]:
        await store.create(sid, [1], prompt_len=1, sampling={})
        results = await asyncio.gather(
            *(store.commit_round(sid, 0, [100 + i], SessionStats(generated_tokens=1)) for i in range(8)),
            return_exceptions=True,
        )
        return results, await store.load(sid)

    results, state = run_with_store(server.url, body)
    winners = [i for i, r in enumerate(results) if r == 1]
    assert len(winners) == 1
    assert all(isinstance(r, FailedPreconditionError) for i, r in enumerate(results) if i != winners[0])
    assert state.version == 1
    assert state.token_ids == (1, 100 + winners[0])
    assert state.stats.generated_tokens == 1


def test_append_prompt_starts_new_turn(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[SessionState, SessionState]:
        await store.create(sid, [1, 2], prompt_len=2, sampling=SAMPLING)
        await store.commit_round(sid, 0, [3, 4], SessionStats(generated_tokens=2, rounds=1))
        returned = await store.append_prompt(sid, 1, [5, 6, 7], {"temperature": 0.0})
        return returned, await store.load(sid)

    returned, loaded = run_with_store(server.url, body)
    assert loaded.token_ids == (1, 2, 3, 4, 5, 6, 7)
    assert loaded.prompt_len == 7
    assert loaded.sampling == {"temperature": 0.0}
    assert loaded.version == 2
    assert loaded.stats.generated_tokens == 2
    assert returned.token_ids == loaded.token_ids and returned.version == loaded.version
    assert returned.prompt_len == loaded.prompt_len and returned.stats == loaded.stats


def test_a_first_round_written_with_the_session_equals_two_writes(server: RedisServerProcess) -> None:
    """create / append_prompt with first_round: one write, the same state as the write and a commit_round."""
    together, apart = new_id(), new_id()
    first, second = (
        CommittedRound((12, 13), SessionStats(2, 3, 1, 1, 1)),
        CommittedRound((16,), SessionStats(1, 2, 0, 1, 1)),
    )

    async def body(store: SessionStore) -> tuple[list[SessionState], list[SessionState]]:
        created = await store.create(together, [10, 11], 2, SAMPLING, "me", first_round=first)
        created_loaded = await store.load(together)
        turn = await store.append_prompt(together, 1, [14, 15], {"temperature": 0.0}, first_round=second)
        await store.create(apart, [10, 11], 2, SAMPLING, "me")
        await store.commit_round(apart, 0, first.token_ids, first.stats)
        await store.append_prompt(apart, 1, [14, 15], {"temperature": 0.0})
        await store.commit_round(apart, 2, second.token_ids, second.stats)
        return [created, created_loaded, turn, await store.load(together)], [await store.load(apart)]

    (created, created_loaded, turn, loaded), (reference,) = run_with_store(server.url, body)
    assert created.version == created_loaded.version == 1
    assert created.token_ids == created_loaded.token_ids == (10, 11, 12, 13)
    assert created.stats == created_loaded.stats == first.stats
    assert created.prompt_len == created_loaded.prompt_len == 2
    assert turn.token_ids == loaded.token_ids == reference.token_ids == (10, 11, 12, 13, 14, 15, 16)
    assert turn.version == loaded.version == reference.version == 3
    assert turn.prompt_len == loaded.prompt_len == reference.prompt_len == 6
    assert turn.stats == loaded.stats == reference.stats == SessionStats(3, 5, 1, 2, 2)


def test_a_refused_first_round_writes_nothing(server: RedisServerProcess) -> None:
    sid = new_id()
    extra = CommittedRound((99,), SessionStats(1, 1, 1, 1, 1))

    async def body(store: SessionStore) -> SessionState:
        await store.create(sid, [1, 2], 2, {})
        with pytest.raises(FailedPreconditionError, match="already exists"):
            await store.create(sid, [7], 1, {}, first_round=extra)
        with pytest.raises(FailedPreconditionError, match="expected 3, found 0"):
            await store.append_prompt(sid, 3, [5], {}, first_round=extra)
        with pytest.raises(InvalidArgumentError, match="stats_delta.rounds"):
            await store.create(
                new_id(), [7], 1, {}, first_round=CommittedRound((1,), SessionStats(rounds=-1))
            )
        return await store.load(sid)

    state = run_with_store(server.url, body)
    assert state.token_ids == (1, 2) and state.version == 0 and state.stats == SessionStats()


def test_ttl_set_and_refreshed(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[float, list[int], list[int], float]:
        raw = redis.asyncio.Redis.from_url(server.url)
        try:
            created = await store.create(sid, [1], prompt_len=1, sampling={})
            keys = [store.hash_key(sid), store.tokens_key(sid)]
            initial = [await raw.ttl(k) for k in keys]
            for k in keys:
                await raw.expire(k, 5)  # pretend most of the TTL has elapsed
            await store.commit_round(sid, 0, [2], SessionStats(rounds=1))
            refreshed = [await raw.ttl(k) for k in keys]
            return created.ttl_s, initial, refreshed, (await store.load(sid)).ttl_s
        finally:
            await raw.aclose()

    created_ttl, initial, refreshed, loaded_ttl = run_with_store(server.url, body, ttl_s=100)
    assert created_ttl == 100
    assert all(95 <= t <= 100 for t in initial), initial
    assert all(95 <= t <= 100 for t in refreshed), refreshed
    assert 95 <= loaded_ttl <= 100


def test_no_ttl_when_disabled(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> float:
        await store.create(sid, [1], prompt_len=1, sampling={})
        return (await store.load(sid)).ttl_s

    assert run_with_store(server.url, body, ttl_s=0) == -1


def test_delete_and_unknown_id(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> tuple[bool, bool]:
        await store.create(sid, [1, 2], prompt_len=2, sampling={})
        first = await store.delete(sid)
        second = await store.delete(sid)
        with pytest.raises(NotFoundError, match=sid):
            await store.load(sid)
        with pytest.raises(NotFoundError, match=sid):
            await store.commit_round(sid, 0, [3], SessionStats())
        with pytest.raises(NotFoundError, match=sid):
            await store.append_prompt(sid, 0, [3], {})
        return first, second

    assert run_with_store(server.url, body) == (True, False)


def test_key_prefix_is_honoured(server: RedisServerProcess) -> None:
    sid = new_id()

    async def body(store: SessionStore) -> list[bytes]:
        raw = redis.asyncio.Redis.from_url(server.url)
        try:
            await store.create(sid, [1], prompt_len=1, sampling={})
            return sorted(await raw.keys(f"custom:{sid}*"))
        finally:
            await raw.aclose()

    keys = run_with_store(server.url, body, key_prefix="custom:")
    assert keys == [f"custom:{sid}".encode(), f"custom:{sid}:tokens".encode()]


def test_password_protected_server() -> None:
    password = "p@ss/w:rd#1"
    with RedisServerProcess(password=password) as srv:
        # The password goes to the server on stdin, so `ps` never shows it.
        assert password.encode() not in Path(f"/proc/{srv.pid}/cmdline").read_bytes()
        sid = new_id()

        async def ok(store: SessionStore) -> SessionState:
            await store.ping()
            await store.create(sid, [4, 5], prompt_len=2, sampling={})
            return await store.load(sid)

        assert run_with_store(srv.url, ok).token_ids == (4, 5)

        async def fails(store: SessionStore) -> None:
            await store.load(sid)

        no_password_url = f"redis://127.0.0.1:{srv.port}/0"
        wrong_password_url = f"redis://:wrong@127.0.0.1:{srv.port}/0"
        for url in (no_password_url, wrong_password_url):
            with pytest.raises(UnavailableError, match=f"127.0.0.1:{srv.port}") as info:
                run_with_store(url, fails)
            assert password not in str(info.value)


def test_server_killed_then_restarted() -> None:
    socket_timeout_s = 2.0
    with RedisServerProcess() as srv:
        sid = new_id()

        async def body(store: SessionStore) -> tuple[float, str, SessionState]:
            await store.create(sid, [1, 2, 3], prompt_len=3, sampling={})
            srv.kill()
            t0 = time.monotonic()
            with pytest.raises(UnavailableError, match="unreachable") as info:
                await store.load(sid)
            elapsed = time.monotonic() - t0
            # A second call must fail fast too (reconnect refused), not hang.
            with pytest.raises(UnavailableError):
                await store.commit_round(sid, 0, [4], SessionStats())

            srv.restart()
            # No persistence: the session is gone, but the same store object works again.
            with pytest.raises(NotFoundError):
                await store.load(sid)
            await store.create(sid, [7, 8], prompt_len=2, sampling={})
            assert await store.commit_round(sid, 0, [9], SessionStats(rounds=1)) == 1
            return elapsed, str(info.value), await store.load(sid)

        elapsed, message, state = run_with_store(srv.url, body, socket_timeout_s=socket_timeout_s)
        assert elapsed < socket_timeout_s
        assert f"127.0.0.1:{srv.port}" in message
        assert state.token_ids == (7, 8, 9)


def test_restart_while_idle_reconnects(server: RedisServerProcess) -> None:
    """Pooled connections that went stale while nobody was calling are replaced transparently."""
    with RedisServerProcess() as srv:
        sid = new_id()

        async def body(store: SessionStore) -> SessionState:
            # Open several pooled connections, then restart the server underneath them.
            await asyncio.gather(*(store.ping() for _ in range(5)))
            srv.restart()
            await asyncio.sleep(0.05)  # let the loop notice the closed sockets
            await store.create(sid, [1], prompt_len=1, sampling={})
            return await store.load(sid)

        assert run_with_store(srv.url, body).token_ids == (1,)


def test_cancelled_loads_never_return_another_sessions_reply(server: RedisServerProcess) -> None:
    """Regression test for CVE-2023-28858/28859: a cancelled command must not leave its reply on a pooled
    connection for the next caller to read."""
    rng = random.Random(1234)
    sessions = {new_id(): [i * 1000 + j for j in range(1 + i % 7)] for i in range(40)}

    async def body(store: SessionStore) -> tuple[int, int]:
        for sid, tokens in sessions.items():
            await store.create(sid, tokens, prompt_len=len(tokens), sampling={"i": sid})

        completed = cancelled = 0

        async def one(sid: str) -> None:
            nonlocal completed, cancelled
            # Half the calls are cancelled at random points (before send, mid-reply); the other half get
            # enough time to finish, so they read from connections the cancelled calls used.
            timeout = rng.uniform(0.0, 0.01) if rng.random() < 0.5 else 2.0
            try:
                state = await asyncio.wait_for(store.load(sid), timeout=timeout)
            except asyncio.TimeoutError:
                cancelled += 1
                return
            assert state.session_id == sid
            assert list(state.token_ids) == sessions[sid]
            assert state.sampling == {"i": sid}
            completed += 1

        ids = list(sessions)
        for _ in range(12):
            await asyncio.gather(*(one(rng.choice(ids)) for _ in range(40)))
        # Afterwards every pooled connection must still be in sync.
        for sid in ids:
            assert list((await store.load(sid)).token_ids) == sessions[sid]
        return completed, cancelled

    completed, cancelled = run_with_store(server.url, body)
    assert completed > 0 and cancelled > 0, (completed, cancelled)


def test_server_start_failure_reports_log(server: RedisServerProcess) -> None:
    clash = RedisServerProcess(port=server.port)
    with pytest.raises(RuntimeError, match="(?i)in use"):
        clash.start(timeout_s=5.0)
    clash.stop()
    assert not clash.running
