"""Streaming through the graph (transformers backend): SSE over HTTP and handle streaming to the Responder."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers.serve import check_guard_verdict, handle, responder_request, responder_stats, wait_for
from tests.helpers.sse import check_delivered_while_generating, check_turn_stream, iter_events, stream_chat

pytestmark = pytest.mark.serve

AMBIGUOUS = "I see a payment I don't recognise"


def test_stream_decision_first_then_tokens_then_done(app_url: str) -> None:
    message = "How long does it take for my new card to arrive?"
    events = stream_chat(app_url, message)
    done = check_turn_stream(events)
    check_guard_verdict(message, done["reply"], done["trace"])
    # The decision reached the client before the server had sent the reply's end, and the reply's
    # first piece too (server timestamps against this client's clock): nothing held the stream back.
    check_delivered_while_generating(events)
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
    assert second["action"] | {"executed": []} == {"kind": "action", "name": "freeze_card", "target": None, "executed": []}
    assert [r["status"] for r in second["action"]["executed"]] == ["done"]  # frozen on the action server
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
    assert done["action"] == {"kind": "chitchat", "name": "greeting", "target": None, "executed": []}
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
    before = responder_stats()
    with httpx.stream("POST", f"{app_url}/v1/chat", json={"message": AMBIGUOUS, "stream": True}, timeout=120) as r:
        first = next(iter_events(r))
        assert first.name == "decision"
        sid = first.data["session_id"]
    # Leaving the `with` closed the connection right after the decision, before the reply finished.
    # A reference turn started after that: by its end, the abandoned reply (started first, as short)
    # would have finished too, had it not been cancelled.
    check_turn_stream(stream_chat(app_url, AMBIGUOUS))
    after = wait_for(lambda: (s := responder_stats())["streams_active"] == 0 and s["engine_unfinished_requests"] == 0 and s,
                     what="the Responder's generation threads to stop")
    assert after["streams_finished"] == before["streams_finished"] + 1, (before, after)  # the reference only
    # Started and cancelled, or never started (the client left before the Responder was called).
    assert (after["streams_started"] - before["streams_started"]
            == 1 + after["streams_cancelled"] - before["streams_cancelled"]), (before, after)
    # An abandoned turn is not saved: the new session never came into being.
    assert httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).status_code == 404


def test_handle_stream_delivers_tokens_while_generating(app_url: str) -> None:
    req = responder_request()
    t0 = time.perf_counter()
    arrivals, result = [], None
    for chunk in handle("ResponderActor").options(stream=True).stream.remote(req, raw=True, max_new_tokens=24):
        if chunk.kind == "token":
            arrivals.append(time.perf_counter() - t0)
        else:
            result = chunk.result
    assert result is not None and result.tokens == 24
    assert len(arrivals) >= 12  # token by token, not one block
    # The first token arrives long before the last: the tokens travelled while generation ran.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


def test_handle_stream_cancel_stops_generation(app_url: str) -> None:
    before = responder_stats()
    gen = handle("ResponderActor").options(stream=True).stream.remote(responder_request(), raw=True, max_new_tokens=400)
    got = 0
    for chunk in gen:
        assert chunk.kind == "token"
        got += 1
        if got == 2:
            break
    gen.cancel()
    after = wait_for(lambda: (s := responder_stats())["streams_cancelled"] > before["streams_cancelled"]
                     and s["engine_unfinished_requests"] == 0 and s, what="cancellation")
    assert after["streams_active"] == 0
