"""Executing decided actions, the pure part: the call an executor receives, the hand-over summary, and the reply
chosen by the executor's result (not by the plan).

No I/O here: the executor (``coact.actors.executor``) sends the call and returns an ``ActionOutcome``.
"""

from __future__ import annotations

import hashlib

from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.messages import (
    ActionCall,
    ActionOutcome,
    ActionRecord,
    DecisionResult,
    EvidenceLine,
    HistoryTurn,
    SessionState,
)

EXECUTED_KINDS = ("action", "escalate")


def executor_of(pack: DomainPack, decision: DecisionResult):
    """The pack's executor for the decided action, or None when the decision has nothing to carry out."""
    if decision.kind not in EXECUTED_KINDS:
        return None
    spec = pack.actions.get(decision.action)
    return spec.executor if spec is not None else None


def idempotency_key(session_id: str, turn: int, action: str) -> str:
    """The same for every attempt at this action in this turn of this session, whoever retries it (the executor,
    the ingress after a replica died, the client re-sending a turn the session never recorded)."""
    return hashlib.sha256(f"{session_id}\x1f{turn}\x1f{action}".encode()).hexdigest()[:32]


def _title(pack: DomainPack, goal: str) -> str:
    try:
        return pack.intent(goal).title
    except KeyError:
        return goal.replace("_", " ")


def case_summary(pack: DomainPack, session: SessionState, decision: DecisionResult, message: str,
                 earlier: list[ActionRecord] | None = None) -> str:
    """One paragraph for the person (or system) taking the case over: what was said, read, decided and done."""
    goal = decision.posterior.get(pack.intent_variable, {})
    reading = ", ".join(f"{_title(pack, g)} ({p:.2f})" for g, p in list(goal.items())[:3]) or "unclear"
    findings = [f"{v} = {max(d, key=d.get)} ({max(d.values()):.2f})" for v, d in decision.posterior.items()
                if v != pack.intent_variable and d]
    evidence = "; ".join(i.label for i in decision.explanation[:3]) or "none recorded"
    before = ", ".join(f"{r.action} {r.status}" + (f" ({r.reference})" if r.reference else "")
                       for r in [*session.actions, *(earlier or [])]) or "none"
    return (f"Customer's latest message (turn {session.turns + 1} of the conversation): \"{message}\". "
            f"What they want, as read by the assistant: {reading}. "
            f"Findings: {', '.join(findings) or 'none'}. Evidence that moved the decision most: {evidence}. "
            f"Actions so far in this conversation: {before}. "
            f"Decision: {decision.action}, because {decision.reason}.")


def action_call(pack: DomainPack, session: SessionState, decision: DecisionResult, message: str,
                earlier: list[ActionRecord] | None = None) -> ActionCall:
    """The executor's input: the action and the decision that justified it, keyed for idempotency; `earlier`:
    what this turn already tried (a hand-over after a failed freeze says so)."""
    turn = session.turns + 1
    return ActionCall(
        idempotency_key=idempotency_key(session.session_id, turn, decision.action),
        session_id=session.session_id, turn=turn, action=decision.action, target=decision.target,
        evidence=[EvidenceLine(label=i.label, variable=i.variable, shift=i.shift) for i in decision.explanation],
        posterior=decision.posterior, expected_utility=decision.expected_utility, reason=decision.reason,
        summary=case_summary(pack, session, decision, message, earlier),
        conversation=_conversation(session, message),
    )


def undo_call(session: SessionState, done: str, undo_action: str, message: str) -> ActionCall:
    """The call that takes back `done` (the customer's "no, don't do that" right after it), keyed like any other."""
    turn = session.turns + 1
    return ActionCall(idempotency_key=idempotency_key(session.session_id, turn, undo_action),
                      session_id=session.session_id, turn=turn, action=undo_action,
                      reason=f"the customer took back {done}: \"{message}\"",
                      summary=f"The customer asked to undo {done} right after it was done.",
                      conversation=_conversation(session, message))


def _conversation(session: SessionState, message: str) -> list[HistoryTurn]:
    return [*session.history, HistoryTurn(role="user", text=message)]


def result_text(pack: DomainPack, action: str, outcome: ActionOutcome | ActionRecord, fallback_reference: str) -> str:
    """The reply for the executor's result: the action's reply only when it is done."""
    spec = pack.actions[action]
    if outcome.status == "done":
        return (spec.reply or pack.fallback_reply).format(reference=outcome.reference or fallback_reference)
    if outcome.status == "refused" and spec.refused_reply:
        return spec.refused_reply.format(reason=(outcome.reason or "it was refused").rstrip("."))
    return spec.failed_reply or pack.fallback_reply


def claimed_actions(pack: DomainPack, reply: str) -> list[str]:
    """The actions a reply says were just carried out: those whose done-reply opening (up to its first placeholder)
    it contains, undo actions included. For checking that replies claim exactly what the executor did."""
    def opening(text: str) -> str:
        return " ".join(text.split("{", 1)[0].split())[:60]

    said = " ".join(reply.split())
    out = []
    for name, spec in pack.actions.items():
        if spec.executor is not None and spec.reply and opening(spec.reply) in said:
            out.append(name)
        if spec.undo is not None and opening(spec.undo.reply) in said:
            out.append(spec.undo.action)
    return out

