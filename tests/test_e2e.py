"""End to end over HTTP against a real local Ray cluster and Serve app with the real models."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.helpers.serve import chat, check_guard_verdict, replicas, stage, wait_running

pytestmark = pytest.mark.serve

STAGES = ["session", "intent", "reasoner", "decision", "responder"]
AMBIGUOUS = "I see a payment I don't recognise"


def test_health_and_openapi(app_url: str) -> None:
    health = httpx.get(f"{app_url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["domain"].startswith("banking")
    spec = httpx.get(f"{app_url}/openapi.json", timeout=30).json()
    assert {"/v1/chat", "/v1/sessions/{session_id}", "/healthz"} <= set(spec["paths"])
    assert httpx.get(f"{app_url}/docs", timeout=30).status_code == 200


def test_ambiguous_request_asks_then_acts_on_yes(app_url: str) -> None:
    first = chat(app_url, AMBIGUOUS)
    sid = first["session_id"]
    assert first["action"]["kind"] == "ask", first["action"]
    decision = stage(first, "decision")["output"]
    question = first["action"]["target"]
    # The question was chosen by value of information: it is the best-scoring ask, and asking
    # beats every immediate action in expected utility.
    asks = {k.removeprefix("ask:"): v for k, v in decision["expected_utility"].items() if k.startswith("ask:")}
    acts = {k: v for k, v in decision["expected_utility"].items() if not k.startswith("ask:")}
    assert question == max(asks, key=asks.get)
    assert asks[question] > max(acts.values())
    assert decision["value_of_information"][question] > 0
    assert decision["question"] in first["reply"]
    # Every stage appears in the trace with its own timing.
    assert [s["stage"] for s in first["trace"]["stages"]] == STAGES
    assert all(s["ms"] > 0 for s in first["trace"]["stages"] if s["stage"] != "session")
    assert {"intent", "reasoner", "decision", "responder"} <= set(first["trace"]["model_versions"])
    assert stage(first, "intent")["output"]["top"][0]["label"]
    assert stage(first, "reasoner")["output"]["passages"]

    second = chat(app_url, "yes", sid)
    assert second["session_id"] == sid
    assert stage(second, "decision")["output"]["answered"] == f"{question}=yes"
    assert second["action"] | {"executed": []} == {"kind": "action", "name": "freeze_card", "target": None, "executed": []}
    assert [r["status"] for r in second["action"]["executed"]] == ["done"]  # frozen on the action server
    assert "frozen" in second["reply"]

    session = httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).json()["session"]
    assert session["turns"] == 2 and len(session["history"]) == 4
    assert session["pending_question"] is None


def test_no_leads_to_the_faq_answer(app_url: str) -> None:
    first = chat(app_url, AMBIGUOUS)
    assert first["action"]["kind"] == "ask"
    second = chat(app_url, "no, I don't think so", first["session_id"])
    assert second["action"]["kind"] == "answer"
    assert second["action"]["target"] in {"card_payment_not_recognised", "direct_debit_payment_not_recognised",
                                          "cash_withdrawal_not_recognised"}


def test_clear_requests_are_answered_directly(app_url: str) -> None:
    lost = chat(app_url, "My card was stolen this morning, please help")
    assert lost["action"]["name"] == "freeze_card"
    faq = chat(app_url, "How long does it take for my new card to arrive?")
    assert faq["action"]["kind"] == "answer"
    assert faq["action"]["target"] in {"card_arrival", "card_delivery_estimate"}
    oos = chat(app_url, "What will the weather be like in Paris tomorrow?")
    assert oos["action"]["kind"] == "decline"
    hello = chat(app_url, "hello")
    assert hello["action"] == {"kind": "chitchat", "name": "greeting", "target": None, "executed": []}


def test_responder_output_is_guarded(app_url: str) -> None:
    message = "How do I top up my account with a bank transfer?"
    data = chat(app_url, message)
    decision = stage(data, "decision")["output"]
    assert (decision["kind"], decision["target"]) == ("answer", "transfer_into_account"), decision["action"]
    # What was sent is what the guard allows for what the LM wrote: the FAQ answer verbatim and the LM's
    # acknowledgement after it, or the FAQ answer alone with the guard's reason.
    from coact.graphs.policy.domain import load_pack

    faq = load_pack("banking").intent("transfer_into_account").faq
    check_guard_verdict(message, data["reply"], data["trace"])
    assert data["reply"].startswith(faq)


DESTRUCTIVE_APP = "coact-kill"


def test_session_survives_replica_kill(serve_app) -> None:
    """Kills replicas, so on an app of its own: the app the other tests share is never touched."""
    import ray

    url = serve_app(DESTRUCTIVE_APP, {"responder": {"generate": False}})
    first = chat(url, AMBIGUOUS)
    assert first["action"]["kind"] == "ask"
    killed = replicas(DESTRUCTIVE_APP, "ChatIngress", "DecisionActor")
    assert len(killed) >= 2, killed
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"] in killed:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    # Serve's controller replaces the replicas; wait until the application is running again.
    wait_running(DESTRUCTIVE_APP, url, timeout_s=180)
    second = chat(url, "yes", first["session_id"])
    assert second["action"]["name"] == "freeze_card"
    assert not killed & replicas(DESTRUCTIVE_APP, "ChatIngress", "DecisionActor")  # replaced, not reused


def test_action_replica_killed_mid_freeze_freezes_once(serve_app, action_server) -> None:
    """The ActionActor dies while its freeze call waits at the action server: the turn answers 503 (or the
    ingress's retry lands), the client sends the turn again, and the card is frozen exactly once."""
    import ray

    url = serve_app(DESTRUCTIVE_APP, {"responder": {"generate": False}})
    sid = chat(url, "hello")["session_id"]
    message = "someone has been using my card without my permission"
    action_server.faults(delay_s=1.5, actions=["freeze_card"])  # within the webhook's 2 s timeout
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/chat", json={"message": message, "session_id": sid},
                                  timeout=120)
            time.sleep(0.8)  # the call is at the server now
            victims = replicas(DESTRUCTIVE_APP, "ActionActor")
            assert victims
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["name"] in victims:
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            first = pending.result()
    finally:
        action_server.faults()
    assert first.status_code in (200, 503), first.text
    resp = first.json()
    if first.status_code == 503:  # what a client does with a 503: wait, send the same turn again
        assert first.headers["retry-after"]
        wait_running(DESTRUCTIVE_APP, url, timeout_s=180)
        resp = chat(url, message, sid)
    (done,) = resp["action"]["executed"]
    calls = [c for c in action_server.get("/v1/calls", session_id=sid) if c["action"] == "freeze_card"]
    assert len(calls) == 1, calls
    assert done["status"] == "done" and done["reference"] == calls[0]["outcome"]["reference"]


