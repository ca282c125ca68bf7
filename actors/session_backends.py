"""Where sessions are kept: the interface the ingress talks to, its two errors, and the Redis implementation.

Every stored session carries an integer version. `get` returns ``(version, state)`` (or None); `put` writes
only when the stored version still equals the version the caller loaded (0: the session must not exist yet)
and returns the new version, else raises `SessionConflict`. A store that cannot answer in time raises
`StoreUnavailable` (the ingress answers 503 + Retry-After). Two implementations (docs/sessions.md):

- embedded (the default): the head-node actor with its journal (`coact.actors.session_store`);
- redis: `RedisSessions` here, a compare-and-set Lua script on one hash per session, expiring by key TTL.

No Ray here: this is an engine module (tests/test_layering.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol, runtime_checkable

DEFAULT_TIMEOUT_S = 5.0
REDIS_PREFIX = "coact:session:"


class SessionConflict(Exception):
    """The session changed since this turn loaded it: another turn was saved first (or it expired, or was deleted)."""

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(session_id, expected, actual)  # args stay (de)serialisable: pickle calls cls(*args)
        self.session_id, self.expected, self.actual = session_id, expected, actual

    def __str__(self) -> str:
        return (f"session {self.session_id!r} was changed by another turn while this one ran (stored version "
                f"{self.actual}, this turn loaded version {self.expected})")


class StoreUnavailable(Exception):
    """The session store did not answer in time (down, restarting, unreachable)."""


@runtime_checkable
class SessionBackend(Protocol):
    """What the ingress needs of a session store. All calls are bounded in time (`StoreUnavailable` past it)."""

    async def get(self, session_id: str) -> tuple[int, dict] | None: ...

    async def put(self, session_id: str, state: dict, expected_version: int | None) -> int: ...

    async def delete(self, session_id: str) -> bool: ...

    async def info(self) -> dict: ...

    async def count(self, prefix: str, exclude: str | None = None) -> int:
        """Live sessions whose id starts with `prefix` (and does not continue with `exclude`)."""
        ...


def expected_of(expected_version: int | None) -> int:
    """None and 0 both mean: the session must not exist yet."""
    return 0 if expected_version is None else int(expected_version)


# KEYS[1] the session's hash; ARGV: expected version, state JSON, TTL in ms. Returns {1, new} or {0, stored}.
# A stored version one past the expected one holding exactly this state is this same write, retried after its
# reply was lost (a connection dropped after the server ran it): answered as done, not as a conflict.
CAS_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local expected = tonumber(ARGV[1])
if cur ~= expected then
  if cur == expected + 1 and redis.call('HGET', KEYS[1], 's') == ARGV[2] then return {1, cur} end
  return {0, cur}
end
local new = cur + 1
redis.call('HSET', KEYS[1], 'v', new, 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, new}
"""


class RedisSessions:
    """Sessions in Redis: one hash per session (`v` the version, `s` the state JSON) under `prefix`.

    The TTL is the key's expiry, set again on every write (a session unused for `ttl_s` is dropped by Redis
    itself). The store outlives the Ray cluster: a full restart of Ray finds every session again. Durability
    is Redis's own (run it with `appendonly yes`; `appendfsync everysec` loses at most a second on a crash of
    the machine). The client is created lazily, on the event loop that first uses it.
    """

    def __init__(self, url: str, ttl_s: float, prefix: str = REDIS_PREFIX,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url, self.ttl_s, self.prefix, self.timeout_s = url, ttl_s, prefix, timeout_s
        self._client = None
        self._cas = None

    def _redis(self):
        if self._client is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff

            # A short socket timeout and a couple of quick retries; the whole call is bounded by `timeout_s`.
            self._client = aioredis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=min(self.timeout_s, 2.0),
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2), health_check_interval=30)
            self._cas = self._client.register_script(CAS_LUA)
        return self._client

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}{session_id}"

    async def _bounded(self, what: str, coro):
        from redis.exceptions import RedisError

        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"redis session store: {what} failed ({type(e).__name__})") from e

    async def get(self, session_id: str) -> tuple[int, dict] | None:
        version, state = await self._bounded("get", self._redis().hmget(self._key(session_id), "v", "s"))
        if state is None:
            return None
        return (0 if version is None else int(version)), json.loads(state)  # no version: saved before versions

    async def put(self, session_id: str, state: dict, expected_version: int | None) -> int:
        expected = expected_of(expected_version)
        self._redis()
        payload = json.dumps(state, separators=(",", ":"), sort_keys=True)
        ok, version = await self._bounded("put", self._cas(keys=[self._key(session_id)],
                                                           args=[expected, payload, max(1, int(self.ttl_s * 1000))]))
        if not ok:
            raise SessionConflict(session_id, expected, int(version))
        return int(version)

    async def delete(self, session_id: str) -> bool:
        return bool(await self._bounded("delete", self._redis().delete(self._key(session_id))))

    async def info(self) -> dict:
        await self._bounded("ping", self._redis().ping())
        return {"backend": "redis", "ttl_s": self.ttl_s}

    async def count(self, prefix: str, exclude: str | None = None) -> int:
        """SCAN over the prefix (keys expire by themselves, so every key found is live)."""
        async def scan() -> int:
            n, start = 0, len(self._key(prefix))
            async for key in self._redis().scan_iter(match=self._key(prefix) + "*", count=1000):
                key = key.decode() if isinstance(key, bytes) else key
                n += not (exclude and key[start:].startswith(exclude))
            return n
        return await self._bounded("count", scan())

    def set_ttl(self, ttl_s: float) -> None:
        """The expiry given to every later write (keys keep theirs until written again)."""
        self.ttl_s = ttl_s

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = self._cas = None
