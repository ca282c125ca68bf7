"""The reference action server (coact.cluster.action_server), a real subprocess driven over HTTP: idempotent
replays, the card and ticket effects, JSON errors, fault injection, restarts on the same db, the token."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from coact.cluster.action_server.process import ActionServerProcess, start_action_server
from coact.graphs.policy.messages import ActionOutcome

pytestmark = pytest.mark.unit

_keys = itertools.count(1)


def call(action: str, session_id: str, key: str | None = None, **fields: Any) -> dict[str, Any]:
    """An ActionCall body; a fresh idempotency key unless one is given."""
    return {"idempotency_key": key or f"key-{next(_keys)}", "session_id": session_id, "turn": 1,
            "action": action, **fields}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServerProcess]:
    with start_action_server(db_path=tmp_path_factory.mktemp("action_server") / "state.sqlite") as srv:
        yield srv


@pytest.fixture()
def client(server: ActionServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as c:
        yield c


def test_freeze_is_applied_once_per_idempotency_key(client: httpx.Client) -> None:
    body = call("freeze_card", "s-freeze", key="freeze-1")
    first = client.post("/v1/actions/freeze_card", json=body, headers={"Idempotency-Key": "freeze-1"})
    again = client.post("/v1/actions/freeze_card", json=body)
    assert first.status_code == again.status_code == 200
    outcome = ActionOutcome.model_validate(first.json())
    assert outcome.status == "done" and outcome.reference and outcome.reference.startswith("F-")
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert [c["idempotency_key"] for c in client.get("/v1/calls", params={"session_id": "s-freeze"}).json()] \
        == ["freeze-1"]
    assert client.get("/v1/cards/s-freeze").json()["status"] == "frozen"
    # A new key is a new call: applied, and it says the card was frozen already.
    later = client.post("/v1/actions/freeze_card", json=call("freeze_card", "s-freeze")).json()
    assert later["status"] == "done" and later["reason"] == "already frozen"
    assert later["reference"] != outcome.reference
    assert len(client.get("/v1/calls", params={"session_id": "s-freeze"}).json()) == 2
    unfrozen = client.post("/v1/actions/unfreeze_card", json=call("unfreeze_card", "s-freeze")).json()
    assert unfrozen["status"] == "done" and client.get("/v1/cards/s-freeze").json()["status"] == "active"


def test_concurrent_retries_apply_once(server: ActionServerProcess) -> None:
    body = call("escalate", "s-race", key="race-1")

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/actions/escalate", json=body, timeout=10.0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(post, range(8)))
    assert {a.status_code for a in answers} == {200} and len({a.json()["reference"] for a in answers}) == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    assert len(httpx.get(f"{server.url}/v1/tickets", params={"session_id": "s-race"}).json()) == 1


def test_escalate_opens_a_ticket_with_the_case(client: httpx.Client) -> None:
    conversation = [{"role": "user", "text": "my card was stolen"}, {"role": "assistant", "text": "Frozen."},
                    {"role": "user", "text": "I want a person"}]
    body = call("escalate", "s-escalate", summary="Stolen card, frozen; asks for a person.",
                conversation=conversation, reason="request_human", posterior={"goal": {"stolen": 0.9}},
                evidence=[{"label": "request_human", "variable": "act", "shift": 0.4}])
    outcome = client.post("/v1/actions/escalate", json=body).json()
    assert outcome["status"] == "done" and outcome["reference"].startswith("T-")
    listed = client.get("/v1/tickets", params={"session_id": "s-escalate"}).json()
    assert [t["reference"] for t in listed] == [outcome["reference"]]
    ticket = client.get(f"/v1/tickets/{outcome['reference']}").json()
    assert ticket["conversation"] == conversation and ticket["summary"] == body["summary"]
    assert ticket["status"] == "open" and ticket["decision"]["reason"] == "request_human"
    assert ticket["decision"]["posterior"] == {"goal": {"stolen": 0.9}}
    assert client.get("/v1/tickets/T-999999").status_code == 404
    assert client.get("/v1/state").json()["tickets"]["open"] >= 1


def test_bad_calls_answer_json_errors(client: httpx.Client) -> None:
    unknown = client.post("/v1/actions/teleport", json=call("teleport", "s-bad"))
    assert unknown.status_code == 404 and unknown.json() == {"error": "unknown action 'teleport'"}
    mismatch = client.post("/v1/actions/freeze_card", json=call("escalate", "s-bad"))
    assert mismatch.status_code == 422 and "escalate" in mismatch.json()["error"]
    header = client.post("/v1/actions/freeze_card", json=call("freeze_card", "s-bad", key="a"),
                         headers={"Idempotency-Key": "b"})
    assert header.status_code == 422 and "Idempotency-Key" in header.json()["error"]
    malformed = client.post("/v1/actions/freeze_card", content=b'{"session_id": ',
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and malformed.json()["error"]
    missing = client.post("/v1/actions/freeze_card", json={"action": "freeze_card", "turn": "x"})
    assert missing.status_code == 422
    assert {f["loc"][-1] for f in missing.json()["fields"]} >= {"idempotency_key", "session_id", "turn"}
    # None of them had an effect.
    assert client.get("/v1/calls", params={"session_id": "s-bad"}).json() == []
    assert client.get("/v1/cards/s-bad").status_code == 404


def test_fault_status_hits_only_its_actions_until_cleared(client: httpx.Client) -> None:
    set_ = client.put("/v1/admin/faults", json={"status": 503, "actions": ["freeze_card"]})
    try:
        assert set_.status_code == 200
        failed = client.post("/v1/actions/freeze_card", json=call("freeze_card", "s-fault", key="fault-1"))
        assert failed.status_code == 503 and "injected" in failed.json()["error"]
        other = client.post("/v1/actions/escalate", json=call("escalate", "s-fault"))
        assert other.status_code == 200
    finally:
        assert client.delete("/v1/admin/faults").status_code == 200
    # The faulted call had no effect, so its retry is the first application.
    retried = client.post("/v1/actions/freeze_card", json=call("freeze_card", "s-fault", key="fault-1"))
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert client.put("/v1/admin/faults", json={"delay_s": -1}).status_code == 422


def test_fault_delay_holds_the_call(client: httpx.Client) -> None:
    delay = 0.3
    assert client.put("/v1/admin/faults", json={"delay_s": delay}).status_code == 200
    try:
        start = time.monotonic()
        answer = client.post("/v1/actions/freeze_card", json=call("freeze_card", "s-delay"))
        took = time.monotonic() - start
    finally:
        client.delete("/v1/admin/faults")
    assert answer.status_code == 200 and took >= delay


def test_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "restart.sqlite"
    body = call("escalate", "s-restart", key="restart-1", summary="carried over")
    with start_action_server(db_path=db) as first:
        before = httpx.post(f"{first.url}/v1/actions/escalate", json=body).json()
    assert not first.alive()
    with start_action_server(db_path=db) as second:
        assert second.pid != first.pid
        replay = httpx.post(f"{second.url}/v1/actions/escalate", json=body)
        assert replay.json() == before and replay.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{second.url}/v1/tickets/{before['reference']}").json()["summary"] == "carried over"


def test_token_is_required_when_set(tmp_path: Path) -> None:
    with start_action_server(db_path=tmp_path / "token.sqlite", token="s3cret") as srv:
        body = call("freeze_card", "s-token")
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # probes need no token
        denied = httpx.post(f"{srv.url}/v1/actions/freeze_card", json=body)
        assert denied.status_code == 401 and denied.json()["error"]
        wrong = httpx.get(f"{srv.url}/v1/state", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.post(f"{srv.url}/v1/actions/freeze_card", json=body,
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["status"] == "done"
