"""Per-session generation state in Redis, shared by coordinators.

Data model (key prefix configurable, default ``specpipe:session:``; S is the session id):

``{prefix}S`` -- a hash:
    version           int; 0 at create, +1 on every commit_round / append_prompt (optimistic concurrency)
    prompt_len        int; how many leading tokens of the history are prompt, i.e. the length of the token
                      list when the latest turn's generation began
    sampling          JSON object (the sampling parameters of the latest turn)
    created_at        float unix seconds
    updated_at        float unix seconds, set on every write
    owner             string, e.g. the id of the coordinator that created the session
    generated_tokens  int counters, summed over all rounds of all turns
    draft_tokens
    accepted_tokens
    target_passes
    rounds

``{prefix}S:tokens`` -- a string: every token id of the history (prompt and generated, all turns) packed as
little-endian int32, so a round's new tokens are one O(1) APPEND instead of a rewrite of the history.

Both keys carry the same TTL, refreshed on every write (ttl_s <= 0 stores them without expiry). Every write
is one Lua script, so the version check and the mutation are atomic and both keys always change together.
Session ids are 1-256 printable ASCII characters without ':' or whitespace: ':' is the key separator, and
forbidding it means no session's hash key can alias another session's ``:tokens`` key.

Errors: NotFoundError for an unknown id, FailedPreconditionError for a stale version or an existing id,
InvalidArgumentError for malformed arguments, UnavailableError when Redis cannot be reached (or refuses the
credentials). Commands are not retried on connection errors: a write whose reply was lost may have been
applied, and a blind retry would then report a misleading stale version. redis-py reconnects on the next
call, so one SessionStore survives a Redis restart (the data itself is lost unless Redis persists it).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
import redis.exceptions

from specpipe.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "specpipe:session:"
DEFAULT_TTL_S = 3600
_MAX_SESSION_ID_LEN = 256
_TOKEN_BYTES = 4
_COUNTERS = ("generated_tokens", "draft_tokens", "accepted_tokens", "target_passes", "rounds")

# Script status codes (the first element of every script's reply; the Lua below uses the same literals).
# A table reply avoids parsing error text.
_OK, _MISSING, _STALE, _EXISTS = 0, 1, 2, 3

# Shared by every script: KEYS[1] is the hash, KEYS[2] the token string; both get the same TTL.
_LUA_REFRESH_TTL = """
local function refresh_ttl(ttl)
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
  else
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
  end
end
"""

# Returns {status, version}; the version check happens before any write, so a rejected call changes nothing.
_LUA_CHECK_VERSION = """
local function check_version(expected)
  local found = redis.call('HGET', KEYS[1], 'version')
  if not found then return {1, -1} end  -- _MISSING
  if tonumber(found) ~= tonumber(expected) then return {2, tonumber(found)} end  -- _STALE
  return nil
end
"""

# A first round written with the session or its new turn (ARGV from `first`: packed tokens, then the five
# counter deltas in _COUNTERS order): appended and counted as commit_round would, one version later.
_LUA_COMMIT_FIRST_ROUND = """
local function commit_first_round(first)
  if #ARGV < first then return end
  if string.len(ARGV[first]) > 0 then redis.call('APPEND', KEYS[2], ARGV[first]) end
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  local counters = {'generated_tokens', 'draft_tokens', 'accepted_tokens', 'target_passes', 'rounds'}
  for i, name in ipairs(counters) do
    local delta = tonumber(ARGV[first + i])
    if delta ~= 0 then redis.call('HINCRBY', KEYS[1], name, delta) end
  end
