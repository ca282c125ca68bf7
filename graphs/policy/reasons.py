"""The reason a reply gives: one clause rendered from the decision's explanation through the pack's templates.

The clause names the evidence that moved the decision most towards what was chosen (the leave-one-out
influence, `decide.py`), in the customer's terms (`reasons.evidence` of the pack). A question says why it is
asked (`questions[].why`, `confirm.why`). An answer at low confidence says what was understood. The LM never
writes any of it: the guard checks the clause is in the reply (`check_reply`).
"""

from __future__ import annotations

from dataclasses import dataclass

from coact.graphs.policy.dialogue import CONFIRM_PREFIX, GOAL_QUESTION
from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.messages import DecisionResult, SessionEvidence, SoftEvidenceItem

HARD_PREFIX = "answer: "  # decide.py labels a hard answer "answer: <variable>=<state>"


@dataclass(frozen=True)
class Reason:
    clause: str  # the sentence the reply carries
    source: str  # the evidence label (or question) it came from, for the trace

    def trace(self) -> dict:
        return {"clause": self.clause, "source": self.source}


def _points_to(item: SoftEvidenceItem) -> str | None:
    """The state a soft observation favours: its largest likelihood, if that one is unique."""
    ranked = sorted(item.likelihood.items(), key=lambda kv: -kv[1])
    if len(ranked) < 2 or ranked[0][1] <= ranked[1][1]:
        return None
    return ranked[0][0]


def _phrase(pack: DomainPack, variable: str, state: str) -> str | None:
    if variable == pack.intent_variable:
        if state == pack.out_of_scope_label:
            return pack.reasons.out_of_scope
        titles = {i.name: i.title for i in pack.intents}
        return pack.reasons.goal.format(title=titles[state]) if state in titles else None
    return pack.reasons.evidence.get(variable, {}).get(state)


def _evidence_phrase(pack: DomainPack, decision: DecisionResult, evidence: SessionEvidence) -> tuple[str, str] | None:
    """The strongest supporting evidence that the pack can put in words: (phrase, label)."""
    soft = {s.label: s for s in evidence.soft}
    for inf in decision.explanation:  # largest |shift| first
        if inf.shift <= 0:
            continue  # it argued against the choice
        if inf.label.startswith(HARD_PREFIX):
            variable, _, state = inf.label.removeprefix(HARD_PREFIX).partition("=")
        elif inf.label in soft:
            variable, state = soft[inf.label].variable, _points_to(soft[inf.label])
        else:
            continue
        phrase = None if state is None else _phrase(pack, variable, state)
        if phrase:
            return phrase, inf.label
    return None


def _question_why(pack: DomainPack, question: str) -> str | None:
    if question == GOAL_QUESTION:
        return pack.reasons.disambiguation
    if question.startswith(CONFIRM_PREFIX):
        action = pack.actions.get(question.removeprefix(CONFIRM_PREFIX))
        return None if action is None or action.confirm is None else action.confirm.why
    return next((q.why for q in pack.questions if q.variable == question), None)


def reason_for(pack: DomainPack, decision: DecisionResult, evidence: SessionEvidence) -> Reason | None:
    """The clause an act/ask/escalate/decline reply carries, or an answer's "understood" at low confidence."""
    r = pack.reasons
    if decision.kind == "answer":
        p = decision.posterior.get(pack.intent_variable, {}).get(decision.target or "", 1.0)
        if decision.target is None or p >= r.low_confidence:
            return None
        return Reason(r.understood.format(title=pack.intent(decision.target).title), f"posterior {p:.2f}")
    sentence = r.sentence.get(decision.kind)  # type: ignore[call-overload]
    if sentence is None:
        return None
    if decision.kind == "ask":
        question = decision.action.removeprefix("ask:")
        why = _question_why(pack, question)
        if why:
            return Reason(sentence.format(reason=why), f"question {question}")
    found = _evidence_phrase(pack, decision, evidence)
    if found is None:
        return Reason(sentence.format(reason=r.fallback), "prior")
    return Reason(sentence.format(reason=found[0]), found[1])


def with_reason(template: str, reason: Reason | None, kind: str) -> str:
    """The decided content with its reason: after it, except an answer's "understood" which comes first."""
    if reason is None:
        return template
    return f"{reason.clause} {template}" if kind == "answer" else f"{template} {reason.clause}"
