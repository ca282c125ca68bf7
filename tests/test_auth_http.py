"""API keys over HTTP, on an app of its own with a keys file: every route but the probes and the page needs a
key, sessions belong to the key that made them, each key has its rate limit, CORS only for listed origins.
(The shared apps run without keys: loopback clients only, which is what every other serve test is.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from coact.graphs.serving.auth import hash_key, new_key

pytestmark = pytest.mark.serve

ALICE, BOB, LIMITED, CAPPED = new_key(), new_key(), new_key(), new_key()
ORIGIN = "https://support.example.org"


@pytest.fixture(scope="module")
def keyed_url(serve_app_module, tmp_path_factory: pytest.TempPathFactory) -> str:
    keys: Path = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"alice {hash_key(ALICE)}\nbob {hash_key(BOB)}\n"
                    f"limited {hash_key(LIMITED)} rate_per_s=0.2 burst=3\n"
                    f"capped {hash_key(CAPPED)} max_sessions=2\n")
    return serve_app_module("keyed", {"responder": {"generate": False},
                                      "ingress": {"auth": {"keys_file": str(keys), "rate_per_s": 50, "burst": 50,
                                                           "cors_origins": [ORIGIN]}}})


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_without_a_valid_key_are_refused(keyed_url: str) -> None:
    for headers, problem in [({}, "missing API key"), ({"Authorization": "Basic YTpi"}, "expected 'Bearer <key>'"),
                             (_as(new_key()), "invalid API key")]:
        r = httpx.post(f"{keyed_url}/v1/chat", json={"message": "I lost my card"}, headers=headers, timeout=30)
        assert r.status_code == 401 and problem in r.json()["error"], r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    for method, path in [("GET", "/v1/sessions/abc"), ("DELETE", "/v1/sessions/abc"), ("GET", "/v1/audit"),
                         ("GET", "/v1/models"), ("POST", "/v1/explain")]:
        assert httpx.request(method, f"{keyed_url}{path}", timeout=30).status_code == 401, path
    # OpenAI clients get OpenAI's error shape
    r = httpx.post(f"{keyed_url}/v1/chat/completions", json={"model": "coact-banking",
                                                            "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    # probes and the page stay open
    assert httpx.get(f"{keyed_url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{keyed_url}/", timeout=30).status_code == 200


def test_sessions_belong_to_their_key(keyed_url: str) -> None:
    r = httpx.post(f"{keyed_url}/v1/chat", json={"message": "my card hasn't arrived"}, headers=_as(ALICE), timeout=120)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert httpx.get(f"{keyed_url}/v1/sessions/{sid}", headers=_as(ALICE), timeout=30).status_code == 200
    # another key does not see it, cannot continue it, read its audit or delete it
    assert httpx.get(f"{keyed_url}/v1/sessions/{sid}", headers=_as(BOB), timeout=30).status_code == 404
    r = httpx.post(f"{keyed_url}/v1/chat", json={"message": "yes", "session_id": sid}, headers=_as(BOB), timeout=60)
    assert r.status_code == 404, r.text
    assert httpx.get(f"{keyed_url}/v1/audit", params={"session_id": sid}, headers=_as(BOB), timeout=30).status_code == 404
    assert httpx.delete(f"{keyed_url}/v1/sessions/{sid}", headers=_as(BOB), timeout=30).status_code == 404
    audit = httpx.get(f"{keyed_url}/v1/audit", headers=_as(ALICE), timeout=30)
    assert audit.status_code == 422 and "session_id" in audit.json()["error"]
    assert httpx.get(f"{keyed_url}/v1/audit", params={"session_id": sid}, headers=_as(ALICE),
                     timeout=30).status_code == 200
    # the OpenAI route's `user` names a session in the caller's own space: the same name, two sessions
    body = {"model": "coact-banking", "user": "my-session-1", "messages": [{"role": "user", "content": "I lost my card"}]}
    a = httpx.post(f"{keyed_url}/v1/chat/completions", json=body, headers=_as(ALICE), timeout=120)
    b = httpx.post(f"{keyed_url}/v1/chat/completions", json=body, headers=_as(BOB), timeout=120)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    for key in (ALICE, BOB):
        turns = httpx.get(f"{keyed_url}/v1/sessions/my-session-1", headers=_as(key), timeout=30).json()
        assert len(turns["session"]["history"]) == 2  # one turn each: neither saw the other's
    assert httpx.delete(f"{keyed_url}/v1/sessions/{sid}", headers=_as(ALICE), timeout=30).status_code == 200


def test_rate_limit_per_key(keyed_url: str) -> None:
    codes = [httpx.get(f"{keyed_url}/v1/models", headers=_as(LIMITED), timeout=30) for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    limited = codes[3]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "rate limit of key 'limited'" in limited.json()["error"]["message"]  # an OpenAI route: its shape
    r = httpx.get(f"{keyed_url}/v1/sessions/abc", headers=_as(LIMITED), timeout=30)
    assert r.status_code == 429 and "rate limit" in r.json()["error"]
    assert httpx.get(f"{keyed_url}/v1/models", headers=_as(ALICE), timeout=30).status_code == 200  # its own bucket


def test_cors_only_for_listed_origins(keyed_url: str) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{keyed_url}/v1/chat", headers=preflight, timeout=30)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "Authorization" in r.headers["access-control-allow-headers"]
    r = httpx.get(f"{keyed_url}/v1/models", headers=_as(ALICE) | {"Origin": ORIGIN}, timeout=30)
    assert r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{keyed_url}/v1/models", headers=_as(ALICE) | {"Origin": "https://evil.example"}, timeout=30)
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    r = httpx.options(f"{keyed_url}/v1/chat", headers=preflight | {"Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_live_sessions_per_key_are_capped(keyed_url: str) -> None:
    def start(stream: bool = False) -> httpx.Response:
        return httpx.post(f"{keyed_url}/v1/chat", json={"message": "hello", "stream": stream}, headers=_as(CAPPED),
                          timeout=120)

    first, second = start(), start(stream=True)
    assert first.status_code == 200 and second.status_code == 200
    full = start()
    assert full.status_code == 429 and "too many sessions" in full.json()["error"] and full.headers["retry-after"]
    # an existing session goes on; another key is not affected; ending one makes room
    sid = first.json()["session_id"]
    r = httpx.post(f"{keyed_url}/v1/chat", json={"message": "thanks", "session_id": sid}, headers=_as(CAPPED),
                   timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{keyed_url}/v1/chat", json={"message": "hello"}, headers=_as(ALICE), timeout=120).status_code == 200
    assert httpx.delete(f"{keyed_url}/v1/sessions/{sid}", headers=_as(CAPPED), timeout=30).status_code == 200
    assert start().status_code == 200
