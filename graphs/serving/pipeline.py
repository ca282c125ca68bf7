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

from coact.graphs.policy.actions import action_call, executor_of, result_text, undo_call
from coact.graphs.policy.dialogue import (
    TERMINAL_KINDS,
    TurnPlan,
    close_or_continue,
    deferred_text,
    plan_turn,
    reply_template,
    split_requests,
)
from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.messages import (
    ActionCall,
    ActionOutcome,
    ActionRecord,
    DecisionRequest,
    DecisionResult,
    HistoryTurn,
    IntentRequest,
    IntentResult,
    ReasonerResult,
    ResponderRequest,
    ResponderResult,
    SessionState,
)
from coact.graphs.policy.reasons import reason_for, with_reason
from coact.graphs.serving.http import ActionOut, ChatRequest, ChatResponse, StageTrace, Trace

HISTORY_TURNS = 6  # what the responder sees; the session keeps more
HISTORY_KEEP = 50
MAX_ACTIONS_PER_TURN = 2  # the decided action, and what the policy chooses if it could not be done


class UnknownSession(KeyError):
    pass


@dataclass
class Stages:
    intent: Callable[[IntentRequest], Awaitable[IntentResult]]
    reason: Callable[[str], Awaitable[ReasonerResult]]
    decide: Callable[[DecisionRequest], Awaitable[DecisionResult]]
    respond: Callable[[ResponderRequest], Awaitable[ResponderResult]]
    load: Callable[[str], Awaitable[dict | None]]
    save: Callable[[str, dict], Awaitable[None]]
    # The action step; None: no executor (decided actions stay labels, as in the policy simulator).
    execute: Callable[[ActionCall], Awaitable[ActionRecord]] | None = None


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
    pack: DomainPack
    responder_request: ResponderRequest | None = None  # None: answered by template (acts, acknowledgements)
    template_reply: str = ""
    executed: list[ActionRecord] | None = None  # None: no action step ran (no executor)
    confirmed: list[str] | None = None  # actions the reply may say happened; None: no action step
    undone: str | None = None  # a done action this turn reversed


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

    # Intent and Reasoner need only the message (and the pending question): run them concurrently.
    # A message that may ask two things also has its parts classified, in the same batch.
    parts = split_requests(request.message)
    pending = session.pending_question
    (intent, intent_ms), (reasoner, reason_ms), *part_results = await asyncio.gather(
        _timed(stages.intent(IntentRequest(message=request.message, pending=pending))),
        _timed(stages.reason(request.message)),
        *(stages.intent(IntentRequest(message=p)) for p in parts),
    )
    assert isinstance(intent, IntentResult) and isinstance(reasoner, ReasonerResult)
    trace.append(StageTrace(stage="intent", ms=round(intent_ms, 2),
                            output=intent.model_dump(exclude={"probs", "labels", "class_prior"})
                            | ({"parts": {p: r.top[0].model_dump() for p, r in zip(parts, part_results, strict=True)}}
                               if parts else {})))
    trace.append(StageTrace(stage="reasoner", ms=round(reason_ms, 2), output=reasoner.model_dump()))

    plan = plan_turn(session, request.message, intent, reasoner, pack, part_results)
    if plan.undo is not None:
        return await _undo_turn(stages, pack, request, session, plan, intent, reasoner, trace, t_start)
    if plan.reply is not None:
        trace.append(StageTrace(stage="decision", ms=0.0, output={"skipped": plan.reply_name} | plan.trace()))
        return PreparedTurn(request=request, session=session, plan=plan, pack=pack, intent=intent, reasoner=reasoner,
                            decision=None, action=ActionOut(kind="chitchat", name=plan.reply_name), trace=trace,
                            t_start=t_start, template_reply=plan.reply)

    decision, dec_ms = await _timed(stages.decide(DecisionRequest(evidence=plan.evidence)))
    assert isinstance(decision, DecisionResult)
    trace.append(StageTrace(stage="decision", ms=round(dec_ms, 2), output=decision.model_dump() | plan.trace()))
    done = pack.actions.get(decision.action)
    if decision.action in session.done_actions and done is not None and done.done_reply:
        # A terminal action is not repeated: the customer hears that it is done.
        return PreparedTurn(request=request, session=session, plan=plan, pack=pack, intent=intent, reasoner=reasoner,
                            decision=decision, action=ActionOut(kind="chitchat", name=f"done:{decision.action}"),
                            trace=trace, t_start=t_start, template_reply=done.done_reply)
    decision, executed, results = await _execute(stages, pack, session, plan, request.message, decision, trace)
    template, forbidden = reply_template(pack, decision)
    if results:
        # The reply follows what happened: each executed action's result, then (if that action could not be
        # done) what the policy chose instead, unless that was the next executed action itself.
        follow = [] if executor_of(pack, decision) is not None else [template]
        template = " ".join([*results, *follow])
    reason = reason_for(pack, decision, plan.evidence)
    template = with_reason(template, reason, decision.kind)
    if reason is not None:
        last = next(t for t in reversed(trace) if t.stage == "decision")
        last.output["reason_clause"] = reason.trace()
    if plan.prefix:
        template = f"{plan.prefix} {template}"
    if decision.kind in TERMINAL_KINDS:
        later = [g for g in [*session.deferred, *plan.deferred] if g != decision.target]
        if later:
            template = f"{template} {deferred_text(pack, later[0])}"
            forbidden = [f for f in forbidden if f != pack.intent(later[0]).faq]
            plan.deferred = [g for g in plan.deferred if g != later[0]]
            session.deferred = [g for g in session.deferred if g != later[0]]
    confirmed = _confirmed(pack, decision, executed)
    req = ResponderRequest(message=request.message, decision=decision, template=template, forbidden=forbidden,
                           history=session.history[-HISTORY_TURNS:], confirmed=confirmed,
                           reason=None if reason is None else reason.clause)
    return PreparedTurn(request=request, session=session, plan=plan, pack=pack, intent=intent, reasoner=reasoner,
                        decision=decision, action=ActionOut(kind=decision.kind, name=decision.action,
                                                            target=decision.target, executed=executed or []),
                        trace=trace, t_start=t_start, responder_request=req, template_reply=template,
                        executed=executed, confirmed=None if executed is None else confirmed)


