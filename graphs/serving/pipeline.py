"""One conversational turn across the four stages, independent of how the stages are reached.

The Serve ingress passes deployment handles; the in-process baseline of the benchmark passes
the same plain functions called directly. Either way the turn logic is this one function.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

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
# Idempotency-Key results kept with the session (docs/sessions.md): the last N keyed turns' responses, saved in
# the same compare-and-set write as the state, so a result is stored exactly when its turn is.
RESULTS_FIELD = "idempotent_results"
RESULTS_KEPT = 8


class UnknownSession(KeyError):
    pass


class Replayed(Exception):  # noqa: N818 - not an error: the turn was applied before, here is its response
    """The turn's Idempotency-Key was applied already on this session: `response` is that turn's response."""

    def __init__(self, response: ChatResponse) -> None:
        super().__init__(response.session_id)
        self.response = response


class KeyReused(ValueError):
    """An Idempotency-Key sent again on the session with another message."""


@dataclass
class Stages:
    intent: Callable[[IntentRequest], Awaitable[IntentResult]]
    reason: Callable[[str], Awaitable[ReasonerResult]]
    decide: Callable[[DecisionRequest], Awaitable[DecisionResult]]
    respond: Callable[[ResponderRequest], Awaitable[ResponderResult]]
    # (version, stored state) or None; save(session_id, state, loaded version) -> new version, or raises
    # SessionConflict (coact.actors.session_backends) when another turn saved the session first.
    load: Callable[[str], Awaitable[tuple[int, dict] | None]]
    save: Callable[[str, dict, int], Awaitable[int]]
    # The action step; None: no executor (decided actions stay labels, as in the policy simulator).
    execute: Callable[[ActionCall], Awaitable[ActionRecord]] | None = None


async def _timed(coro: Awaitable) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = await coro
    return out, (time.perf_counter() - t0) * 1000.0


def new_session_id() -> str:
    return uuid.uuid4().hex


def session_of(raw: dict) -> tuple[SessionState, list[dict]]:
    """A stored record: the session state and the Idempotency-Key results kept beside it."""
    raw = dict(raw)
    results = raw.pop(RESULTS_FIELD, None) or []
    return SessionState.model_validate(raw), results


def replayed(results: list[dict], key: str | None, message: str) -> ChatResponse | None:
    """The stored response of the turn keyed `key`, if it was applied; KeyReused if that turn said something else."""
    if key is None:
        return None
    for row in results:
        if row.get("key") == key:
            if row.get("message") != message:
                raise KeyReused(key)
            return ChatResponse.model_validate(row["response"])
    return None


class SessionLocks:
    """Turns on one session, one at a time in arrival order, within one ingress replica (asyncio.Lock is FIFO).

    Cheap ordering for the common case (one client, one replica); across replicas the store's compare-and-set
    is what keeps turns from being lost (a turn that loses the race fails with SessionConflict, 409).
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, session_id: str | None) -> AsyncIterator[None]:
        if session_id is None:  # a new session: nobody else can name it yet
            yield
            return
        lock, users = self._locks.get(session_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users <= 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


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
    version: int = 0  # the session's stored version this turn loaded (0: new); the save is conditional on it
    idempotency_key: str | None = None
    results: list[dict] = field(default_factory=list)  # the Idempotency-Key results stored with the session


async def prepare_turn(stages: Stages, pack: DomainPack, request: ChatRequest,
                       create_missing: bool = False, idempotency_key: str | None = None) -> PreparedTurn:
    """Session, Intent + Reasoner, Decision: everything before the Responder.

    `create_missing`: an unknown session_id starts a new session under that id (the OpenAI route,
    where the client names the conversation) instead of raising UnknownSession.
    `idempotency_key`: a turn already applied on this session under this key raises Replayed with its response.
    """
    t_start = time.perf_counter()
    trace: list[StageTrace] = []

    version, results = 0, []
    if request.session_id is None:
        session, ms = SessionState(session_id=new_session_id()), 0.0
    else:
        loaded, ms = await _timed(stages.load(request.session_id))
        if loaded is None and not create_missing:
            raise UnknownSession(request.session_id)
        if loaded is None:
            session = SessionState(session_id=request.session_id)
        else:
            version, raw = loaded
            session, results = session_of(raw)
            replay = replayed(results, idempotency_key, request.message)
            if replay is not None:
                raise Replayed(replay)
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
    turn = await _decided_turn(stages, pack, request, session, plan, intent, reasoner, trace, t_start)
    turn.version, turn.idempotency_key, turn.results = version, idempotency_key, results
    return turn


async def _decided_turn(stages: Stages, pack: DomainPack, request: ChatRequest, session: SessionState, plan: TurnPlan,
                        intent: IntentResult, reasoner: ReasonerResult, trace: list[StageTrace],
                        t_start: float) -> PreparedTurn:
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
                           reason=None if reason is None else reason.clause, max_new_tokens=request.max_new_tokens)
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

    # The response is complete before the save, so that a keyed turn's stored result is exactly what was sent
    # (the session stage's ms is the load; the save follows).
    total = (time.perf_counter() - turn.t_start) * 1000.0
    response = ChatResponse(session_id=session.session_id, reply=reply_text, action=turn.action,
                            trace=Trace(stages=trace, total_ms=round(total, 2),
                                        model_versions=_versions(turn, responder)))
    record = session.model_dump()
    results = turn.results
    if turn.idempotency_key is not None:
        results = [*results, {"key": turn.idempotency_key, "message": turn.request.message,
                              "response": response.model_dump(mode="json")}][-RESULTS_KEPT:]
    if results:
        record[RESULTS_FIELD] = results
    await stages.save(session.session_id, record, turn.version)  # SessionConflict: another turn saved first
    return response


async def complete_turn(stages: Stages, turn: PreparedTurn) -> ChatResponse:
    """The Responder (one whole reply) and the finish: the rest of a plain turn."""
    if turn.responder_request is None:
        return await finish_turn(stages, turn, None)
    responder, resp_ms = await _timed(stages.respond(turn.responder_request))
    assert isinstance(responder, ResponderResult)
    return await finish_turn(stages, turn, responder, resp_ms)


async def run_turn(stages: Stages, pack: DomainPack, request: ChatRequest,
                   idempotency_key: str | None = None) -> ChatResponse:
    """A whole turn; a keyed turn applied before answers with its stored response (nothing runs again)."""
    try:
        turn = await prepare_turn(stages, pack, request, idempotency_key=idempotency_key)
    except Replayed as r:
        return r.response
    return await complete_turn(stages, turn)
