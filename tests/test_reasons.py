"""The reason clause: the strongest supporting evidence the pack can phrase, a question's why, an answer's
"understood" at low confidence; decided by the real policy on the banking pack."""

from __future__ import annotations

import pytest

from coact.graphs.policy.dialogue import goal_states
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import DecisionResult, InfluenceOut, SessionEvidence, SoftEvidenceItem
from coact.graphs.policy.policy import Policy
from coact.graphs.policy.reasons import reason_for, with_reason

pytestmark = pytest.mark.unit

PACK = load_pack("banking")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(PACK)


def _finding(name: str, lam_yes: float, turn: int = 1) -> SoftEvidenceItem:
    return SoftEvidenceItem(variable=name, likelihood={"yes": lam_yes, "no": 1.0}, label=f"turn {turn}: finding {name}",
                            turn=turn)


def _goal(goal: str, lam: float) -> SoftEvidenceItem:
    return SoftEvidenceItem(variable="goal", likelihood={s: lam if s == goal else 1.0 for s in goal_states(PACK)},
                            label="turn 1: intent classifier", turn=1)


def test_an_action_names_the_evidence_that_moved_it(policy: Policy) -> None:
    evidence = SessionEvidence(soft=[_goal("compromised_card", 30.0)], hard={"q_someone_else": "yes"})
    decision = policy.decide(evidence)
    assert decision.action == "freeze_card"
    reason = reason_for(PACK, decision, evidence)
    top = next(i for i in decision.explanation if i.shift > 0)
    assert reason is not None and reason.source == top.label
    assert top.label == "answer: q_someone_else=yes"  # the answer moved it most (the policy's explanation)
    assert reason.clause == "I did this because you told me someone else may have used your card."
    text = with_reason("I have frozen your card.", reason, decision.kind)
    assert text == f"I have frozen your card. {reason.clause}"


def test_evidence_against_the_choice_or_without_a_phrase_is_passed_over() -> None:
    base = dict(action="escalate", kind="escalate", expected_utility={}, value_of_information={}, posterior={},
                reason="", domain_version="banking@1")
    evidence = SessionEvidence(soft=[_finding("f_lost_stolen", 0.2), _finding("asked_for_human", 50.0, 2)])
    decision = DecisionResult(**base, explanation=[
        InfluenceOut(label="turn 1: finding f_lost_stolen", variable="f_lost_stolen", shift=3.0, choice_without="x"),
        InfluenceOut(label="turn 9: nothing", variable="upset", shift=2.0, choice_without="x"),
        InfluenceOut(label="turn 2: finding asked_for_human", variable="asked_for_human", shift=1.0,
                     choice_without="x"),
    ])
    # f_lost_stolen points to "no" (no phrase for it), the unknown label has no evidence item: the third speaks.
    reason = reason_for(PACK, decision, evidence)
    assert reason is not None and reason.clause == "I did this because you asked to speak to a person."
    against = decision.model_copy(update={"explanation": [decision.explanation[2].model_copy(update={"shift": -1.0})]})
    assert reason_for(PACK, against, evidence).source == "prior"  # nothing supported it: the pack's fallback


def test_a_question_says_why_it_is_asked(policy: Policy) -> None:
    evidence = SessionEvidence(soft=[_goal("compromised_card", 30.0)])
    decision = policy.decide(evidence)
    assert decision.action == "ask:q_someone_else"
    reason = reason_for(PACK, decision, evidence)
    question = decision.action.removeprefix("ask:")
    why = next(q.why for q in PACK.questions if q.variable == question) if not question.startswith("confirm:") \
        else PACK.actions[question.removeprefix("confirm:")].confirm.why
    assert reason is not None and reason.clause == f"I'm asking because {why}."


def test_an_answer_says_what_was_understood_only_when_unsure() -> None:
    base = dict(action="answer:card_arrival", kind="answer", target="card_arrival", expected_utility={},
                value_of_information={}, explanation=[], reason="", domain_version="banking@1")
    sure = DecisionResult(**base, posterior={"goal": {"card_arrival": 0.9}})
    unsure = DecisionResult(**base, posterior={"goal": {"card_arrival": 0.4}})
    assert reason_for(PACK, sure, SessionEvidence()) is None
    reason = reason_for(PACK, unsure, SessionEvidence())
    title = PACK.intent("card_arrival").title
    assert reason is not None and reason.clause == PACK.reasons.understood.format(title=title)
    assert with_reason("Cards arrive in days.", reason, "answer").startswith(reason.clause)


def test_a_pack_phrase_for_an_unknown_state_names_the_field(tmp_path) -> None:
    from coact.graphs.policy.domain import DomainPackError
    from coact.graphs.policy.domain import load_pack as load

    src = PACK.model_dump(mode="json")
    src["reasons"]["evidence"]["f_urgent"] = {"maybe": "x"}
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(src))
    with pytest.raises(DomainPackError, match=r"reasons\.evidence\.f_urgent"):
        load(path)
