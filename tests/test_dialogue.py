"""Turn logic, guard and session table without Ray."""

from __future__ import annotations

from actors.guard import check_opener, check_reply, first_sentence
from actors.schemas import DecisionResult, IntentResult, ReasonerResult, ScoredLabel, SessionState
from actors.session_store import SessionTable
from graphs.dialogue import Policy, close_or_continue, plan_turn, reply_template
from graphs.domain import load_pack

PACK = load_pack("banking")


def intent_for(label: str, p: float = 0.8, control: str | None = None) -> IntentResult:
    labels = [i.name for i in PACK.intents] + [PACK.out_of_scope_label]
    rest = (1 - p) / (len(labels) - 1)
    probs = [p if name == label else rest for name in labels]
    return IntentResult(top=[ScoredLabel(label=label, p=p)], probs=probs, labels=labels,
                        class_prior=[1 / len(labels)] * len(labels), control=control, model_version="t")


def reasoner(**findings: float) -> ReasonerResult:
    names = [f.name for f in PACK.findings]
    return ReasonerResult(findings={n: findings.get(n, 0.05) for n in names},
                          finding_prior={n: 0.1 for n in names}, passages=[], model_version="t")


def decision(kind: str = "answer", action: str = "answer:card_arrival", target: str | None = "card_arrival",
             question: str | None = None) -> DecisionResult:
    return DecisionResult(action=action, kind=kind, target=target, question=question, expected_utility={},
                          value_of_information={}, posterior={}, explanation=[], reason="", domain_version="t")


def test_ask_then_yes_then_freeze() -> None:
    policy = Policy(PACK)
    session = SessionState(session_id="s")
    plan = plan_turn(session, intent_for("card_payment_not_recognised", 0.7), reasoner(), PACK)
    first = policy.decide(plan.evidence)
    assert first.kind == "ask" and first.target == "q_someone_else"
    assert first.explanation and first.reason.startswith("asking q_someone_else")
    close_or_continue(session, plan.evidence, first)
    assert session.pending_question == "q_someone_else"

    plan = plan_turn(session, intent_for("card_arrival", 0.1, control="affirm"), reasoner(), PACK)
    assert plan.answered == "q_someone_else=yes"
    second = policy.decide(plan.evidence)
    assert second.action == "freeze_card"
    close_or_continue(session, plan.evidence, second)
    assert session.evidence.soft == [] and session.pending_question is None  # the case is closed


def test_control_without_pending_question_is_chitchat() -> None:
    plan = plan_turn(SessionState(session_id="s"), intent_for("card_arrival", control="thanks"), reasoner(), PACK)
    assert plan.chitchat == "thanks"


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
    assert table.get("a") == {"x": 1}
    now[0] = 16
    assert table.get("a") is None and len(table) == 0
    table.put("b", {})
    assert table.delete("b") and not table.delete("b")