end
"""

# ARGV: packed tokens, prompt_len, sampling json, now, owner, ttl [, a first round from 7]
_LUA_CREATE = (
    _LUA_REFRESH_TTL
    + _LUA_COMMIT_FIRST_ROUND
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {3} end  -- _EXISTS
redis.call('HSET', KEYS[1], 'version', 0, 'prompt_len', ARGV[2], 'sampling', ARGV[3],
  'created_at', ARGV[4], 'updated_at', ARGV[4], 'owner', ARGV[5],
  'generated_tokens', 0, 'draft_tokens', 0, 'accepted_tokens', 0, 'target_passes', 0, 'rounds', 0)
-- SET (not APPEND) so a token string orphaned by a partial expiry can never leak into a new session.
redis.call('SET', KEYS[2], ARGV[1])
commit_first_round(7)
refresh_ttl(tonumber(ARGV[6]))
return {0}  -- _OK
"""
)

# ARGV: expected version, packed tokens, now, ttl, then the five counter deltas in _COUNTERS order
_LUA_COMMIT_ROUND = (
    _LUA_REFRESH_TTL
    + _LUA_CHECK_VERSION
    + """
local rejected = check_version(ARGV[1])
if rejected then return rejected end
if string.len(ARGV[2]) > 0 then redis.call('APPEND', KEYS[2], ARGV[2]) end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
local counters = {'generated_tokens', 'draft_tokens', 'accepted_tokens', 'target_passes', 'rounds'}
for i, name in ipairs(counters) do
  local delta = tonumber(ARGV[4 + i])
  if delta ~= 0 then redis.call('HINCRBY', KEYS[1], name, delta) end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
refresh_ttl(tonumber(ARGV[4]))
return {0, version}  -- _OK
"""
)

