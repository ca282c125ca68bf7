"""Turns on one session at the same time, retried turns, and the Redis backend going down, over HTTP against
apps of this module's own (template replies, so turns are quick and exact).

- Concurrent turns on one session: each is either applied (the session's stored turns and history match the
  200s exactly) or answered 409 with a JSON body; none is lost and none is a 500. The app has two ingress
  replicas, so turns also race across replicas, where only the store's compare-and-set orders them.
- Idempotency-Key: a retried turn with the same key returns the first response and is applied once.
- Redis backend: with the server killed a turn and the session routes answer 503 + Retry-After (not 500);
  started again on the same port and folder, the session is there with every acknowledged turn.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

pytestmark = pytest.mark.serve

TEMPLATES = {"responder": {"generate": False}}
# The session's two shared apps and this module's app already reserve nearly all of the test cluster's 4 CPUs:
# the Redis app reserves none (reservations only; its turns are few), or Serve could never place it.
_NO_CPU = {"deployment": {"ray_actor_options": {"num_cpus": 0}}}
LIGHT = {"responder": {"generate": False, **_NO_CPU}, "intent": _NO_CPU, "reasoner": _NO_CPU, "decision": _NO_CPU,
         "ingress": _NO_CPU, "actions": _NO_CPU}
MESSAGES = ["Where is my new card?", "How do I top up my account?", "What is the exchange rate?",
            "My card payment was declined", "How long does a transfer take?", "I want to change my PIN",
            "Is there a fee for withdrawing cash?", "Can I get a virtual card?"]


@pytest.fixture(scope="module")
def two_ingress_url(serve_app_module) -> str:
    # ttl_s: the embedded store is one actor per cluster, likely started by an app before this one; the config's
    # TTL must reach it all the same (it would ignore its creation arguments).
    url = serve_app_module("coact-concurrency", TEMPLATES | {"ingress": {"deployment": {"num_replicas": 2}},
                                                             "sessions": {"ttl_s": 1700}})
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["backend"] == "embedded" and health["ttl_s"] == 1700, health
    return url


def _session(url: str, sid: str) -> dict:
    r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


async def _post_all(url: str, bodies: list[dict], headers: list[dict] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/chat", json=b, headers=(headers or [{}] * len(bodies))[i])
                                      for i, b in enumerate(bodies)))


def test_concurrent_turns_on_one_session_are_applied_or_refused(two_ingress_url: str) -> None:
    url = two_ingress_url
    first = httpx.post(f"{url}/v1/chat", json={"message": "hello"}, timeout=120)
    assert first.status_code == 200, first.text
    sid = first.json()["session_id"]
    for _round in range(2):
        before = _session(url, sid)
        responses = asyncio.run(_post_all(url, [{"message": m, "session_id": sid} for m in MESSAGES]))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 409}, [(r.status_code, r.text) for r in responses]
        for r in responses:
            assert r.headers["content-type"].startswith("application/json")
            if r.status_code == 409:
                assert "conflict" in r.json()["error"] and sid in r.json()["error"], r.text
        applied = [m for m, r in zip(MESSAGES, responses, strict=True) if r.status_code == 200]
        after = _session(url, sid)
        # Exactly the 200s were recorded: turns, versions, and the user's lines in the history.
        assert after["session"]["turns"] - before["session"]["turns"] == len(applied) >= 1, codes
        assert after["version"] - before["version"] == len(applied)
        new = after["session"]["history"][len(before["session"]["history"]):]
        assert len(new) == 2 * len(applied)
        assert sorted(t["text"] for t in new if t["role"] == "user") == sorted(applied)
        replies = {r.json()["reply"] for r in responses if r.status_code == 200}
        assert {t["text"] for t in new if t["role"] == "assistant"} == replies


def test_concurrent_streamed_turns_end_done_or_with_a_conflict_event(two_ingress_url: str) -> None:
    import concurrent.futures as cf

    from tests.helpers.sse import iter_events

    url = two_ingress_url
    sid = httpx.post(f"{url}/v1/chat", json={"message": "hello"}, timeout=120).json()["session_id"]

    def stream(message: str) -> list:
        body = {"message": message, "session_id": sid, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat", json=body, timeout=120) as r:
            assert r.status_code == 200
            return [(e.name, e.data) for e in iter_events(r)]

    with cf.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(stream, MESSAGES[:4]))
    done = [m for m, events in zip(MESSAGES, runs, strict=False) if events[-1][0] == "done"]
    for events in runs:
        assert events[-1][0] in ("done", "error"), events
        if events[-1][0] == "error":
            assert events[-1][1]["error"].startswith("conflict: "), events[-1]
    view = _session(url, sid)["session"]
    assert view["turns"] == 1 + len(done) and len(done) >= 1
    assert sorted(t["text"] for t in view["history"][2:] if t["role"] == "user") == sorted(done)


def test_a_retried_turn_with_the_same_idempotency_key_applies_once(two_ingress_url: str) -> None:
    url = two_ingress_url
    sid = httpx.post(f"{url}/v1/chat", json={"message": "hello"}, timeout=120).json()["session_id"]
    key = {"Idempotency-Key": f"turn-{uuid.uuid4()}"}
    body = {"message": "Where is my new card?", "session_id": sid}
    once = httpx.post(f"{url}/v1/chat", json=body, headers=key, timeout=120)
    assert once.status_code == 200, once.text
    for _ in range(2):  # the client did not see the answer and sends it again (any replica)
        again = httpx.post(f"{url}/v1/chat", json=body, headers=key, timeout=120)
        assert again.status_code == 200 and again.json() == once.json()
    view = _session(url, sid)
    assert view["session"]["turns"] == 2 and [t["text"] for t in view["session"]["history"]].count(body["message"]) == 1
    # Sent again as a stream: the stored response, as decision, token and done events.
    from tests.helpers.sse import iter_events

    with httpx.stream("POST", f"{url}/v1/chat", json=body | {"stream": True}, headers=key, timeout=120) as r:
        events = [(e.name, e.data) for e in iter_events(r)]
    assert [n for n, _ in events] == ["decision", "token", "done"], events
    assert events[1][1]["text"] == once.json()["reply"] and events[2][1]["reply"] == once.json()["reply"]
    assert events[2][1]["trace"] == once.json()["trace"]
    assert _session(url, sid)["session"]["turns"] == 2

    # Two copies of one keyed turn at the same time: applied once; each answered with that turn or a 409.
    key2 = {"Idempotency-Key": f"turn-{uuid.uuid4()}"}
    body2 = {"message": "How do I top up my account?", "session_id": sid}
    pair = asyncio.run(_post_all(url, [body2, body2], [key2, key2]))
    assert {r.status_code for r in pair} <= {200, 409} and 200 in {r.status_code for r in pair}
    assert len({r.text for r in pair if r.status_code == 200}) == 1
    assert _session(url, sid)["session"]["turns"] == 3
    retry = httpx.post(f"{url}/v1/chat", json=body2, headers=key2, timeout=120)
    assert retry.json() == next(r.json() for r in pair if r.status_code == 200)

    # The same key for another message is refused; a malformed key is named.
    other = httpx.post(f"{url}/v1/chat", json=body | {"message": "something else"}, headers=key, timeout=120)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"], other.text
    bad = httpx.post(f"{url}/v1/chat", json=body, headers={"Idempotency-Key": "no spaces allowed"}, timeout=120)
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"], bad.text
    assert _session(url, sid)["session"]["turns"] == 3

    # The OpenAI route: the client names the conversation, so even its first turn is retry-safe.
    conv = f"conv-{uuid.uuid4().hex[:12]}"
    oa = {"model": "coact-banking", "messages": [{"role": "user", "content": "Where is my new card?"}]}
    headers = {"X-Coact-Session-Id": conv, "Idempotency-Key": "oa-1"}
    c1 = httpx.post(f"{url}/v1/chat/completions", json=oa, headers=headers, timeout=120)
    assert c1.status_code == 200, c1.text
    c2 = httpx.post(f"{url}/v1/chat/completions", json=oa, headers=headers, timeout=120)
    assert c2.status_code == 200
    assert c2.json()["choices"][0]["message"]["content"] == c1.json()["choices"][0]["message"]["content"]
    assert _session(url, conv)["session"]["turns"] == 1


def test_embedded_store_actor_keeps_versions_across_a_restart(ray_cluster, tmp_path) -> None:
    """The store actor itself (one of this test's own, not the cluster's): CAS through Ray, the journal bringing
    versions back after its process is killed, and a dead store reported as unavailable, not hung on."""
    import ray

    from coact.actors.session_backends import SessionConflict, StoreUnavailable
    from coact.actors.session_store import EmbeddedSessions, SessionStore

    actor = SessionStore.options(max_restarts=-1, max_task_retries=-1).remote(60.0, str(tmp_path / "j.jsonl"))
    store = EmbeddedSessions(60.0, timeout_s=30.0, actor=actor)

    async def run(*calls):
        return [await c for c in calls]

    try:
        assert asyncio.run(run(store.put("s", {"n": 1}, None), store.put("s", {"n": 2}, 1))) == [1, 2]
        with pytest.raises(SessionConflict):
            asyncio.run(store.put("s", {"n": 3}, 1))
        pid = ray.get(actor.placement.remote())["pid"]
        ray.kill(actor, no_restart=False)  # the process dies; Ray restarts it and it replays its journal
        assert asyncio.run(store.get("s")) == (2, {"n": 2})
        placement = ray.get(actor.placement.remote())
        assert placement["pid"] != pid and placement["restored"] == 1 and placement["skipped"] == 0
        assert asyncio.run(store.put("s", {"n": 3}, 2)) == 3
    finally:
        ray.kill(actor, no_restart=True)
    quick = EmbeddedSessions(60.0, timeout_s=5.0, actor=actor)
    with pytest.raises(StoreUnavailable):
        asyncio.run(quick.get("s"))


def test_redis_backend_down_answers_503_and_keeps_acknowledged_turns(serve_app, redis_server) -> None:
    prefix = f"coact-test:{uuid.uuid4().hex[:8]}:"
    sessions = {"backend": "redis", "redis_url": redis_server.url, "redis_prefix": prefix, "timeout_s": 2.0}
    url = serve_app("coact-redis", LIGHT | {"sessions": sessions})
    assert httpx.get(f"{url}/healthz", timeout=30).json()["backend"] == "redis"
    first = httpx.post(f"{url}/v1/chat", json={"message": "Where is my new card?"}, timeout=120)
    assert first.status_code == 200, first.text
    sid = first.json()["session_id"]
    second = httpx.post(f"{url}/v1/chat", json={"message": "hello", "session_id": sid}, timeout=120)
    assert second.status_code == 200, second.text

    redis_server.kill()
    try:
        down = httpx.post(f"{url}/v1/chat", json={"message": "Can I get a virtual card?", "session_id": sid},
                          timeout=120)
        assert down.status_code == 503 and down.headers.get("retry-after"), (down.status_code, down.text)
        assert "session store" in down.json()["error"]
        for r in (httpx.get(f"{url}/v1/sessions/{sid}", timeout=60),
                  httpx.delete(f"{url}/v1/sessions/{sid}", timeout=60)):
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        assert httpx.get(f"{url}/healthz", timeout=60).status_code == 503
    finally:
        redis_server.start()  # same port, same folder: the append-only file brings the data back

    view = _session(url, sid)
    assert view["session"]["turns"] == 2 and view["version"] == 2
    assert [t["text"] for t in view["session"]["history"] if t["role"] == "user"] == ["Where is my new card?", "hello"]
    third = httpx.post(f"{url}/v1/chat", json={"message": "Can I get a virtual card?", "session_id": sid}, timeout=120)
    assert third.status_code == 200, third.text
    assert _session(url, sid)["session"]["turns"] == 3

    # The sessions live in Redis, not in Ray: read them there directly (what a restarted Ray cluster finds).
    from coact.actors.session_backends import RedisSessions

    async def stored():
        store = RedisSessions(redis_server.url, ttl_s=60, prefix=prefix)
        try:
            return await store.get(sid)
        finally:
            await store.close()

    version, state = asyncio.run(stored())
    assert version == 3 and state["turns"] == 3
