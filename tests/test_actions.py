"""Actions that really happen, over HTTP: the served graph executes decided actions on the real reference action
server, the reply follows the executor's result, retries act once, confirmation is asked where it pays and a
declined one executes nothing, and every executed action is in the audit log with its decision."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.serve

AT_RISK = "someone has been using my card without my permission, I never made these payments"
# Messages whose risk is uncertain: someone else may or may not have used the card.
UNCERTAIN = [
    "I gave my card details to a website that looked a bit odd",
    "my son used my card without asking me",
    "I lost my wallet with my cards in it",
    "I typed my card number into a link from a text message",
    "my flatmate might have borrowed my card",
]
CLAIMS = ("have frozen", "I've passed this conversation")
PACK_CONFIRM = "Shall I freeze your card now?"


def chat(url: str, message: str, session_id: str | None = None) -> dict:
    body = {"message": message} | ({"session_id": session_id} if session_id else {})
    r = httpx.post(f"{url}/v1/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def audit(url: str, session_id: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/audit", params={"session_id": session_id}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


def stage(resp: dict, name: str) -> list[dict]:
    return [s["output"] for s in resp["trace"]["stages"] if s["stage"] == name]


def test_at_risk_turn_freezes_once_even_when_retried(template_app_url: str, action_server) -> None:
    url = template_app_url
    sid = chat(url, "hello")["session_id"]
    # The same turn sent twice at once (a client retrying a turn it thinks was lost), with one Idempotency-Key
    # (docs/sessions.md): applied once, and both answered with that turn. The action's own idempotency key
    # makes the executor act once even for two turns that race across ingress replicas.
    def send(_: int) -> dict:
        r = httpx.post(f"{url}/v1/chat", json={"message": AT_RISK, "session_id": sid},
                       headers={"Idempotency-Key": f"retry-{sid}"}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(send, range(2))
    assert first == second
    for resp in (first, second):
        assert resp["action"]["name"] == "freeze_card", resp["action"]
        (done,) = resp["action"]["executed"]
        assert done["status"] == "done" and done["reference"] in resp["reply"]
        assert stage(resp, "action")[0]["idempotency_key"] == done["idempotency_key"]
    assert first["action"]["executed"][0]["reference"] == second["action"]["executed"][0]["reference"]
    assert [c["action"] for c in action_server.get("/v1/calls", session_id=sid)] == ["freeze_card"]
    assert action_server.get(f"/v1/cards/{sid}")["status"] == "frozen"
    (entry,) = audit(url, sid)
    assert (entry["action"], entry["status"]) == ("freeze_card", "done")
    call = entry["call"]
    assert call["expected_utility"]["freeze_card"] == max(call["expected_utility"].values())
    assert call["posterior"]["card_at_risk"]["yes"] > 0.5 and call["evidence"] and call["summary"]
    # Asked again in the same conversation, the card is not frozen twice: the customer hears it already is.
    again = chat(url, "please block my card, someone is using it", sid)
    assert again["action"]["executed"] == [] and "already frozen" in again["reply"]
    assert len(audit(url, sid)) == 1


def test_failing_action_server_means_no_claim_and_a_hand_over(template_app_url: str, action_server) -> None:
    action_server.faults(status=503, actions=["freeze_card"])
    try:
        resp = chat(template_app_url, AT_RISK)
    finally:
        action_server.faults()
    freeze, handover = resp["action"]["executed"]
    assert (freeze["action"], freeze["status"], freeze["attempts"]) == ("freeze_card", "failed", 3)
    assert (handover["action"], handover["status"]) == ("escalate", "done")
    assert "couldn't freeze" in resp["reply"] and "have frozen" not in resp["reply"]
    assert handover["reference"] in resp["reply"]
    sid = resp["session_id"]
    (ticket,) = action_server.get("/v1/tickets", session_id=sid)
    assert ticket["reference"] == handover["reference"]
    assert AT_RISK in str(ticket["conversation"]) and "freeze_card failed" in ticket["summary"]
    assert [(e["action"], e["status"]) for e in audit(template_app_url, sid)] == [("freeze_card", "failed"),
                                                                                  ("escalate", "done")]


def test_slow_or_down_action_server_never_claims_success(template_app_url: str, action_server) -> None:
    action_server.faults(delay_s=5.0)  # past the webhook's 2 s timeout
    try:
        slow = chat(template_app_url, AT_RISK)
    finally:
        action_server.faults()
    action_server.down()
    try:
        down = chat(template_app_url, AT_RISK)
    finally:
        action_server.up()
    for resp in (slow, down):
        assert [r["status"] for r in resp["action"]["executed"]] == ["failed", "failed"]
        assert not any(claim in resp["reply"] for claim in CLAIMS), resp["reply"]
        assert "couldn't" in resp["reply"]
    assert "within" in slow["action"]["executed"][0]["reason"]
    assert "reach" in down["action"]["executed"][0]["reason"]
    # Back up: the next conversation's freeze happens.
    assert chat(template_app_url, AT_RISK)["action"]["executed"][0]["status"] == "done"


def _to_confirmation(url: str, message: str) -> tuple[list[str], dict]:
    """Open a case with `message` and answer the policy's other questions "not sure", until it offers to freeze or
    decides; returns the customer's turns and the last response."""
    said, resp = [message], chat(url, message)
    while resp["action"]["kind"] == "ask" and resp["action"]["name"] != "ask:confirm:freeze_card" and len(said) < 3:
        said.append("I'm not sure")
        resp = chat(url, said[-1], resp["session_id"])
    return said, resp