async def _undo_turn(stages: Stages, pack: DomainPack, request: ChatRequest, session: SessionState, plan: TurnPlan,
                     intent: IntentResult, reasoner: ReasonerResult, trace: list[StageTrace],
                     t_start: float) -> PreparedTurn:
    """The customer takes back the action just done: its undo runs through the same executor, nothing is decided."""
    spec = pack.actions[plan.undo].undo  # type: ignore[index]
    assert spec is not None
    trace.append(StageTrace(stage="decision", ms=0.0, output={"skipped": plan.reply_name} | plan.trace()))
    executed: list[ActionRecord] | None = None
    if stages.execute is None:
        reply = spec.reply.format(reference="not recorded")
    else:
        call = undo_call(session, plan.undo, spec.action, request.message)  # type: ignore[arg-type]
        record, ms = await _timed(stages.execute(call))
        assert isinstance(record, ActionRecord)
        executed = [record]
        trace.append(StageTrace(stage="action", ms=round(ms, 2), output=record.model_dump()))
        reply = (spec.reply.format(reference=record.reference or record.idempotency_key[:8].upper())
                 if record.status == "done" else spec.failed_reply)
    return PreparedTurn(request=request, session=session, plan=plan, pack=pack, intent=intent, reasoner=reasoner,
                        decision=None, action=ActionOut(kind="action", name=spec.action, executed=executed or []),
                        trace=trace, t_start=t_start, template_reply=reply, executed=executed,
                        undone=plan.undo if executed is None or executed[0].status == "done" else None)


async def _execute(stages: Stages, pack: DomainPack, session: SessionState, plan: TurnPlan, message: str,
                   decision: DecisionResult, trace: list[StageTrace]
                   ) -> tuple[DecisionResult, list[ActionRecord] | None, list[str]]:
    """The action step: execute the decided action; if it was not done, it is off the table for this case and
    the policy decides again (at risk and the freeze failed: a hand-over). Returns the final decision, the
    executed actions (None without an action step) and the reply text of each result."""
    if stages.execute is None:
        # No action step (a benchmark baseline): the decided action is only a label, as before the step existed.
        label = ([result_text(pack, decision.action, ActionOutcome(status="done"), "not recorded")]
                 if executor_of(pack, decision) is not None and decision.action not in session.done_actions else [])
        return decision, None, label
    executed: list[ActionRecord] = []
    results: list[str] = []
    while (len(executed) < MAX_ACTIONS_PER_TURN and executor_of(pack, decision) is not None
           and decision.action not in session.done_actions):
        call = action_call(pack, session, decision, message, executed)
        record, ms = await _timed(stages.execute(call))
        assert isinstance(record, ActionRecord)
        executed.append(record)
        trace.append(StageTrace(stage="action", ms=round(ms, 2), output=record.model_dump()))
        results.append(result_text(pack, decision.action, record, record.idempotency_key[:8].upper()))
        if record.status == "done":
            break
        plan.evidence.unavailable.append(decision.action)
        plan.notes.append(f"{decision.action} {record.status} ({record.reason}): decided again without it")
        decision, dec_ms = await _timed(stages.decide(DecisionRequest(evidence=plan.evidence)))
        assert isinstance(decision, DecisionResult)
        trace.append(StageTrace(stage="decision", ms=round(dec_ms, 2),
                                output=decision.model_dump() | {"after": f"{record.action} {record.status}"}))
    if executed and decision.action in session.done_actions and executor_of(pack, decision) is not None:
        # Decided again onto an action done earlier in the conversation (a hand-over already open): say so.
        results.append(pack.actions[decision.action].done_reply or pack.fallback_reply)
    return decision, executed, results


def _confirmed(pack: DomainPack, decision: DecisionResult, executed: list[ActionRecord] | None) -> list[str]:
    """The actions a reply may say happened: those the executor confirmed (or, with no executor, the decided one)."""
    done = [r.action for r in executed or [] if r.status == "done"]
    if executed is None or executor_of(pack, decision) is None:
        done.append(decision.action)
    return done


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
    close_or_continue(session, turn.plan, turn.decision, turn.pack, turn.confirmed)
    if turn.undone is not None:
        session.done_actions = [a for a in session.done_actions if a != turn.undone]
    session.actions = [*session.actions, *(turn.executed or [])][-HISTORY_KEEP:]
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
