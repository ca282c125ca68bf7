"""A small server-sent-events reader for the streaming tests, and the protocol check of one streamed turn.

Each event keeps two clocks, both `time.time()` on this machine (the tests and the app share it):
`received`, when this client had read the whole event, and `sent`, the server's time when it emitted the
event (the SSE `id:` field of coact's stream). Comparing one event's `received` with a later event's
`sent` shows whether the events travelled while the turn ran or were held back and delivered together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    name: str
    data: dict | str
    received: float  # client wall time, when the event had been read
    sent: float | None  # server wall time, when the event was emitted (the `id:` field), if it had one


def iter_events(response: httpx.Response):
    name, data, sent = "message", [], None
    for line in response.iter_lines():
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    payload: dict | str = json.loads(raw)
                except ValueError:
                    payload = raw
                yield Event(name, payload, time.time(), sent)
            name, data, sent = "message", [], None
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("id:"):
            sent = float(line[3:].strip())


def stream_chat(url: str, message: str, session_id: str | None = None, path: str = "/v1/chat") -> list[Event]:
    body = {"message": message, "stream": True} | ({"session_id": session_id} if session_id else {})
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(iter_events(r))


FIRST_STAGES = ["session", "intent", "reasoner", "decision"]


def check_turn_stream(events: list[Event]) -> dict:
    """The protocol of a streamed turn; returns the `done` event's data."""
    names = [e.name for e in events]
    assert names[0] == "decision" and names[-1] == "done", names
    assert set(names) <= {"decision", "token", "replace", "done"}, names
    assert all(e.sent is not None for e in events), "every event carries the server's time"
    first = events[0].data
    stages = [s["stage"] for s in first["trace"]["stages"]]
    # After the decision, one `action` stage per executed action (and a new decision after each one not done).
    assert stages[:len(FIRST_STAGES)] == FIRST_STAGES and set(stages[len(FIRST_STAGES):]) <= {"action", "decision"}
    assert stages.count("action") == len(first["action"]["executed"]), stages
    assert first["action"]["kind"] and first["session_id"]
    done = events[-1].data
    assert [s["stage"] for s in done["trace"]["stages"]] == [*stages, "responder"]
    assert done["action"] == first["action"] and done["session_id"] == first["session_id"]
    responder = done["trace"]["stages"][-1]["output"]
    assert done["source"] == responder["source"] and done["guard"] == responder.get("guard")
    # What the client assembles is the reply: the tokens, or the last replacement.
    shown = ""
    for e in events:
        if e.name == "token":
            shown += e.data["text"]
        elif e.name == "replace":
            shown = e.data["reply"]
    assert shown == done["reply"], (shown, done["reply"])
    if done["source"] == "template" and done["action"]["kind"] != "chitchat":
        assert done["guard"]  # a fallback always says why
    if done["replaced"]:
        assert "replace" in names
    return done


def check_delivered_while_generating(events: list[Event]) -> None:
    """The events reached the client as the server emitted them, not held back until the turn ended.

    The decision was read before the server emitted the reply's last piece, and the reply's first piece
    before the server emitted its last one: with the stream buffered anywhere on the way (the proxy, the
    ingress), everything arrives after the server sent the end, and both comparisons fail.
    """
    tokens = [e for e in events if e.name == "token"]
    assert len(tokens) >= 2, [e.name for e in events]
    decision, first, last = events[0], tokens[0], tokens[-1]
    assert decision.received < last.sent, (decision.received, last.sent)
    assert first.received < last.sent, (first.received, last.sent)
    # The server emitted them in turn order (its clock, its order).
    assert decision.sent <= first.sent <= last.sent <= events[-1].sent
