"""The Redis session backend against a real redis-server (fixture `redis_server`), and the config that picks
a backend. No Ray: the embedded backend's logic is tests/test_session_journal.py."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import ValidationError

from coact.actors.config import SessionsConfig
from coact.actors.session_backends import RedisSessions, SessionBackend, SessionConflict, StoreUnavailable

pytestmark = pytest.mark.unit


def _store(url: str, **kw) -> RedisSessions:
    return RedisSessions(url, ttl_s=kw.pop("ttl_s", 60.0), prefix=f"test:{uuid.uuid4().hex}:", **kw)


def test_redis_compare_and_set(redis_server) -> None:
    async def run() -> None:
        store = _store(redis_server.url)
        assert isinstance(store, SessionBackend)
        try:
            assert await store.get("s") is None
            assert await store.put("s", {"n": 1}, None) == 1
            with pytest.raises(SessionConflict) as e:
                await store.put("s", {"n": 2}, 0)  # must not exist yet: it does
            assert (e.value.expected, e.value.actual) == (0, 1)
            assert await store.put("s", {"n": 2}, 1) == 2
            assert await store.put("s", {"n": 2}, 1) == 2  # the same write retried: done, not a conflict
            assert await store.get("s") == (2, {"n": 2})
            # Eight writers that all loaded version 2, concurrently: exactly one wins.
            outcomes = await asyncio.gather(*(store.put("s", {"writer": i}, 2) for i in range(8)),
                                            return_exceptions=True)
            assert sorted(map(str, (o if isinstance(o, int) else "conflict" for o in outcomes))) == \
                ["3"] + ["conflict"] * 7
            assert all(isinstance(o, SessionConflict) for o in outcomes if not isinstance(o, int))
            assert (await store.get("s"))[0] == 3
            assert await store.delete("s") and not await store.delete("s")
            assert await store.get("s") is None
            assert (await store.info())["backend"] == "redis"
        finally:
            await store.close()

    asyncio.run(run())


def test_redis_ttl_is_the_key_expiry_refreshed_on_write(redis_server) -> None:
    async def run() -> None:
        store = _store(redis_server.url, ttl_s=0.6)
        try:
            await store.put("s", {"n": 1}, None)
            await asyncio.sleep(0.4)
            await store.put("s", {"n": 2}, 1)  # written again: another 0.6 s
            await asyncio.sleep(0.4)
            assert await store.get("s") == (2, {"n": 2})
            await asyncio.sleep(0.5)
            assert await store.get("s") is None
            store.set_ttl(60)
            assert await store.put("s", {"n": 1}, 0) == 1
            ms = await store._redis().pttl(store._key("s"))
            assert 50_000 < ms <= 60_000
        finally:
            await store.close()

    asyncio.run(run())


def test_redis_down_is_unavailable_not_an_error() -> None:
    from coact.cluster.runtime import free_port

    async def run() -> None:
        store = RedisSessions(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, timeout_s=1.0)
        try:
            for call in (store.get("s"), store.put("s", {}, None), store.delete("s"), store.info()):
                with pytest.raises(StoreUnavailable):
                    await call
        finally:
            await store.close()

    asyncio.run(run())


def test_sessions_config_checks_the_backend() -> None:
    assert SessionsConfig().backend == "embedded"
    cfg = SessionsConfig(backend="redis", redis_url="redis://127.0.0.1:6379/0", ttl_s=60)
    assert cfg.redis_url.endswith("/0")
    with pytest.raises(ValidationError, match="redis_url"):
        SessionsConfig(backend="redis")
    with pytest.raises(ValidationError):
        SessionsConfig(backend="memcached")
    with pytest.raises(ValidationError):
        SessionsConfig(backend="redis", redis_url="http://example")


def test_session_locks_run_turns_in_arrival_order_and_clean_up() -> None:
    from coact.graphs.serving.pipeline import SessionLocks

    async def run() -> list[str]:
        locks, order = SessionLocks(), []

        async def turn(name: str, sid: str | None, delay: float) -> None:
            async with locks.hold(sid):
                order.append(f"{name}+")
                await asyncio.sleep(delay)
                order.append(f"{name}-")

        tasks = [asyncio.create_task(turn("a", "s", 0.05))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(turn("b", "s", 0.0)), asyncio.create_task(turn("c", "s", 0.0)),
                  asyncio.create_task(turn("x", "other", 0.0)), asyncio.create_task(turn("n", None, 0.0))]
        await asyncio.gather(*tasks)
        assert len(locks) == 0
        return order

    order = asyncio.run(run())
    same = [e for e in order if e[0] in "abc"]
    assert same == ["a+", "a-", "b+", "b-", "c+", "c-"]  # one at a time, first come first served
    assert order.index("x-") < order.index("a-") and order.index("n-") < order.index("a-")  # others do not wait
