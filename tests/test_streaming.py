"""Streaming through the graph (transformers backend): SSE over HTTP and handle streaming to the Responder."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.sse_client import check_turn_stream, iter_events, stream_chat

pytestmark = pytest.mark.e2e

AMBIGUOUS = "I see a payment I don't recognise"


def responder(app: str = "coact"):
    from ray import serve

    return serve.get_deployment_handle("ResponderActor", app_name=app)


def stats(app: str = "coact") -> dict:
    return responder(app).get_stats.remote().result().model_dump()


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_stream_decision_first_then_tokens_then_done(app_url: str) -> None:
    events = stream_chat(app_url, "How long does it take for my new card to arrive?")
    done = check_turn_stream(events)
    decision_t = events[0].t
    tokens = [e for e in events if e.name == "token"]
    assert tokens, [e.name for e in events]
    # The decision reaches the client before any reply text, the reply text before the end.
    assert decision_t <= tokens[0].t <= events[-1].t
    assert done["responder_ms"] > 0
    if done["source"] == "model":
        assert done["first_token_ms"] is not None and done["first_token_ms"] < done["responder_ms"]
    assert done["action"]["kind"] == "answer"


def test_streamed_turns_keep_the_session_like_plain_turns(app_url: str) -> None:
    first = check_turn_stream(stream_chat(app_url, AMBIGUOUS))
    assert first["action"]["kind"] == "ask"
    decision = first["trace"]["stages"][3]["output"]
    assert decision["question"] in first["reply"]
    sid = first["session_id"]
    second = check_turn_stream(stream_chat(app_url, "yes", sid))
    assert second["action"] == {"kind": "action", "name": "freeze_card", "target": None}
    assert "frozen" in second["reply"]
    session = httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).json()["session"]
    assert session["turns"] == 2 and session["pending_question"] is None
    assert [t["text"] for t in session["history"]] == [AMBIGUOUS, first["reply"], "yes", second["reply"]]
    # A plain turn continues the streamed session.
    r = httpx.post(f"{app_url}/v1/chat", json={"session_id": sid, "message": "thanks"}, timeout=120).json()
    assert r["action"]["kind"] == "chitchat"


def test_stream_conversation_act(app_url: str) -> None:
    events = stream_chat(app_url, "hello")
    done = check_turn_stream(events)
    assert done["action"] == {"kind": "chitchat", "name": "greeting", "target": None}
    assert done["source"] == "template" and done["reply"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"message": "", "stream": True}, 422, "message"),
        ({"message": "hi", "stream": "please"}, 422, "stream"),
        ({"message": "hi", "stream": True, "session_id": "0123456789abcdef"}, 404, "unknown session_id"),
        ({"message": "y" * 3000, "stream": True}, 413, "too long"),
    ],
)
def test_stream_bad_input_is_a_json_4xx(app_url: str, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{app_url}/v1/chat", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert needle in r.text and "error" in r.json()


def test_client_disconnect_cancels_generation(app_url: str) -> None:
    before = stats()
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{app_url}/v1/chat", json={"message": AMBIGUOUS, "stream": True}, timeout=120) as r:
        first = next(iter_events(r, t0))
        assert first.name == "decision"
        sid = first.data["session_id"]
    # Leaving the `with` closed the connection right after the decision, before the reply finished.
    # A reference turn started after that: by its end, the abandoned reply (started first, as short)
    # would have finished too, had it not been cancelled.
    check_turn_stream(stream_chat(app_url, AMBIGUOUS))
    after = wait_for(lambda: (s := stats())["streams_active"] == 0 and s["engine_unfinished_requests"] == 0 and s,
                     what="the Responder's generation threads to stop")
    assert after["streams_finished"] == before["streams_finished"] + 1, (before, after)  # the reference only
    # Started and cancelled, or never started (the client left before the Responder was called).
    assert (after["streams_started"] - before["streams_started"]
            == 1 + after["streams_cancelled"] - before["streams_cancelled"]), (before, after)
    # An abandoned turn is not saved: the new session never came into being.
    assert httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).status_code == 404


def _request(message: str = "Where is my new card?"):
    """A real ResponderRequest, built by the graph's own stages for `message`."""
    from ray import serve

    from coact.graphs.policy.dialogue import plan_turn, reply_template
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import DecisionRequest, IntentRequest, ResponderRequest, SessionState

    pack = load_pack("banking")
    intent = serve.get_deployment_handle("IntentActor", app_name="coact").remote(IntentRequest(message=message)).result()
    reasoner = serve.get_deployment_handle("ReasonerActor", app_name="coact").remote(message).result()
    plan = plan_turn(SessionState(session_id="t"), message, intent, reasoner, pack)
    decision = serve.get_deployment_handle("DecisionActor", app_name="coact").remote(
        DecisionRequest(evidence=plan.evidence, turn=1)).result()
    template, forbidden = reply_template(pack, decision)
    return ResponderRequest(message=message, decision=decision, template=template, forbidden=forbidden)