def test_confirmation_is_asked_when_the_risk_is_uncertain_and_a_no_executes_nothing(
        template_app_url: str, action_server) -> None:
    url = template_app_url
    seen, asked = {}, None
    for message in UNCERTAIN:
        said, resp = _to_confirmation(url, message)
        seen[message] = resp["action"]["name"]
        if resp["action"]["name"] == "ask:confirm:freeze_card":
            asked = (said, resp)
            break
    assert asked, f"no uncertain case was confirmed before freezing: {seen}"
    said, first = asked
    sid = first["session_id"]
    assert PACK_CONFIRM in first["reply"] and first["action"]["executed"] == []
    declined = chat(url, "no, don't do that", sid)
    # Declined: no freeze, now or later in the case (the policy may choose another action, e.g. a hand-over).
    assert declined["action"]["name"] != "freeze_card" and "have frozen" not in declined["reply"]
    assert "freeze_card" not in [r["action"] for r in declined["action"]["executed"]]
    assert "freeze_card" not in [c["action"] for c in action_server.get("/v1/calls", session_id=sid)]
    assert "freeze_card" not in [e["action"] for e in audit(url, sid)]
    assert httpx.get(f"{action_server.url}/v1/cards/{sid}", timeout=10).status_code == 404  # never frozen
    # The same conversation, agreed to: the freeze happens.
    again = None
    for text in said:
        again = chat(url, text, again["session_id"] if again else None)
    assert again["action"]["name"] == "ask:confirm:freeze_card"
    agreed = chat(url, "yes please", again["session_id"])
    assert agreed["action"]["name"] == "freeze_card"
    assert [r["status"] for r in agreed["action"]["executed"]] == ["done"]


def test_audit_route_names_bad_queries(template_app_url: str) -> None:
    for params, needle in (({"session_id": "not a valid id!"}, "session_id"), ({"limit": 0}, "limit")):
        r = httpx.get(f"{template_app_url}/v1/audit", params=params, timeout=30)
        assert r.status_code == 422 and needle in r.json()["error"]


def test_taking_the_freeze_back_unfreezes_the_card(template_app_url: str, action_server) -> None:
    first = chat(template_app_url, AT_RISK)
    sid = first["session_id"]
    assert action_server.get(f"/v1/cards/{sid}")["status"] == "frozen"
    back = chat(template_app_url, "no wait, that's not what I asked for, don't freeze it", sid)
    assert back["action"]["name"] == "unfreeze_card", back["trace"]["stages"]
    (undo,) = back["action"]["executed"]
    assert undo["status"] == "done" and "unfrozen" in back["reply"]
    assert action_server.get(f"/v1/cards/{sid}")["status"] == "active"
    assert [(e["action"], e["status"]) for e in audit(template_app_url, sid)] == [("freeze_card", "done"),
                                                                                  ("unfreeze_card", "done")]
    # Asked again, the card is frozen again (it is no longer "already frozen").
    again = chat(template_app_url, "actually yes, freeze it, someone is using my card", sid)
    assert [r["action"] for r in again["action"]["executed"]] == ["freeze_card"]


def test_audit_log_survives_its_actor_restarting(template_app_url: str) -> None:
    import ray

    from coact.actors.audit_log import AUDIT_NAME
    from coact.actors.session_store import STORE_NAMESPACE

    sid = chat(template_app_url, AT_RISK)["session_id"]
    before = audit(template_app_url, sid)
    assert [e["action"] for e in before] == ["freeze_card"]
    # The actor's process dies (no_restart=False: Ray restarts it, as after a crash); the file keeps the rows.
    ray.kill(ray.get_actor(AUDIT_NAME, namespace=STORE_NAMESPACE), no_restart=False)
    after = audit(template_app_url, sid)
    assert [(e["id"], e["call"]) for e in after] == [(e["id"], e["call"]) for e in before]


def test_failed_freeze_after_an_earlier_hand_over_says_the_hand_over_stands(template_app_url: str,
                                                                            action_server) -> None:
    url = template_app_url
    first = chat(url, "I want to speak to a real person, this is ridiculous!!")
    assert [r["action"] for r in first["action"]["executed"]] == ["escalate"]
    action_server.faults(status=503, actions=["freeze_card"])
    try:
        resp = chat(url, AT_RISK, first["session_id"])
    finally:
        action_server.faults()
    assert [(r["action"], r["status"]) for r in resp["action"]["executed"]] == [("freeze_card", "failed")]
    assert "{" not in resp["reply"] and "couldn't freeze" in resp["reply"], resp["reply"]
    # Decided again onto the hand-over already open: the customer hears it stands, no second ticket is opened.
    assert resp["action"]["name"] == "escalate" and "in the queue" in resp["reply"], resp["reply"]
    assert len(action_server.get("/v1/tickets", session_id=first["session_id"])) == 1
