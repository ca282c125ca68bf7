"""Turn logic between the stages: evidence accumulation, answers to pending questions, templates.

Plain functions over the wire schemas; the ingress and the DecisionActor call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.schemas import (
    DecisionResult,
    InfluenceOut,
    IntentResult,
    ReasonerResult,
    SessionEvidence,
    SessionState,
    SoftEvidenceItem,
)
from graphs.bayesnet import BayesNet, SoftEvidence
from graphs.domain import DomainPack, build_actions, build_network, build_questions
from graphs.policy import ActionSpec, QuestionSpec, decide

TERMINAL_KINDS = {"answer", "action", "escalate", "decline"}
POSTERIOR_TOP_K = 5
EXPLANATION_TOP_K = 5


# --- evidence ---------------------------------------------------------------------------------


def _likelihood_ratio(p: np.ndarray, prior: np.ndarray) -> np.ndarray:
    # A calibrated classifier gives P(state | text); the network needs P(text | state) up to a
    # constant, i.e. the posterior divided by the prior the classifier was trained under.
    lam = np.clip(p, 1e-9, None) / np.clip(prior, 1e-9, None)
    return lam / lam.max()


def intent_evidence(intent: IntentResult, pack: DomainPack, turn: int) -> SoftEvidenceItem:
    states = pack.states_of(next(v for v in pack.variables if v.name == pack.intent_variable))
    probs = dict(zip(intent.labels, intent.probs, strict=True))
    prior = dict(zip(intent.labels, intent.class_prior, strict=True))
    missing = [s for s in states if s not in probs]
    if missing:
        raise ValueError(f"intent model does not cover goal states {missing[:5]}")
    lam = _likelihood_ratio(np.array([probs[s] for s in states]), np.array([prior[s] for s in states]))
    return SoftEvidenceItem(
        variable=pack.intent_variable,
        likelihood={s: float(x) for s, x in zip(states, lam, strict=True)},
        label=f"turn {turn}: intent classifier (top: {intent.top[0].label} {intent.top[0].p:.2f})",
    )


def finding_evidence(reasoner: ReasonerResult, pack: DomainPack, turn: int) -> list[SoftEvidenceItem]:
    items = []
    known = {f.name for f in pack.findings}
    for name, p in reasoner.findings.items():
        if name not in known:
            continue
        prior = reasoner.finding_prior.get(name, 0.5)
        lam = _likelihood_ratio(np.array([p, 1 - p]), np.array([prior, 1 - prior]))
        items.append(
            SoftEvidenceItem(
                variable=name,
                likelihood={"yes": float(lam[0]), "no": float(lam[1])},
                label=f"turn {turn}: finding {name} (p={p:.2f})",
            )
        )
    return items


@dataclass
class TurnPlan:
    """What the ingress does with this turn before any decision is made."""

    evidence: SessionEvidence
    chitchat: str | None = None  # control intent answered by template, no decision needed
    answered: str | None = None  # "variable=state" when the message answered the pending question


def plan_turn(session: SessionState, intent: IntentResult, reasoner: ReasonerResult, pack: DomainPack) -> TurnPlan:
    turn = session.turns + 1
    evidence = session.evidence.model_copy(deep=True)
    control = intent.control
    if control in ("affirm", "deny") and session.pending_question:
        q = pack.question(session.pending_question)
        state = q.answers.get(control)
        if state is not None:
            evidence.hard[q.variable] = state
            return TurnPlan(evidence=evidence, answered=f"{q.variable}={state}")
    if control is not None:
        return TurnPlan(evidence=evidence, chitchat=control)
    evidence.soft.append(intent_evidence(intent, pack, turn))
    evidence.soft.extend(finding_evidence(reasoner, pack, turn))
    return TurnPlan(evidence=evidence)


def close_or_continue(session: SessionState, evidence: SessionEvidence, decision: DecisionResult | None) -> None:
    """Update the session after a decision: a terminal action closes the case, a question stays open."""
    if decision is None:
        session.pending_question = None
        return
    if decision.kind == "ask":
        evidence.asked.append(decision.target or "")
        session.evidence = evidence
        session.pending_question = decision.target
    else:
        session.evidence = SessionEvidence() if decision.kind in TERMINAL_KINDS else evidence
        session.pending_question = None
    session.last_action = decision.action


# --- decision ---------------------------------------------------------------------------------


class Policy:
    """A domain pack compiled once: network, action utility tables, questions."""

    def __init__(self, pack: DomainPack, weights: dict[str, float] | None = None) -> None:
        self.pack = pack
        self.weights = {**pack.utilities.weights, **(weights or {})}
        self.net: BayesNet = build_network(pack)
        self.actions: list[ActionSpec] = build_actions(pack, self.weights)
        self.questions: list[QuestionSpec] = build_questions(pack)
        self.hidden = [v.name for v in pack.variables if v.name not in {f.name for f in pack.findings}
                       and v.name not in {q.variable for q in self.questions}]

    def soft(self, evidence: SessionEvidence) -> list[SoftEvidence]:
        out = []
        for item in evidence.soft:
            states = self.net.states[item.variable]
            out.append(SoftEvidence(item.variable, np.array([item.likelihood[s] for s in states]), item.label))
        return out

    def decide(self, evidence: SessionEvidence) -> DecisionResult:
        askable = []
        if len(evidence.asked) < self.pack.utilities.max_questions:
            askable = [q.variable for q in self.questions if q.variable not in evidence.hard
                       and q.variable not in evidence.asked]
        result = decide(
            self.net, self.actions, self.questions, evidence.hard, self.soft(evidence),
            question_cost=self.weights["question_cost"], askable=askable, posterior_vars=self.hidden,
        )
        posterior = {}
        for var, dist in result.posterior.items():
            top = sorted(dist.items(), key=lambda kv: -kv[1])[:POSTERIOR_TOP_K]
            posterior[var] = {k: round(v, 6) for k, v in top}
        question = self.pack.question(result.target).text if result.kind == "ask" else None
        return DecisionResult(
            action=result.chosen,
            kind=result.kind,  # type: ignore[arg-type]
            target=result.target,
            question=question,
            expected_utility={k: round(v, 4) for k, v in result.expected_utility.items()},
            value_of_information={k: round(v, 4) for k, v in result.value_of_information.items()},
            posterior=posterior,
            explanation=[
                InfluenceOut(label=i.label, variable=i.variable, shift=round(i.shift, 4), choice_without=i.choice_without)
                for i in result.explanation[:EXPLANATION_TOP_K]
            ],
            reason=reason_text(result.chosen, result.expected_utility, result.value_of_information, self.weights),
            domain_version=f"{self.pack.name}@{self.pack.version}",
        )


def reason_text(chosen: str, eu: dict[str, float], voi: dict[str, float], weights: dict[str, float]) -> str:
    acts = sorted(((k, v) for k, v in eu.items() if not k.startswith("ask:")), key=lambda kv: -kv[1])
    best_act, best_eu = acts[0]
    if chosen.startswith("ask:"):
        q = chosen.removeprefix("ask:")
        return (f"asking {q} is worth {voi[q]:.2f} in expected utility (cost {weights['question_cost']:.2f}); "
                f"acting now, the best option would be {best_act} (EU {best_eu:.2f})")
    runner = acts[1] if len(acts) > 1 else (best_act, best_eu)
    return f"{chosen} has the highest expected utility ({eu[chosen]:.2f}); next best {runner[0]} ({runner[1]:.2f})"


# --- reply templates --------------------------------------------------------------------------


def reply_template(pack: DomainPack, decision: DecisionResult) -> tuple[str, list[str]]:
    """The content the reply must carry, and the texts it must not contain (other intents' answers)."""
    others = [i.faq for i in pack.intents if i.name != decision.target]
    if decision.kind == "answer" and decision.target:
        return pack.intent(decision.target).faq, others
    if decision.kind == "ask" and decision.question:
        return decision.question, others
    if decision.kind == "decline":
        return pack.out_of_scope_reply, others
    template = pack.actions[decision.action].reply if decision.action in pack.actions else None
    return template or pack.fallback_reply, others


def chitchat_reply(pack: DomainPack, control: str) -> str:
    return pack.control_intents[control].reply or pack.fallback_reply  # type: ignore[index]
