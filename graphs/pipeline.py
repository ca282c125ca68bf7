"""One conversational turn across the four stages, independent of how the stages are reached.

The Serve ingress passes deployment handles; the in-process baseline of the benchmark passes
the same plain functions called directly. Either way the turn logic is this one function.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from actors.schemas import (
    ActionOut,
    ChatRequest,
    ChatResponse,
    DecisionRequest,
    DecisionResult,
    HistoryTurn,
    IntentResult,
    ReasonerResult,
    ResponderRequest,
    ResponderResult,
    SessionState,
    StageTrace,
    Trace,
)
from graphs.dialogue import chitchat_reply, close_or_continue, plan_turn, reply_template
from graphs.domain import DomainPack

HISTORY_TURNS = 6  # what the responder sees; the session keeps more
HISTORY_KEEP = 50


class UnknownSession(KeyError):
    pass


@dataclass
class Stages:
    intent: Callable[[str], Awaitable[IntentResult]]
    reason: Callable[[str], Awaitable[ReasonerResult]]
    decide: Callable[[DecisionRequest], Awaitable[DecisionResult]]
    respond: Callable[[ResponderRequest], Awaitable[ResponderResult]]
    load: Callable[[str], Awaitable[dict | None]]
    save: Callable[[str, dict], Awaitable[None]]


async def _timed(coro: Awaitable) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = await coro
    return out, (time.perf_counter() - t0) * 1000.0


def new_session_id() -> str:
    return uuid.uuid4().hex


async def run_turn(stages: Stages, pack: DomainPack, request: ChatRequest) -> ChatResponse:
    t_start = time.perf_counter()
    trace: list[StageTrace] = []

    if request.session_id is None:
        session, ms = SessionState(session_id=new_session_id()), 0.0
    else:
        raw, ms = await _timed(stages.load(request.session_id))
        if raw is None:
            raise UnknownSession(request.session_id)
        session = SessionState.model_validate(raw)
    trace.append(StageTrace(stage="session", ms=round(ms, 2), output={"turns": session.turns,
                                                                      "pending_question": session.pending_question}))

    # Intent and Reasoner need only the message: run them concurrently.
    (intent, intent_ms), (reasoner, reason_ms) = await asyncio.gather(
        _timed(stages.intent(request.message)), _timed(stages.reason(request.message))
    )
    assert isinstance(intent, IntentResult) and isinstance(reasoner, ReasonerResult)
    trace.append(StageTrace(stage="intent", ms=round(intent_ms, 2),
                            output=intent.model_dump(exclude={"probs", "labels", "class_prior"})))
    trace.append(StageTrace(stage="reasoner", ms=round(reason_ms, 2), output=reasoner.model_dump()))

    plan = plan_turn(session, intent, reasoner, pack)
    decision: DecisionResult | None = None
    if plan.chitchat is not None:
        reply_text = chitchat_reply(pack, plan.chitchat)
        action = ActionOut(kind="chitchat", name=plan.chitchat)
        trace.append(StageTrace(stage="decision", ms=0.0, output={"skipped": f"control intent {plan.chitchat}"}))
        trace.append(StageTrace(stage="responder", ms=0.0, output={"source": "template", "reply": reply_text}))
    else:
        decision, dec_ms = await _timed(stages.decide(DecisionRequest(evidence=plan.evidence, turn=session.turns + 1)))
        assert isinstance(decision, DecisionResult)
        out = decision.model_dump()
        if plan.answered:
            out["answered"] = plan.answered
        trace.append(StageTrace(stage="decision", ms=round(dec_ms, 2), output=out))
        template, forbidden = reply_template(pack, decision)
        req = ResponderRequest(message=request.message, decision=decision, template=template, forbidden=forbidden,
                               history=session.history[-HISTORY_TURNS:])
        responder, resp_ms = await _timed(stages.respond(req))
        assert isinstance(responder, ResponderResult)
        trace.append(StageTrace(stage="responder", ms=round(resp_ms, 2), output=responder.model_dump()))
        reply_text = responder.reply
        action = ActionOut(kind=decision.kind, name=decision.action, target=decision.target)

    close_or_continue(session, plan.evidence, decision)
    session.turns += 1
    session.updated_at = time.time()
    session.history = [*session.history, HistoryTurn(role="user", text=request.message),
                       HistoryTurn(role="assistant", text=reply_text)][-HISTORY_KEEP:]
    save_ms = (await _timed(stages.save(session.session_id, session.model_dump())))[1]
    trace[0].ms = round(trace[0].ms + save_ms, 2)

    versions = {"intent": intent.model_version, "reasoner": reasoner.model_version}
    if decision is not None:
        versions["decision"] = decision.domain_version
    responder_out = trace[-1].output
    if "model_version" in responder_out:
        versions["responder"] = responder_out["model_version"]
    total = (time.perf_counter() - t_start) * 1000.0
    return ChatResponse(session_id=session.session_id, reply=reply_text, action=action,
                        trace=Trace(stages=trace, total_ms=round(total, 2), model_versions=versions))