def test_concurrent_requests_are_batched(app_url: str) -> None:
    messages = [f"How much does it cost to transfer {n} euros abroad?" for n in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda m: chat(app_url, m), messages))
    assert len({r["session_id"] for r in results}) == 16
    sizes = [stage(r, "reasoner")["output"]["batch_size"] for r in results]
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"message": ""}, 422, "message"),
        ({"message": "x" * 100_000}, 413, "too large"),
        ({"message": "y" * 3000}, 413, "too long"),
        ({"message": 123}, 422, "message"),
        ({"message": ["a"]}, 422, "message"),
        ({}, 422, "message"),
        ({"message": "hi", "session_id": "../etc"}, 422, "session_id"),
        ({"message": "hi", "session_id": "0123456789abcdef"}, 404, "unknown session_id"),
        ({"message": "hi", "extra": 1}, 422, "extra"),
    ],
)
def test_bad_input_gets_a_clear_4xx(app_url: str, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{app_url}/v1/chat", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert "error" in r.json()


def test_invalid_json_and_unknown_sessions(app_url: str) -> None:
    r = httpx.post(f"{app_url}/v1/chat", content=b'{"message": "hi"', headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert httpx.get(f"{app_url}/v1/sessions/nope", timeout=30).status_code == 404
    assert httpx.get(f"{app_url}/v1/sessions/bad%20id", timeout=30).status_code == 422
    assert httpx.delete(f"{app_url}/v1/sessions/nope", timeout=30).status_code == 404
    sid = chat(app_url, "hello")["session_id"]
    assert httpx.delete(f"{app_url}/v1/sessions/{sid}", timeout=30).json() == {"deleted": sid}
    assert httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).status_code == 404


def test_overload_gets_503_with_retry_after(serve_app) -> None:
    """A second app whose Responder takes one turn at a time and queues one more: the rest are shed."""
    url = serve_app("coact-overload", {"responder": {"max_new_tokens": 8, "deployment": {
        "max_ongoing_requests": 1, "max_queued_requests": 1}}})

    def post(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat", json={"message": f"How do I top up {i} euros by card?"}, timeout=180)

    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    shed = [r for r in responses if r.status_code == 503]
    assert shed and codes.count(200) >= 1, codes
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"].startswith("overloaded")


def test_chat_cli_talks_to_the_app(app_url: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "coact.cluster.cli", "chat", "--url", app_url, "--trace"],
                         input="I see a payment I don't recognise\nyes\n\n", capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.count("bot>") == 2
    assert "[ask: ask:q_someone_else]" in out and "[action: freeze_card]" in out
    assert "decision" in out and " ms" in out
