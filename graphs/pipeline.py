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
from graphs.dialogue import TurnPlan, chitchat_reply, close_or_continue, plan_turn, reply_template
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


@dataclass
class PreparedTurn:
    """A turn decided but not yet phrased: what the streaming route sends before the first token."""

    request: ChatRequest
    session: SessionState
    plan: TurnPlan
    intent: IntentResult
    reasoner: ReasonerResult
    decision: DecisionResult | None
    action: ActionOut
    trace: list[StageTrace]
    t_start: float
    responder_request: ResponderRequest | None = None  # None: a control intent answered by template
    template_reply: str = ""


async def prepare_turn(stages: Stages, pack: DomainPack, request: ChatRequest,
                       create_missing: bool = False) -> PreparedTurn:
    """Session, Intent + Reasoner, Decision: everything before the Responder.

    `create_missing`: an unknown session_id starts a new session under that id (the OpenAI route,
    where the client names the conversation) instead of raising UnknownSession.
    """
    t_start = time.perf_counter()
    trace: list[StageTrace] = []

    if request.session_id is None:
        session, ms = SessionState(session_id=new_session_id()), 0.0
    else:
        raw, ms = await _timed(stages.load(request.session_id))
        if raw is None and not create_missing:
            raise UnknownSession(request.session_id)
        session = SessionState(session_id=request.session_id) if raw is None else SessionState.model_validate(raw)
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
    if plan.chitchat is not None:
        trace.append(StageTrace(stage="decision", ms=0.0, output={"skipped": f"control intent {plan.chitchat}"}))
        return PreparedTurn(request=request, session=session, plan=plan, intent=intent, reasoner=reasoner,
                            decision=None, action=ActionOut(kind="chitchat", name=plan.chitchat), trace=trace,
                            t_start=t_start, template_reply=chitchat_reply(pack, plan.chitchat))

    decision, dec_ms = await _timed(stages.decide(DecisionRequest(evidence=plan.evidence, turn=session.turns + 1)))
    assert isinstance(decision, DecisionResult)
    out = decision.model_dump()
    if plan.answered:
        out["answered"] = plan.answered
    trace.append(StageTrace(stage="decision", ms=round(dec_ms, 2), output=out))
    template, forbidden = reply_template(pack, decision)
    req = ResponderRequest(message=request.message, decision=decision, template=template, forbidden=forbidden,
                           history=session.history[-HISTORY_TURNS:])
    return PreparedTurn(request=request, session=session, plan=plan, intent=intent, reasoner=reasoner,
                        decision=decision, action=ActionOut(kind=decision.kind, name=decision.action,
                                                            target=decision.target),
                        trace=trace, t_start=t_start, responder_request=req, template_reply=template)


def partial_response(turn: PreparedTurn) -> ChatResponse:
    """The decision and the trace so far (no responder stage yet): the first event of a streamed turn."""
    total = (time.perf_counter() - turn.t_start) * 1000.0
    return ChatResponse(session_id=turn.session.session_id, reply="", action=turn.action,
                        trace=Trace(stages=list(turn.trace), total_ms=round(total, 2),
                                    model_versions=_versions(turn, None)))


def _versions(turn: PreparedTurn, responder: ResponderResult | None) -> dict[str, str]:
    versions = {"intent": turn.intent.model_version, "reasoner": turn.reasoner.model_version}
    if turn.decision is not None:
        versions["decision"] = turn.decision.domain_version
    if responder is not None:
        versions["responder"] = responder.model_version
    return versions


async def finish_turn(stages: Stages, turn: PreparedTurn, responder: ResponderResult | None,
                      responder_ms: float = 0.0) -> ChatResponse:
    """Record the reply, save the session once, and build the response (streamed or not, the same)."""
    trace = list(turn.trace)
    if responder is None:
        reply_text = turn.template_reply
        trace.append(StageTrace(stage="responder", ms=0.0, output={"source": "template", "reply": reply_text}))
    else:
        reply_text = responder.reply
        trace.append(StageTrace(stage="responder", ms=round(responder_ms, 2), output=responder.model_dump()))

    session = turn.session
    close_or_continue(session, turn.plan.evidence, turn.decision)
    session.turns += 1
    session.updated_at = time.time()
    session.history = [*session.history, HistoryTurn(role="user", text=turn.request.message),
                       HistoryTurn(role="assistant", text=reply_text)][-HISTORY_KEEP:]
    save_ms = (await _timed(stages.save(session.session_id, session.model_dump())))[1]
    trace[0] = trace[0].model_copy(update={"ms": round(trace[0].ms + save_ms, 2)})

    total = (time.perf_counter() - turn.t_start) * 1000.0
    return ChatResponse(session_id=session.session_id, reply=reply_text, action=turn.action,
                        trace=Trace(stages=trace, total_ms=round(total, 2), model_versions=_versions(turn, responder)))


async def complete_turn(stages: Stages, turn: PreparedTurn) -> ChatResponse:
    """The Responder (one whole reply) and the finish: the rest of a plain turn."""
    if turn.responder_request is None:
        return await finish_turn(stages, turn, None)
    responder, resp_ms = await _timed(stages.respond(turn.responder_request))
    assert isinstance(responder, ResponderResult)
    return await finish_turn(stages, turn, responder, resp_ms)


async def run_turn(stages: Stages, pack: DomainPack, request: ChatRequest) -> ChatResponse:
    return await complete_turn(stages, await prepare_turn(stages, pack, request))
