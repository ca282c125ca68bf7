"""graphs.policy: hand-computed expected utilities and VOI, properties on random networks, the banking pack."""

from __future__ import annotations

import numpy as np
import pytest

from coact.graphs.policy.bayesnet import BayesNet, SoftEvidence
from coact.graphs.policy.decide import (
    ActionSpec,
    QuestionSpec,
    decide,
    expected_utilities,
    value_of_information,
)
from tests.helpers.networks import random_network

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------- the clinic example
#
# Disease D ∈ {yes, no}, P(D=yes) = 0.3.   Test T ∈ {pos, neg}: P(pos | yes) = 0.9, P(pos | no) = 0.2.
# Weather W ∈ {sun, rain}, independent of everything (P(sun) = 0.5).
# Utilities on D:  treat: U(yes) = 8, U(no) = -2;   wait: U(yes) = -10, U(no) = 2.
#
# No evidence:  EU(treat) = 0.3*8 + 0.7*(-2) = 1.0;  EU(wait) = 0.3*(-10) + 0.7*2 = -1.6;  best = treat, 1.0
# Joint with T:  P(yes,pos) = 0.27, P(no,pos) = 0.14, P(yes,neg) = 0.03, P(no,neg) = 0.56.
#   T=pos: Σ_D P(D,pos) U:  treat 0.27*8 - 0.14*2 = 1.88;   wait -2.7 + 0.28 = -2.42  -> best 1.88 (treat)
#   T=neg: Σ_D P(D,neg) U:  treat 0.24 - 1.12 = -0.88;      wait -0.3 + 1.12 = 0.82   -> best 0.82 (wait)
# VOI(T) = Σ_t P(t) max_a EU(a | t) - max_a EU(a) = 1.88 + 0.82 - 1.0 = 1.70
# Given T=neg:  EU(treat) = -0.88/0.59,  EU(wait) = 0.82/0.59.
# VOI(W) = 0: W is independent of D, so every answer leaves the EUs unchanged.


@pytest.fixture(scope="module")
def clinic() -> tuple[BayesNet, list[ActionSpec], list[QuestionSpec]]:
    net = BayesNet(
        states={"D": ["yes", "no"], "T": ["pos", "neg"], "W": ["sun", "rain"]},
        parents={"T": ["D"]},
        cpts={"D": np.array([0.3, 0.7]), "T": np.array([[0.9, 0.1], [0.2, 0.8]]), "W": np.array([0.5, 0.5])},
    )
    actions = [
        ActionSpec("treat", "action", ("D",), np.array([8.0, -2.0])),
        ActionSpec("wait", "action", ("D",), np.array([-10.0, 2.0])),
    ]
    questions = [QuestionSpec("T", "Shall we run the test?"), QuestionSpec("W", "Is it sunny?")]
    return net, actions, questions


def test_clinic_expected_utilities(clinic) -> None:
    net, actions, _ = clinic
    eu = expected_utilities(net, actions)
    assert eu == pytest.approx({"treat": 1.0, "wait": -1.6}, abs=1e-12)
    eu_neg = expected_utilities(net, actions, hard={"T": "neg"})
    assert eu_neg == pytest.approx({"treat": -0.88 / 0.59, "wait": 0.82 / 0.59}, abs=1e-12)


def test_clinic_value_of_information(clinic) -> None:
    net, actions, _ = clinic
    assert value_of_information(net, actions, "T") == pytest.approx(1.70, abs=1e-12)
    assert value_of_information(net, actions, "W") == 0.0
    assert value_of_information(net, actions, "T", hard={"T": "pos"}) == 0.0  # already answered


def test_clinic_asks_when_voi_exceeds_cost(clinic) -> None:
    net, actions, questions = clinic
    r = decide(net, actions, questions, question_cost=1.0, askable=["T", "W"], posterior_vars=["D"])
    assert (r.chosen, r.kind, r.target) == ("ask:T", "ask", "T")
    assert r.expected_utility == pytest.approx(
        {"treat": 1.0, "wait": -1.6, "ask:T": 1.0 + 1.7 - 1.0, "ask:W": 1.0 + 0.0 - 1.0}, abs=1e-12
    )
    assert r.value_of_information == pytest.approx({"T": 1.7, "W": 0.0}, abs=1e-12)
    assert list(r.posterior) == ["D"] and r.posterior["D"] == pytest.approx({"yes": 0.3, "no": 0.7})
    assert r.explanation == []  # no evidence, nothing to explain


