"""The served policy: a domain pack compiled once into its network, utility tables and questions, deciding
on a case's evidence (EU and VOI over the network's and the disambiguation question's answers)."""

from __future__ import annotations

import numpy as np

from coact.graphs.policy.bayesnet import BayesNet, SoftEvidence
from coact.graphs.policy.decide import ActionSpec, QuestionSpec, VirtualQuestion, decide
from coact.graphs.policy.dialogue import (
    EXPLANATION_TOP_K,
    GOAL_QUESTION,
    POSTERIOR_TOP_K,
    confirmation_questions,
    disambiguation_question,
    disambiguation_text,
    question_text,
)
from coact.graphs.policy.domain import DomainPack, build_actions, build_network, build_questions
from coact.graphs.policy.messages import DecisionResult, InfluenceOut, SessionEvidence


class Policy:
    """A domain pack compiled once: network, action utility tables, questions."""

    def __init__(self, pack: DomainPack, weights: dict[str, float] | None = None) -> None:
        self.pack = pack
        self.weights = {**pack.utilities.weights, **(weights or {})}
        self.net: BayesNet = build_network(pack)
        self.actions: list[ActionSpec] = build_actions(pack, self.weights)
        self.questions: list[QuestionSpec] = build_questions(pack)
        observed = {f.name for f in pack.findings} | {q.variable for q in self.questions}
        if pack.dialogue.human_request:
            observed.add(pack.dialogue.human_request)
        self.hidden = [v.name for v in pack.variables if v.name not in observed]

    def soft(self, evidence: SessionEvidence) -> list[SoftEvidence]:
        out = []
        for item in evidence.soft:
            states = self.net.states[item.variable]
            out.append(SoftEvidence(item.variable, np.array([item.likelihood[s] for s in states]), item.label))
        return out

    def decide(self, evidence: SessionEvidence, explain: bool = True) -> DecisionResult:
        askable: list[str] = []
        virtual: list[VirtualQuestion] = []
        soft = self.soft(evidence)
        # Declined, refused or failed in this case: the choice is among the rest. Agreed to: that is the choice.
        actions = [a for a in self.actions if a.name not in evidence.unavailable] or self.actions
        agreed = [a for a in actions if a.name in evidence.agreed]
        actions = agreed or actions
        cost: float | dict[str, float] = self.weights["question_cost"]
        if len(evidence.asked) < self.pack.utilities.max_questions and not agreed:
            askable = [q.variable for q in self.questions if q.variable not in evidence.hard
                       and q.variable not in evidence.asked]
            mood = self.pack.utilities.mood_cost
            wanted = [self.pack.intent_variable] + ([mood.variable] if mood else [])
            marginals = self.net.marginals(wanted, evidence.hard, soft)
            if GOAL_QUESTION not in evidence.asked:
                vq = disambiguation_question(self.pack, marginals[self.pack.intent_variable])
                virtual = [vq] if vq is not None else []
            virtual += confirmation_questions(self.pack, [a.name for a in actions], evidence)
            if mood is not None:
                p = float(marginals[mood.variable][self.net.states[mood.variable].index(mood.state)])
                extra = self.weights[mood.weight] if isinstance(mood.weight, str) else float(mood.weight)
                cost = {q: self.weights["question_cost"] + (0.0 if q in mood.exempt else extra * p)
                        for q in [*askable, *(v.name for v in virtual)]}
        result = decide(
            self.net, actions, self.questions, evidence.hard, soft,
            question_cost=cost, askable=askable, posterior_vars=self.hidden,
            explain=explain, virtual=virtual,
        )
        posterior = {}
        for var, dist in result.posterior.items():
            top = sorted(dist.items(), key=lambda kv: -kv[1])[:POSTERIOR_TOP_K]
            posterior[var] = {k: round(v, 6) for k, v in top}
        options = list(virtual[0].answers[:-1]) if result.kind == "ask" and result.target == GOAL_QUESTION else []
        question = None
        if result.kind == "ask":
            question = (disambiguation_text(self.pack, options) if options
                        else question_text(self.pack, evidence, result.target))  # type: ignore[arg-type]
        return DecisionResult(
            action=result.chosen,
            kind=result.kind,  # type: ignore[arg-type]
            target=result.target,
            question=question,
            options=options,
            expected_utility={k: round(v, 4) for k, v in result.expected_utility.items()},
            value_of_information={k: round(v, 4) for k, v in result.value_of_information.items()},
            posterior=posterior,
            explanation=[
                InfluenceOut(label=i.label, variable=i.variable, shift=round(i.shift, 4), choice_without=i.choice_without)
                for i in result.explanation[:EXPLANATION_TOP_K]
            ],
            reason=reason_text(result.chosen, result.expected_utility, result.value_of_information,
                               cost if isinstance(cost, dict) else {}, self.weights["question_cost"]),
            domain_version=f"{self.pack.name}@{self.pack.version}",
        )


def reason_text(chosen: str, eu: dict[str, float], voi: dict[str, float], costs: dict[str, float],
                base_cost: float) -> str:
    acts = sorted(((k, v) for k, v in eu.items() if not k.startswith("ask:")), key=lambda kv: -kv[1])
    best_act, best_eu = acts[0]
    if chosen.startswith("ask:"):
        q = chosen.removeprefix("ask:")
        return (f"asking {q} is worth {voi[q]:.2f} in expected utility (cost {costs.get(q, base_cost):.2f}); "
                f"acting now, the best option would be {best_act} (EU {best_eu:.2f})")
    runner = acts[1] if len(acts) > 1 else (best_act, best_eu)
    return f"{chosen} has the highest expected utility ({eu[chosen]:.2f}); next best {runner[0]} ({runner[1]:.2f})"
