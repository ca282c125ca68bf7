"""Turn logic, guard and session table without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from coact.actors.guard import check_opener, check_reply, first_sentence
from coact.actors.session_store import SessionTable
from coact.graphs.policy.dialogue import (
    GOAL_QUESTION,
    close_or_continue,
    goal_states,
    plan_turn,
    read_option,
    reply_template,
    same_case_probability,
    split_requests,
    transition_prior,
)
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import (
    AnswerReading,
    DecisionResult,
    IntentResult,
    ReasonerResult,
    ScoredLabel,
    SessionState,
)
from coact.graphs.policy.policy import Policy

pytestmark = pytest.mark.unit

PACK = load_pack("banking")
POLICY = Policy(PACK)
LABELS = [i.name for i in PACK.intents] + [PACK.out_of_scope_label]


def intent_for(dist: dict[str, float] | str, p: float = 0.8, content: float = 1.0, answer: str | None = None,
               **acts: float) -> IntentResult:
    """A calibrated intent result: `dist` puts mass on labels, the rest is spread evenly."""
    dist = {dist: p} if isinstance(dist, str) else dist
    rest = (1 - sum(dist.values())) / (len(LABELS) - len(dist))
    probs = [dist.get(name, rest) for name in LABELS]
    top = sorted(zip(LABELS, probs, strict=True), key=lambda kv: -kv[1])[:5]
    return IntentResult(top=[ScoredLabel(label=k, p=v) for k, v in top], probs=probs, labels=LABELS,
                        class_prior=[1 / len(LABELS)] * len(LABELS), model_version="t",
                        acts={a: acts.get(a, 0.0) for a in ("affirm", "deny", "unsure", "greeting", "thanks",
                                                             "goodbye", "request_human", "correction")},
                        content=content,
                        answer=None if answer is None else AnswerReading(state=answer, scores={answer: 0.9}))


def act(content: float = 0.02, **acts: float) -> IntentResult:
    """A message that is only an act ("yes", "thanks"): no domain content, the intent model unsure."""
    return intent_for({}, content=content, **acts)


def reasoner(**findings: float) -> ReasonerResult:
    # Heads trained with balanced class weights: their effective prior is 0.5.
    names = [f.name for f in PACK.findings]
    return ReasonerResult(findings={n: findings.get(n, 0.05) for n in names},
                          finding_prior={n: 0.5 for n in names}, passages=[], model_version="t")


def decision(kind: str = "answer", action: str = "answer:card_arrival", target: str | None = "card_arrival",
             question: str | None = None) -> DecisionResult:
    return DecisionResult(action=action, kind=kind, target=target, question=question, expected_utility={},
                          value_of_information={}, posterior={}, explanation=[], reason="", domain_version="t")


def turn(session: SessionState, message: str, intent: IntentResult, found: ReasonerResult | None = None,
         parts: list[IntentResult] | None = None):
    """One turn through the served logic: plan, decide (unless a template answers), close."""
    plan = plan_turn(session, message, intent, found or reasoner(), PACK, parts)
    result = None if plan.reply is not None else POLICY.decide(plan.evidence)
    close_or_continue(session, plan, result, PACK)
    session.turns += 1
    return plan, result


def test_ask_then_yes_then_freeze() -> None:
    session = SessionState(session_id="s")
    _, first = turn(session, "I see a payment I don't recognise", intent_for("card_payment_not_recognised", 0.7))
    assert first.kind == "ask" and first.target == "q_someone_else"
    assert first.explanation and first.reason.startswith("asking q_someone_else")
    assert session.pending_question == "q_someone_else"
    plan, second = turn(session, "yes", act(affirm=0.97))
    assert plan.answered == "q_someone_else=yes" and second.action == "freeze_card"
    assert session.pending_question is None and session.done_actions == ["freeze_card"]


def test_confident_intent_is_answered_without_questions() -> None:
    # A low finding output is evidence *against* the finding, once divided by the head's own 0.5 prior.
    for goal in ("card_arrival", "top_up_limits", "exchange_rate", "cash_withdrawal_charge"):
        _, d = turn(SessionState(session_id="s"), "…", intent_for(goal, 0.85))
        assert (d.kind, d.target) == ("answer", goal)


def test_social_acts_are_answered_by_template_and_keep_the_case() -> None:
    session = SessionState(session_id="s")
    plan, d = turn(session, "thanks bye", act(thanks=0.9, goodbye=0.9))
    assert d is None and plan.reply_name == "goodbye"
    plan, d = turn(session, "hello", act(greeting=0.95))
    assert d is None and plan.reply_name == "greeting"


def test_pending_question_survives_chitchat_and_is_answered_in_words() -> None:
    session = SessionState(session_id="s")
    turn(session, "…", intent_for("card_payment_not_recognised", 0.7))
    assert session.pending_question == "q_someone_else"
    plan, d = turn(session, "hello?", act(greeting=0.9))
    assert d is None and plan.keep_pending and PACK.question("q_someone_else").text in plan.reply
    assert session.pending_question == "q_someone_else"
    plan, d = turn(session, "I never made that payment", intent_for("card_payment_not_recognised", 0.6,
                                                                    answer="yes"))
    assert plan.answered == "q_someone_else=yes" and d.action == "freeze_card"


def test_not_sure_adds_no_evidence_and_moves_on() -> None:
    session = SessionState(session_id="s")
    turn(session, "…", intent_for("card_payment_not_recognised", 0.7))
    before = session.evidence.model_copy(deep=True)
    plan, d = turn(session, "not sure", act(unsure=0.95))
    assert plan.answered == "q_someone_else=unsure" and plan.prefix
    assert plan.evidence.hard == before.hard and len(plan.evidence.soft) == len(before.soft)
    assert d.kind != "decline" and d.target != "q_someone_else"


def test_request_for_a_person_is_evidence_and_escalates() -> None:
    session = SessionState(session_id="s")
    angry = intent_for(PACK.out_of_scope_label, 0.7, request_human=0.96)
    plan, d = turn(session, "I want to speak to a real person, this is ridiculous", angry,
                   reasoner(f_frustrated=0.95))
    asked = [s for s in plan.evidence.soft if s.variable == "asked_for_human"]
    assert len(asked) == 1 and asked[0].likelihood["no"] < 0.05 and d.kind == "escalate"
    assert any("asked for a person" in e.label for e in d.explanation)


def test_frustration_alone_offers_a_person_never_declines() -> None:
    for p_oos in (0.5, 0.8, 0.95):
        _, d = turn(SessionState(session_id="s"), "this is ridiculous, nobody helps me!!",
                    intent_for(PACK.out_of_scope_label, p_oos), reasoner(f_frustrated=0.95))
        assert d.kind in ("escalate", "ask") and d.kind != "decline", (p_oos, d.action)
        if d.kind == "ask":
            assert d.target == "q_wants_human"


def test_follow_up_is_read_in_the_context_of_the_closed_case() -> None:
    session = SessionState(session_id="s")
    turn(session, "why was I charged for taking cash out?", intent_for("cash_withdrawal_charge", 0.9))
    assert session.goal_belief and session.evidence.soft == []
    # The follow-up alone is split between a withdrawal topic and a top-up one.
    split = {"atm_support": 0.3, "top_up_limits": 0.35, "declined_cash_withdrawal": 0.1}
    plan, d = turn(session, "and what's the limit?", intent_for(split))
    assert any("context of the previous case" in n for n in plan.notes)
    alone = POLICY.decide(plan_turn(SessionState(session_id="x"), "…", intent_for(split), reasoner(), PACK).evidence)
    posterior = d.posterior["goal"]
    assert posterior.get("atm_support", 0) > alone.posterior["goal"].get("atm_support", 0)


def test_transition_prior_is_a_distribution_that_favours_the_case_and_its_group() -> None:
    t = transition_prior(PACK, {"cash_withdrawal_charge": 0.9})
    states = goal_states(PACK)
    assert np.isclose(t.sum(), 1.0)
    group = {i.name: i.group for i in PACK.intents}
    same_group = [s for s in states if group.get(s) == "fees_and_charges" and s != "cash_withdrawal_charge"]
    other = [s for s in states if group.get(s) == "transfers"]
    assert t[states.index("cash_withdrawal_charge")] > t[states.index(same_group[0])] > t[states.index(other[0])]


def test_correction_retracts_the_corrected_turn_and_reopens_the_case() -> None:
    session = SessionState(session_id="s")
    _, d = turn(session, "my payment didn't go through", intent_for("declined_card_payment", 0.85))
    assert d.target == "declined_card_payment"
    plan, d = turn(session, "no, it was a transfer to my landlord, not a card payment",
                   intent_for({"failed_transfer": 0.45, "declined_card_payment": 0.25}, correction=0.9, deny=0.8))
    labels = [s.label for s in plan.evidence.soft]
    assert not any(label.startswith("turn 1:") for label in labels)
    assert any("corrected" in label for label in labels)
    assert d.kind == "answer" and d.target == "failed_transfer"


def test_change_of_topic_opens_a_new_case() -> None:
    session = SessionState(session_id="s")
    turn(session, "…", intent_for("card_payment_not_recognised", 0.7))
    assert session.pending_question
    plan, d = turn(session, "how do I top up with apple pay?", intent_for("topping_up_by_card", 0.9))
    assert any(n.startswith("new case") for n in plan.notes)
    assert all(not s.label.startswith("turn 1:") for s in plan.evidence.soft)
    assert (d.kind, d.target) == ("answer", "topping_up_by_card")


def test_confirmation_after_an_action_is_not_a_second_action() -> None:
    session = SessionState(session_id="s")
    turn(session, "my card was stolen", intent_for("lost_or_stolen_card", 0.95), reasoner(f_lost_stolen=0.97))
    assert session.last_action == "freeze_card"
    plan, d = turn(session, "yes please block it", intent_for("lost_or_stolen_card", 0.6, affirm=0.9))
    assert d is None and plan.reply_name == "done:freeze_card"
    assert plan.reply == PACK.actions["freeze_card"].done_reply


def test_split_goal_gets_a_disambiguation_question_valued_by_voi() -> None:
    session = SessionState(session_id="s")
    split = {"pending_top_up": 0.3, "top_up_failed": 0.3, "top_up_reverted": 0.25}
    _, d = turn(session, "my top-up didn't work", intent_for(split))
    assert d.kind == "ask" and d.target == GOAL_QUESTION, d.action
    assert set(d.options) <= set(split) and len(d.options) >= 2
    assert d.value_of_information[GOAL_QUESTION] > 0
    assert all(PACK.intent(o).title in d.question for o in d.options)
    second = d.options[1]
    plan, d = turn(session, "the second one", act(content=0.3))
    assert plan.answered == f"goal={second}" and (d.kind, d.target) == ("answer", second)


def test_disambiguation_answers_by_ordinal_words_or_restricted_intent() -> None:
    options = ["pending_top_up", "top_up_reverted"]
    none = act()
    assert read_option(PACK, options, "the first one", none) == "pending_top_up"
    assert read_option(PACK, options, "the last", none) == "top_up_reverted"
    assert read_option(PACK, options, "it was reverted", none) == "top_up_reverted"
    assert read_option(PACK, options, "neither of those", none) == "something_else"
    restricted = intent_for({"top_up_reverted": 0.4, "pending_top_up": 0.05})
    assert read_option(PACK, options, "the money went back", restricted) == "top_up_reverted"


def test_two_requests_in_one_message_handle_the_urgent_first() -> None:
    message = "I need to change my address and also I lost my card"
    parts = split_requests(message)
    assert len(parts) == 2
    results = [intent_for("edit_personal_details", 0.9), intent_for("lost_or_stolen_card", 0.9)]
    session = SessionState(session_id="s")
    plan, d = turn(session, message, intent_for({"lost_or_stolen_card": 0.5, "edit_personal_details": 0.4}),
                   reasoner(f_lost_stolen=0.9), results)
    assert plan.deferred == ["edit_personal_details"] and d.kind in ("action", "answer")
    assert session.deferred == ["edit_personal_details"]


def test_same_case_probability_follows_the_evidence() -> None:
    lam_same = np.array([1.0 if s == "card_arrival" else 0.001 for s in goal_states(PACK)])
    lam_other = np.array([1.0 if s == "exchange_rate" else 0.001 for s in goal_states(PACK)])
    belief = {"card_arrival": 0.8, "card_delivery_estimate": 0.1}
    assert same_case_probability(PACK, belief, lam_same) > 0.9
    assert same_case_probability(PACK, belief, lam_other) < 0.5


def test_guard_rejects_what_the_policy_did_not_decide() -> None:
    answer = decision()
    forbidden = [i.faq for i in PACK.intents if i.name != "card_arrival"]
    assert check_opener("I understand, let me explain.", answer, forbidden) is None
    assert "question" in check_opener("Did you lose it?", answer, forbidden)
    assert "number" in check_opener("It takes 3 days.", answer, forbidden)
    assert "freeze" in check_opener("I have frozen your card.", answer, forbidden)
    assert "escalate" in check_opener("Let me connect you to an agent.", answer, forbidden)
    other = PACK.intent("exchange_rate").faq
    assert "another intent" in check_opener(" ".join(other.split()[:8]) + ".", answer, forbidden)
    freeze = decision(kind="action", action="freeze_card", target=None)
    assert check_opener("I'm sorry, I will freeze it now.", freeze, forbidden) is None
    ask = decision(kind="ask", action="ask:q_card_in_hand", target="q_card_in_hand", question="Do you have it?")
    assert check_reply("Okay. Do you have it?", "Do you have it?", ask, forbidden) is None
    assert check_reply("Okay.", "Do you have it?", ask, forbidden) is not None
    assert first_sentence("Sure thing! More text here.") == "Sure thing!"
    assert "incomplete" in check_opener("I will make sure that", answer, forbidden)
    assert "off script" in check_opener("As an AI I cannot help.", answer, forbidden)
    grounding = "my card has not arrived " + PACK.intent("card_arrival").faq
    assert check_opener("I understand you're waiting for your card.", answer, forbidden, grounding) is None
    assert "adds content" in check_opener("It depends on where you live in Australia.", answer, forbidden, grounding)


def test_templates_carry_the_decided_content() -> None:
    template, forbidden = reply_template(PACK, decision())
    assert template == PACK.intent("card_arrival").faq and template not in forbidden
    template, _ = reply_template(PACK, decision(kind="escalate", action="escalate", target=None))
    assert "human" in template


def test_session_table_ttl() -> None:
    now = [0.0]
    table = SessionTable(ttl_s=10, clock=lambda: now[0])
    table.put("a", {"x": 1})
    now[0] = 5
    assert table.get("a") == (1, {"x": 1})
    now[0] = 16
    assert table.get("a") is None and len(table) == 0
    table.put("b", {})
    assert table.delete("b") and not table.delete("b")


def test_a_negated_part_is_evidence_against_its_goals() -> None:
    message = "it was a transfer to my landlord, not a card payment"
    parts = split_requests(message)
    assert parts == ["it was a transfer to my landlord", "not a card payment"]
    results = [intent_for({"failed_transfer": 0.5, "declined_transfer": 0.3}),
               intent_for({"declined_card_payment": 0.5, "card_payment_not_recognised": 0.3})]
    whole = intent_for({"declined_card_payment": 0.5, "failed_transfer": 0.3})
    plan, d = turn(SessionState(session_id="s"), message, whole, parts=results)
    against = [s for s in plan.evidence.soft if "is not" in s.label]
    assert len(against) == 1
    assert against[0].likelihood["declined_card_payment"] < against[0].likelihood["failed_transfer"]
    assert d.posterior["goal"].get("declined_card_payment", 0) < d.posterior["goal"].get("failed_transfer", 0)


def test_thanks_after_an_action_is_thanks_and_a_bare_correction_reopens_without_new_evidence() -> None:
    session = SessionState(session_id="s")
    turn(session, "my card was stolen", intent_for("lost_or_stolen_card", 0.95), reasoner(f_lost_stolen=0.97))
    plan, d = turn(session, "thanks", act(thanks=0.95))
    assert d is None and plan.reply_name == "thanks"
    session = SessionState(session_id="s")
    turn(session, "…", intent_for("exchange_rate", 0.9))
    plan, _ = turn(session, "that's not what I meant", act(correction=0.9))
    assert [s.label for s in plan.evidence.soft] == ["turn 2: the customer corrected the answer about exchange_rate"]