def test_clinic_acts_when_cost_exceeds_voi(clinic) -> None:
    net, actions, questions = clinic
    r = decide(net, actions, questions, question_cost=2.0, askable=["T", "W"])
    assert (r.chosen, r.kind, r.target) == ("treat", "action", None)
    assert r.expected_utility["ask:T"] == pytest.approx(0.7, abs=1e-12)


def test_answered_question_is_not_asked_again(clinic) -> None:
    net, actions, questions = clinic
    r = decide(net, actions, questions, hard={"T": "neg"}, question_cost=0.0, askable=["T", "W"])
    assert r.chosen == "wait"
    assert "ask:T" not in r.expected_utility and "T" not in r.value_of_information


def test_ties_prefer_actions_then_given_order(clinic) -> None:
    net, _, questions = clinic
    same = np.array([1.0, 1.0])
    actions = [ActionSpec("b", "action", ("D",), same), ActionSpec("a", "action", ("D",), same)]
    # VOI(W) = 0 and cost 0: asking ties with acting; the first action wins.
    r = decide(net, actions, questions, question_cost=0.0, askable=["W"])
    assert r.chosen == "b"
    assert r.expected_utility["ask:W"] == r.expected_utility["b"]


def test_unknown_askable_is_rejected(clinic) -> None:
    net, actions, questions = clinic
    with pytest.raises(ValueError, match="askable"):
        decide(net, actions, questions, askable=["X"])


def test_explanation_puts_decisive_evidence_first(clinic) -> None:
    # With T=neg and a weak symptom likelihood λ(D) = [0.6, 0.5]:
    #   joint: yes 0.3*0.1*0.6 = 0.018, no 0.7*0.8*0.5 = 0.28  -> EU treat -1.396, wait 1.275: wait.
    #   without T=neg: treat wins (margin of wait < 0); without the symptom: wait still wins by a similar margin.
    net, actions, questions = clinic
    soft = [SoftEvidence("D", np.array([0.6, 0.5]), label="symptom: mild cough")]
    r = decide(net, actions, questions, hard={"T": "neg"}, soft=soft, question_cost=1.0, askable=["W"])
    assert r.chosen == "wait"
    first, second = r.explanation
    assert (first.label, first.variable, first.choice_without) == ("answer: T=neg", "T", "treat")
    assert (second.label, second.variable, second.choice_without) == ("symptom: mild cough", "D", "wait")
    assert abs(first.shift) > abs(second.shift)

    # The margins, recomputed from expected utilities (ask:W = best action - 1 never competes here).
    def margin(eu: dict[str, float]) -> float:
        return eu["wait"] - max(eu["treat"], max(eu.values()) - 1.0)

    assert first.margin_with == pytest.approx(margin(expected_utilities(net, actions, {"T": "neg"}, soft)))
    assert first.margin_without == pytest.approx(
        expected_utilities(net, actions, {}, soft)["wait"] - expected_utilities(net, actions, {}, soft)["treat"]
    )
    eu_no_soft = expected_utilities(net, actions, {"T": "neg"})
    assert second.margin_without == pytest.approx(eu_no_soft["wait"] - max(eu_no_soft["treat"], eu_no_soft["wait"] - 1))
    assert first.shift == pytest.approx(first.margin_with - first.margin_without)


# --------------------------------------------------------------------------- random networks


