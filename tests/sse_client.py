"""A small server-sent-events reader for the streaming tests: events with their arrival times."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    name: str
    data: dict | str
    t: float  # seconds since the request was sent


def iter_events(response: httpx.Response, t0: float):
    name, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    payload: dict | str = json.loads(raw)
                except ValueError:
                    payload = raw
                yield Event(name, payload, time.perf_counter() - t0)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def stream_chat(url: str, message: str, session_id: str | None = None, path: str = "/v1/chat") -> list[Event]:
    body = {"message": message, "stream": True} | ({"session_id": session_id} if session_id else {})
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(iter_events(r, t0))


FIRST_STAGES = ["session", "intent", "reasoner", "decision"]


def check_turn_stream(events: list[Event]) -> dict:
    """The protocol of a streamed turn; returns the `done` event's data."""
    names = [e.name for e in events]
    assert names[0] == "decision" and names[-1] == "done", names
    assert set(names) <= {"decision", "token", "replace", "done"}, names
    first = events[0].data
    assert [s["stage"] for s in first["trace"]["stages"]] == FIRST_STAGES
    assert first["action"]["kind"] and first["session_id"]
    done = events[-1].data
    assert [s["stage"] for s in done["trace"]["stages"]] == [*FIRST_STAGES, "responder"]
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
