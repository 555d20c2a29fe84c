"""The minimal ACL documented in docs/sessions.md is enough for every store operation, and no more."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis

from specpipe.store.redis_server import RedisServerProcess
from specpipe.store.session_store import SessionStats, SessionStore

DOC = Path(__file__).resolve().parent.parent / "docs" / "sessions.md"


def documented_acl_rules() -> list[str]:
    line = next(ln for ln in DOC.read_text().splitlines() if ln.strip().startswith("ACL SETUSER specpipe"))
    return line.split()[3:]  # after "ACL SETUSER specpipe"


def test_documented_acl_allows_the_store_and_nothing_else(tmp_path: Path) -> None:
    with RedisServerProcess(data_dir=str(tmp_path)) as server:
        rules = [re.sub("^>PASSWORD$", ">pw", rule) for rule in documented_acl_rules()]
        redis.Redis.from_url(server.url).execute_command("ACL", "SETUSER", "specpipe", *rules)

        async def exercise() -> None:
            store = SessionStore.from_url(
                f"redis://127.0.0.1:{server.port}/0", username="specpipe", password="pw"
            )
            try:
                await store.ping()
                await store.create("acl-test", [1, 2], 2, {"temperature": 0})
                version = await store.commit_round("acl-test", 0, [3], SessionStats(generated_tokens=1))
                await store.append_prompt("acl-test", version, [4], {"temperature": 1})
                state = await store.load("acl-test")
                assert state.token_ids == (1, 2, 3, 4)
                assert await store.delete("acl-test")
            finally:
                await store.close()

        asyncio.run(exercise())
        restricted = redis.Redis(host="127.0.0.1", port=server.port, username="specpipe", password="pw")
        with pytest.raises(redis.exceptions.NoPermissionError):
            restricted.set("elsewhere", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            restricted.flushall()