def _random_actions(net: BayesNet, rng: np.random.Generator, n: int) -> list[ActionSpec]:
    hidden = net.variables[: max(2, len(net.variables) // 2)]
    actions = []
    for i in range(n):
        on = tuple(str(v) for v in rng.choice(hidden, size=int(rng.integers(1, 3)), replace=False))
        shape = tuple(len(net.states[v]) for v in on)
        actions.append(ActionSpec(f"a{i}", "action", on, rng.normal(0, 5, size=shape)))
    return actions


@pytest.mark.parametrize("seed", range(10))
def test_voi_matches_definition_and_is_non_negative(seed: int) -> None:
    net = random_network(seed)
    rng = np.random.default_rng(500 + seed)
    actions = _random_actions(net, rng, 6)
    for _ in range(6):
        q = str(rng.choice(net.variables))
        others = [v for v in net.variables if v != q]
        hard = {v: str(rng.choice(net.states[v])) for v in rng.choice(others, size=int(rng.integers(0, 2)))}
        soft = [SoftEvidence(str(v), rng.uniform(0.1, 1.0, len(net.states[str(v)]))) for v in rng.choice(others, 1)]
        voi = value_of_information(net, actions, q, hard, soft)
        assert voi >= 0.0
        # The definition, term by term, through the public API.
        p_answer = net.query([q], hard, soft)
        informed = sum(
            p * max(expected_utilities(net, actions, {**hard, q: s}, soft).values())
            for s, p in zip(net.states[q], p_answer, strict=True)
            if p > 0
        )
        want = informed - max(expected_utilities(net, actions, hard, soft).values())
        assert voi == pytest.approx(max(want, 0.0), abs=1e-9)


def test_voi_when_question_is_a_utility_variable() -> None:
    # Observing the very variable the utility depends on: VOI = E[max_a U_a(d)] - max_a E[U_a(d)].
    net = random_network(4)
    v = net.variables[0]
    k = len(net.states[v])
    rng = np.random.default_rng(9)
    actions = [ActionSpec(f"a{i}", "action", (v,), rng.normal(size=k)) for i in range(4)]
    p = net.query([v])
    table = np.stack([a.utility for a in actions])
    want = float(p @ table.max(axis=0) - (table @ p).max())
    assert value_of_information(net, actions, v) == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- the banking pack


@pytest.fixture(scope="module")
def banking():
    from coact.graphs.policy.domain import (
        build_actions,
        build_network,
        build_questions,
        load_pack,
        resolve_pack_path,
    )

    if not resolve_pack_path("banking").exists():
        pytest.skip("banking domain pack not written yet")
    pack = load_pack("banking")
    net = build_network(pack)
    return pack, net, build_actions(pack, pack.utilities.weights), build_questions(pack)


def _banking_decide(banking, hard: dict[str, str]):
    pack, net, actions, questions = banking
    goal = net.states[pack.intent_variable]
    # An intent classifier 70% sure of card_payment_not_recognised, the rest spread evenly.
    lam = np.full(len(goal), 0.3 / (len(goal) - 1))
    lam[goal.index("card_payment_not_recognised")] = 0.7
    soft = [SoftEvidence(pack.intent_variable, lam, label="intent: card_payment_not_recognised")]
    return decide(
        net,
        actions,
        questions,
        hard=hard,
        soft=soft,
        question_cost=pack.utilities.weights["question_cost"],
        askable=[q.variable for q in questions],
        posterior_vars=[pack.intent_variable, "card_at_risk"],
    )


def test_banking_asks_whether_someone_else_used_the_card(banking) -> None:
    r = _banking_decide(banking, {})
    assert r.chosen == "ask:q_someone_else", sorted(r.expected_utility.items(), key=lambda kv: -kv[1])[:5]
    assert all(v >= 0 for v in r.value_of_information.values())
    assert r.explanation[0].label == "intent: card_payment_not_recognised"


def test_banking_freezes_when_someone_else_did(banking) -> None:
    r = _banking_decide(banking, {"q_someone_else": "yes"})
    assert r.chosen == "freeze_card", sorted(r.expected_utility.items(), key=lambda kv: -kv[1])[:5]
    assert r.kind == "action"
    assert r.posterior["card_at_risk"]["yes"] > 0.5


def test_banking_answers_when_nobody_else_did(banking) -> None:
    r = _banking_decide(banking, {"q_someone_else": "no"})
    assert r.chosen == "answer:card_payment_not_recognised", sorted(r.expected_utility.items(), key=lambda kv: -kv[1])[:5]
    assert (r.kind, r.target) == ("answer", "card_payment_not_recognised")


def test_virtual_question_voi_equals_enumerating_its_answers() -> None:
    """The disambiguation question's VOI, computed in one pass, equals Σ_a P(a) max EU(· | a) - max EU."""
    from coact.graphs.policy.decide import expected_utilities
    from coact.graphs.policy.dialogue import disambiguation_question
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.policy import Policy

    pack = load_pack("banking")
    policy = Policy(pack)
    states = policy.net.states[pack.intent_variable]
    lam = np.full(len(states), 0.02)
    for name, x in {"pending_top_up": 1.0, "top_up_failed": 0.9, "top_up_reverted": 0.7}.items():
        lam[states.index(name)] = x
    soft = [SoftEvidence(pack.intent_variable, lam, "intent")]
    goal = policy.net.marginals([pack.intent_variable], {}, soft)[pack.intent_variable]
    vq = disambiguation_question(pack, goal)
    assert vq is not None and len(vq.answers) >= 3
    result = decide(policy.net, policy.actions, policy.questions, {}, soft, virtual=[vq], explain=False)
    base = max(expected_utilities(policy.net, policy.actions, {}, soft).values())
    informed = 0.0
    for row in vq.likelihood:
        p_answer = float(goal @ row)
        eu = expected_utilities(policy.net, policy.actions, {}, [*soft, SoftEvidence(pack.intent_variable, row, "a")])
        informed += p_answer * max(eu.values())
    assert result.value_of_information[vq.name] == pytest.approx(informed - base, abs=1e-9)
    assert result.value_of_information[vq.name] > 0
