"""A streamed turn as a sequence of events, independent of the wire format (coact SSE or OpenAI chunks).

Order: `decision` (the action and the trace of session, intent, reasoner, decision) as soon as the
policy has decided; `token` events with the reply text as the Responder generates it; `replace` when
the guard withdraws what was streamed (the event carries the reply to show instead); `done` with the
full response, the guard's verdict and the Responder's timing, sent after the session was saved.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from pydantic import BaseModel

from coact.actors.generation import template_result
from coact.graphs.policy.messages import ResponderChunk, ResponderRequest
from coact.graphs.serving.http import ChatResponse, StreamDone, StreamReplace, StreamText
from coact.graphs.serving.pipeline import PreparedTurn, Stages, finish_turn, partial_response

ResponderStream = Callable[[ResponderRequest], AsyncIterator[ResponderChunk]]


async def turn_events(stages: Stages, turn: PreparedTurn, open_stream: ResponderStream,
                      unavailable: tuple[type[BaseException], ...] = ()) -> AsyncIterator[tuple[str, BaseModel]]:
    yield "decision", partial_response(turn)
    req = turn.responder_request
    if req is None:  # a conversation act or a done action: the reply is a template, nothing to generate
        yield "token", StreamText(text=turn.template_reply, final=True)
        done = await finish_turn(stages, turn, None)
        yield "done", StreamDone(**done.model_dump(), source="template")
        return

    t0 = time.perf_counter()
    first_ms: float | None = None
    sent = replaced = False
    result = None
    try:
        # aclosing: if this generator is closed at a yield (client gone), the Responder stream is closed too.
        async with aclosing(open_stream(req)) as chunks:
            async for chunk in chunks:
                if chunk.kind == "token":
                    first_ms = first_ms if first_ms is not None else (time.perf_counter() - t0) * 1000.0
                    sent = True
                    yield "token", StreamText(text=chunk.text, final=chunk.final)
                elif chunk.kind == "replace":
                    replaced = replaced or sent
                    yield "replace", StreamReplace(reply=chunk.text, guard=chunk.guard)
                else:
                    result = chunk.result
    except unavailable as e:
        # The decision stands; only its phrasing failed: send the decided content, flagged.
        result = template_result(req, f"responder unavailable ({type(e).__name__})", "unavailable")
        replaced = replaced or sent
        yield "replace", StreamReplace(reply=result.reply, guard=result.guard)
    assert result is not None, "the Responder's stream ended without a result"
    responder_ms = (time.perf_counter() - t0) * 1000.0
    done = await finish_turn(stages, turn, result, responder_ms)
    yield "done", StreamDone(**done.model_dump(), source=result.source, guard=result.guard, replaced=replaced,
                             responder_ms=round(responder_ms, 2),
                             first_token_ms=None if first_ms is None else round(first_ms, 2))


async def replay_events(response: ChatResponse) -> AsyncIterator[tuple[str, BaseModel]]:
    """A keyed turn sent again (Idempotency-Key): the stored response, as the events of a stream."""
    yield "decision", response.model_copy(update={"reply": ""})
    yield "token", StreamText(text=response.reply, final=True)
    out = next((s.output for s in response.trace.stages if s.stage == "responder"), {})
    yield "done", StreamDone(**response.model_dump(), source="model" if out.get("source") == "model" else "template",
                             guard=out.get("guard"))


def sse(event: str | None, data: BaseModel | dict | str) -> bytes:
    """One server-sent event; `data` is JSON on a single line (SSE forbids raw newlines in it).

    A named event (coact's own stream) carries the server's wall time of emission as its `id`
    (seconds since the epoch), so a client can tell when each event left the server; the OpenAI
    stream's unnamed chunks have no id, as OpenAI's have none.
    """
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude_none=False)
    elif isinstance(data, dict):
        payload = json.dumps(data, separators=(",", ":"))
    else:
        payload = data
    head = f"event: {event}\nid: {time.time():.6f}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