# ARGV: expected version, packed tokens, sampling json, now, ttl [, a first round from 6]. Replies with the
# whole new state so the caller gets a consistent snapshot without a second, racy read.
_LUA_APPEND_PROMPT = (
    _LUA_REFRESH_TTL
    + _LUA_CHECK_VERSION
    + _LUA_COMMIT_FIRST_ROUND
    + """
local rejected = check_version(ARGV[1])
if rejected then return rejected end
local nbytes = redis.call('APPEND', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'prompt_len', string.format('%d', nbytes / 4), 'sampling', ARGV[3],
  'updated_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
commit_first_round(6)
refresh_ttl(tonumber(ARGV[5]))
-- _OK
return {0, redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[1])}
"""
)


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Cumulative counters of a session (or, passed to commit_round, one round's increments)."""

    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0
    rounds: int = 0


@dataclass(frozen=True, slots=True)
class CommittedRound:
    """A round's new tokens and counter increments, as commit_round takes them."""

    token_ids: tuple[int, ...]
    stats: SessionStats


@dataclass(frozen=True, slots=True)
class SessionState:
    session_id: str
    token_ids: tuple[int, ...]
    prompt_len: int
    sampling: dict[str, Any] = field(hash=False)
    version: int
    stats: SessionStats
    created_at: float
    updated_at: float
    owner: str
    ttl_s: float  # remaining TTL in seconds at read time, -1 if the keys do not expire


class SessionStore:
    """Session state over a ``redis.asyncio.Redis`` client (which this store owns and closes)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: int = DEFAULT_TTL_S,
    ) -> None:
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("SessionStore needs a client with decode_responses=False (tokens are binary)")
        self._client = client
        self._prefix = key_prefix
        self._ttl_s = int(ttl_s)
        # Only host:port (or the socket path): the message reaches clients and logs, the password must not.
        self._where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self._create_script = client.register_script(_LUA_CREATE)
        self._commit_script = client.register_script(_LUA_COMMIT_ROUND)
        self._append_prompt_script = client.register_script(_LUA_APPEND_PROMPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: int = DEFAULT_TTL_S,
        socket_timeout_s: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
    ) -> SessionStore:
        """Connect lazily to ``redis://`` or ``rediss://`` (TLS) ``[user:password@]host:port/db``.

        `username`/`password` (an ACL user, or AUTH with a password) override the URL's, so the secret can
        come from a file or the environment instead of a command line. Nothing is sent until the first call.
        """
        options: dict[str, object] = {}
        if username:
            options["username"] = username
        if password:
            options["password"] = password
        if ssl_ca_certs:
            options["ssl_ca_certs"] = ssl_ca_certs
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            decode_responses=False,
            **options,
        )
        return cls(client, key_prefix=key_prefix, ttl_s=ttl_s)

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    def hash_key(self, session_id: str) -> str:
        return f"{self._prefix}{session_id}"

    def tokens_key(self, session_id: str) -> str:
        return f"{self._prefix}{session_id}:tokens"

    async def ping(self) -> None:
        with self._translate_errors():
            await self._client.ping()

    async def create(
        self,
        session_id: str,
        token_ids: Sequence[int],
        prompt_len: int,
        sampling: Mapping[str, Any],
        owner: str = "",
        first_round: CommittedRound | None = None,
    ) -> SessionState:
        """Store a new session at version 0; FailedPreconditionError if the id is taken. With `first_round`,
        that round is committed in the same write (version 1): one store round trip where a new session's
        first round would take two."""
        keys = self._keys(session_id)
        tokens = tuple(token_ids)
        if not 0 <= prompt_len <= len(tokens):
            raise InvalidArgumentError(f"prompt_len must be in 0..{len(tokens)}, got {prompt_len}")
        packed = _pack_tokens(tokens)
        sampling_json = _sampling_json(sampling)
        now = time.time()
        args = [packed, prompt_len, sampling_json, repr(now), owner, self._ttl_s, *_round_args(first_round)]
        with self._translate_errors():
            reply = await self._create_script(keys=keys, args=args)
        if int(reply[0]) == _EXISTS:
            raise FailedPreconditionError(f"session {session_id!r} already exists")
        if first_round is not None:
            tokens += first_round.token_ids
        return SessionState(
            session_id=session_id,
            token_ids=tokens,
            prompt_len=prompt_len,
            sampling=json.loads(sampling_json),
            version=0 if first_round is None else 1,
            stats=SessionStats() if first_round is None else first_round.stats,
            created_at=now,
            updated_at=now,
            owner=owner,
            ttl_s=float(self._ttl_s) if self._ttl_s > 0 else -1.0,
        )

    async def load(self, session_id: str) -> SessionState:
        hash_key, tokens_key = self._keys(session_id)
        with self._translate_errors():
            # MULTI/EXEC: the hash, the tokens and the TTL come from the same instant.
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(hash_key)
                pipe.get(tokens_key)
                pipe.pttl(hash_key)
                fields, packed, pttl_ms = await pipe.execute()
        if not fields:
            raise NotFoundError(f"session {session_id!r} not found")
        return _state_from_redis(session_id, fields, packed, pttl_ms)

    async def commit_round(
        self,
        session_id: str,
        expected_version: int,
        new_token_ids: Sequence[int],
        stats_delta: SessionStats,
    ) -> int:
        """Append one round's accepted tokens and add its counters; returns the new version."""
        keys = self._keys(session_id)
        packed, *deltas = _round_args(CommittedRound(tuple(new_token_ids), stats_delta))
        args = [int(expected_version), packed, repr(time.time()), self._ttl_s, *deltas]
        with self._translate_errors():
            reply = await self._commit_script(keys=keys, args=args)
        self._raise_rejection(session_id, expected_version, reply)
        return int(reply[1])

    async def append_prompt(
        self,
        session_id: str,
        expected_version: int,
        token_ids: Sequence[int],
        sampling: Mapping[str, Any],
        first_round: CommittedRound | None = None,
    ) -> SessionState:
        """Start a new turn: append its prompt tokens, make the whole history the prompt, set sampling. With
        `first_round`, the turn's first round is committed in the same write (two versions later)."""
        keys = self._keys(session_id)
        packed = _pack_tokens(token_ids)
        args = [
            int(expected_version), packed, _sampling_json(sampling), repr(time.time()), self._ttl_s,
            *_round_args(first_round),
        ]  # fmt: skip
        with self._translate_errors():
            reply = await self._append_prompt_script(keys=keys, args=args)
        self._raise_rejection(session_id, expected_version, reply)
        flat = reply[1]
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        return _state_from_redis(session_id, fields, reply[2], int(reply[3]))

    async def delete(self, session_id: str) -> bool:
        """Remove the session; False if it did not exist."""
        keys = self._keys(session_id)
        with self._translate_errors():
            removed = await self._client.delete(*keys)
        return int(removed) > 0

    async def close(self) -> None:
        with self._translate_errors():
            await self._client.aclose()

    # -- helpers -------------------------------------------------------------------------------------

    def _keys(self, session_id: str) -> list[str]:
        _validate_session_id(session_id)
        return [self.hash_key(session_id), self.tokens_key(session_id)]

    @staticmethod
    def _raise_rejection(session_id: str, expected_version: int, reply: list[Any]) -> None:
        status = int(reply[0])
        if status == _MISSING:
            raise NotFoundError(f"session {session_id!r} not found")
        if status == _STALE:
            raise FailedPreconditionError(
                f"stale session version: expected {expected_version}, found {int(reply[1])}"
            )

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Map transport failures to UnavailableError; redis-py's messages never contain the password."""
        try:
            yield
        except redis.exceptions.AuthenticationError as exc:  # a ConnectionError subclass: test it first
            raise UnavailableError(f"session store at {self._where} rejected authentication: {exc}") from exc
        except redis.exceptions.ReadOnlyError as exc:  # a replica mid-failover: retryable, like an outage
            raise UnavailableError(f"session store at {self._where} is read-only: {exc}") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise UnavailableError(f"session store unreachable at {self._where}: {exc}") from exc


def _validate_session_id(session_id: str) -> None:
    if (
        not isinstance(session_id, str)
        or not 0 < len(session_id) <= _MAX_SESSION_ID_LEN
        or not session_id.isascii()
        or not session_id.isprintable()
        or ":" in session_id
        or " " in session_id
    ):
        raise InvalidArgumentError(
            f"session_id must be 1-{_MAX_SESSION_ID_LEN} printable ASCII characters without ':' or spaces, "
            f"got {session_id!r:.80}"
        )


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}i", *token_ids)
    except struct.error as exc:
        raise InvalidArgumentError(f"token ids must be int32 values: {exc}") from exc