def test_handle_stream_delivers_tokens_while_generating(app_url: str) -> None:
    req = _request()
    t0 = time.perf_counter()
    arrivals, result = [], None
    for chunk in responder().options(stream=True).stream.remote(req, raw=True, max_new_tokens=24):
        if chunk.kind == "token":
            arrivals.append(time.perf_counter() - t0)
        else:
            result = chunk.result
    assert result is not None and result.tokens == 24
    assert len(arrivals) >= 12  # token by token, not one block
    # The first token arrives long before the last: the tokens travelled while generation ran.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


def test_handle_stream_cancel_stops_generation(app_url: str) -> None:
    before = stats()
    gen = responder().options(stream=True).stream.remote(_request(), raw=True, max_new_tokens=400)
    got = 0
    for chunk in gen:
        assert chunk.kind == "token"
        got += 1
        if got == 2:
            break
    gen.cancel()
    after = wait_for(lambda: (s := stats())["streams_cancelled"] > before["streams_cancelled"]
                     and s["engine_unfinished_requests"] == 0 and s, what="cancellation")
    assert after["streams_active"] == 0


# --- the streaming guard, without Ray ---------------------------------------------------------------


def _decision(action: str = "answer:card_arrival", kind: str = "answer"):
    from coact.graphs.policy.messages import DecisionResult

    return DecisionResult(action=action, kind=kind, target="card_arrival", expected_utility={},
                          value_of_information={}, posterior={}, explanation=[], reason="test", domain_version="t")


def _feed(pieces: list[str], message: str = "my card has not arrived", template: str = "Cards arrive in days.",
          prefix: str = "I'm"):
    from coact.actors.guard import OpenerStream

    guard = OpenerStream(_decision(), [], grounding=f"{message} {template}", prefix=prefix)
    sent = [guard.feed("")]
    for p in pieces:
        sent.append(guard.feed(p))
    return guard, "".join(sent)


def test_opener_stream_releases_checked_text_and_stops_at_the_sentence_end() -> None:
    guard, sent = _feed([" sorry", " your", " card", " has", " not", " arrived", ".", " More", " text"])
    assert guard.violation is None and guard.done
    assert sent == "I'm sorry your card has not arrived."


def test_opener_stream_withholds_the_offending_piece() -> None:
    guard, sent = _feed([" sorry", ",", " we", " will", " refund", " you"])
    assert guard.violation and "refund" in guard.violation
    assert "refund" not in sent and sent.startswith("I'm sorry")
    guard, sent = _feed([" sorry", " about", " the", " 3"])
    assert guard.violation == "states a number" and "3" not in sent


def test_opener_stream_judges_a_word_only_once_complete() -> None:
    from coact.actors.guard import check_partial_opener

    d = _decision()
    # "arr" could still become "arrived" (grounded): not judged yet; "arrzz " is complete and ungrounded.
    assert check_partial_opener("I'm sorry it has not arr", d, [], grounding="my card has not arrived") is None
    assert "adds content" in check_partial_opener("I'm sorry it has not arrzz ", d, [], grounding="my card")


def test_stream_reply_replaces_and_stops_generation_on_a_violation() -> None:
    import asyncio

    from coact.actors.generation import stream_reply
    from coact.graphs.policy.messages import ResponderRequest

    closed = []

    async def deltas():
        try:
            for piece in [" sorry", ",", " we", " will", " refund", " you", " now", "."]:
                yield piece, 1
        finally:
            closed.append(True)  # generation is stopped when the guard trips

    req = ResponderRequest(message="my card has not arrived", decision=_decision(), template="Cards arrive in days.")

    async def collect():
        return [c async for c in stream_reply(req, deltas(), "v", prefix="I'm")]

    chunks = asyncio.run(collect())
    kinds = [c.kind for c in chunks]
    assert kinds[-2:] == ["replace", "result"] and closed == [True]
    result = chunks[-1].result
    assert result.source == "template" and result.reply == req.template
    assert result.guard.startswith("stopped mid-stream") and chunks[-2].text == req.template
    assert "refund" not in "".join(c.text for c in chunks if c.kind == "token")