def _unpack_tokens(session_id: str, packed: bytes | None) -> tuple[int, ...]:
    if not packed:
        return ()
    if len(packed) % _TOKEN_BYTES:
        raise FailedPreconditionError(
            f"session {session_id!r} has a corrupt token list ({len(packed)} bytes)"
        )
    return struct.unpack(f"<{len(packed) // _TOKEN_BYTES}i", packed)


def _round_args(committed: CommittedRound | None) -> list[Any]:
    """A round's script arguments: its packed tokens, then its counter deltas in _COUNTERS order."""
    if committed is None:
        return []
    deltas = [getattr(committed.stats, name) for name in _COUNTERS]
    for name, delta in zip(_COUNTERS, deltas, strict=True):
        if not isinstance(delta, int) or delta < 0:
            raise InvalidArgumentError(f"stats_delta.{name} must be a non-negative int, got {delta!r}")
    return [_pack_tokens(committed.token_ids), *deltas]


def _sampling_json(sampling: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(sampling), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"sampling must be a JSON-serializable mapping: {exc}") from exc


def _state_from_redis(
    session_id: str, fields: Mapping[bytes, bytes], packed: bytes | None, pttl_ms: int
) -> SessionState:
    def get(name: str) -> bytes:
        return fields.get(name.encode(), b"")

    return SessionState(
        session_id=session_id,
        token_ids=_unpack_tokens(session_id, packed),
        prompt_len=int(get("prompt_len") or 0),
        sampling=json.loads(get("sampling") or b"{}"),
        version=int(get("version")),
        stats=SessionStats(**{name: int(get(name) or 0) for name in _COUNTERS}),
        created_at=float(get("created_at") or 0.0),
        updated_at=float(get("updated_at") or 0.0),
        owner=get("owner").decode(),
        ttl_s=pttl_ms / 1000.0 if pttl_ms >= 0 else -1.0,
    )
