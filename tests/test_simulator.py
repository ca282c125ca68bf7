"""Dialogue simulator, the Rasa-style baseline, over-asking and the policy-tuning job.

Fast: the utterance bank is built once and cached; a synthetic bank (no model) serves the unit tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from coact.cluster.bank import bank_cache_path, build_bank
from coact.graphs.policy.baselines import AMBIGUITY_THRESHOLD, FALLBACK_THRESHOLD, RasaAgent, falls_back
from coact.graphs.policy.dialogue import close_or_continue, plan_turn, read_state
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import IntentResult, ScoredLabel, SessionState
from coact.graphs.policy.policy import Policy
from coact.graphs.policy.simulator import (
    ACT_NAMES,
    GOAL_KINDS,
    USER_KINDS,
    Message,
    OracleAgent,
    PolicyAgent,
    Reply,
    SimulationResult,
    Simulator,
    UtteranceBank,
    paired_difference,
    with_finding_weight,
)

pytestmark = pytest.mark.models

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACK = load_pack("banking")
GOALS = [i.name for i in PACK.intents] + [PACK.out_of_scope_label]
FINDINGS = [f.name for f in PACK.findings]


def synthetic_bank(p: float = 0.9, per_goal: int = 2, findings: dict[int, dict[str, float]] | None = None,
                   second: dict[int, tuple[str, float]] | None = None) -> UtteranceBank:
    """A bank without any model: ``per_goal`` texts per goal, each with ``p`` on its goal (or, for rows in
    ``second``, on another label), findings at 0.02 unless ``findings`` says otherwise."""
    rows = [(g, k) for g in range(len(GOALS)) for k in range(per_goal)]
    C = len(GOALS)
    probs = np.full((len(rows), C), (1 - p) / (C - 1), dtype=np.float32)
    fprobs = np.full((len(rows), len(FINDINGS)), 0.02, dtype=np.float32)
    for i, (g, _) in enumerate(rows):
        label, q = (second or {}).get(i, (GOALS[g], p))
        probs[i] = (1 - q) / (C - 1)
        probs[i, GOALS.index(label)] = q
        for name, value in (findings or {}).get(i, {}).items():
            fprobs[i, FINDINGS.index(name)] = value
    n = len(rows)
    return UtteranceBank(
        goal_states=list(GOALS), texts=np.array([f"text {g} {k}" for g, k in rows]),
        goal=np.array([g for g, _ in rows]), source=np.array(["banking77/test"] * n),
        intent_labels=list(GOALS), intent_probs=probs, class_prior=np.full(C, 1 / C),
        finding_names=list(FINDINGS), finding_probs=fprobs, finding_prior=np.full(len(FINDINGS), 0.5),
        acts=np.zeros((n, len(ACT_NAMES))), content=np.ones(n), part_texts=np.array([], dtype=str),
        part_of=np.array([], dtype=np.int64), part_probs=np.zeros((0, C)),
        title_names=[i.name for i in PACK.intents], title_probs=np.full((len(PACK.intents), C), 1 / C),
        meta={"out_of_scope_label": PACK.out_of_scope_label},
    )


@pytest.fixture(scope="module")
def models(models_dir: Path) -> Path:
    return models_dir  # conftest: cluster.prepare.ensure_models()


@pytest.fixture(scope="module")
def bank(models: Path) -> UtteranceBank:
    return build_bank(models, PACK)  # cached under <models>/cache after the first build


@pytest.fixture(scope="module")
def sim(bank: UtteranceBank) -> Simulator:
    return Simulator(PACK, bank)


def same(a: SimulationResult, b: SimulationResult) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in SimulationResult.__dataclass_fields__)


# ------------------------------------------------------------------------------------ the bank
def test_bank_is_cached_and_held_out(models: Path, bank: UtteranceBank) -> None:
    path = bank_cache_path(models, PACK)
    assert path.is_file()
    again = UtteranceBank.load(path)
    assert np.array_equal(again.intent_probs, bank.intent_probs) and list(again.texts) == list(bank.texts)
    assert np.array_equal(again.acts, bank.acts) and np.array_equal(again.part_of, bank.part_of)
    assert set(bank.source) == {"banking77/test", "clinc150/oos_test"}
    counts = bank.counts()
    assert set(counts) == set(bank.goal_states) and min(counts.values()) > 0
    assert bank.intent_probs.shape == (len(bank), len(bank.intent_labels))
    assert bank.finding_probs.shape == (len(bank), len(bank.finding_names))
    assert bank.acts.shape == (len(bank), len(ACT_NAMES)) and bank.content.shape == (len(bank),)
    assert len(bank.part_texts) > 0 and bank.title_probs.shape[0] == len(PACK.intents)
    # The prior on the wire is the one the Reasoner sends (the heads' effective prior).
    from coact.actors.models import FindingHeads

    assert np.allclose(bank.finding_prior, FindingHeads(models / "findings").effective_prior)
    tune_half, eval_half = bank.split(0.5, seed=0)
    assert len(tune_half) + len(eval_half) == len(bank)
    assert len(tune_half.part_texts) + len(eval_half.part_texts) == len(bank.part_texts)
    duplicates = len(bank) - len(set(bank.texts))  # a few texts occur twice in the data sets
    assert len(set(tune_half.texts) & set(eval_half.texts)) <= duplicates
    assert min(tune_half.counts().values()) > 0 and min(eval_half.counts().values()) > 0


def test_messages_are_the_wire_objects(bank: UtteranceBank) -> None:
    i = int(bank.part_of[0])
    intent = bank.intent_result(i)
    assert intent.labels == bank.intent_labels and np.isclose(sum(intent.probs), 1.0, atol=1e-4)
    assert set(intent.acts) == set(ACT_NAMES) and intent.top[0].label == bank.top_intent()[i]
    assert len(bank.part_results(i)) >= 2  # the ingress would classify its parts too
    found = bank.reasoner_result(i)
    assert set(found.findings) == set(bank.finding_names) and set(found.finding_prior) == set(bank.finding_names)
    neutral = bank.reasoner_result(None)
    assert neutral.findings == {n: round(p, 6) for n, p in neutral.finding_prior.items()}


# ------------------------------------------------------------------------------------ users
def test_reproducible_for_a_fixed_seed(sim: Simulator) -> None:
    u1, u2 = sim.users(150, seed=7), sim.users(150, seed=7)
    assert all(np.array_equal(u1.codes[v], u2.codes[v]) for v in u1.codes)
    assert np.array_equal(u1.utterances, u2.utterances) and np.array_equal(u1.user_kind, u2.user_kind)
    assert np.array_equal(u1.draws, u2.draws)
    r1 = sim.run(PolicyAgent(PACK), n=150, seed=7)
    r2 = sim.run(PolicyAgent(PACK), n=150, seed=7)
    assert same(r1, r2)
    other = sim.users(150, seed=8)
    assert not np.array_equal(u1.utterances, other.utterances)
    assert not np.array_equal(sim.users(150, seed=7, stream="x").utterances, u1.utterances)


def test_user_kinds(sim: Simulator, bank: UtteranceBank) -> None:
    users = sim.users(3000, seed=11)
    shares = {k: float(np.mean(users.user_kind == k)) for k in USER_KINDS}
    assert set(users.user_kind) == set(USER_KINDS)
    # wants_human comes from the network (P = 0.15 * 0.5 + 0.85 * 0.03 = 0.10); the rest from the mix.
    yes = sim.net.state_index("wants_human", "yes")
    assert np.array_equal(users.user_kind == "wants_human", users.codes["wants_human"] == yes)
    assert 0.07 < shares["wants_human"] < 0.13 and 0.4 < shares["plain"] < 0.55
    g = PACK.intent_variable
    group = {i.name: i.group for i in PACK.intents}
    states = sim.goal_states
    for u in np.flatnonzero(users.user_kind == "follow_up")[:200]:
        a, b = states[users.codes[g][u]], states[users.codes2[g][u]]
        assert a != b and group[a] == group[b]
        assert users.codes2["upset"][u] == users.codes["upset"][u]
        assert bank.goal[users.utterances2[u, 0]] == users.codes2[g][u]
    top = bank.top_intent()
    correctors = np.flatnonzero(users.user_kind == "corrector")
    assert len(correctors) and all(bank.goal[users.first[u]] == users.codes[g][u] for u in correctors)
    # Misread texts where the goal has any (else its least confident text).
    assert np.mean([top[users.first[u]] != states[users.codes[g][u]] for u in correctors]) > 0.7
    asked = users.codes["asked_for_human"] == sim.net.state_index("asked_for_human", "yes")
    assert np.array_equal(users.request > 0, (users.user_kind == "wants_human") & asked)


def test_stratum_users_are_the_conditional_distribution(sim: Simulator) -> None:
    natural = sim.users(6000, seed=3, stream="s")
    risk = sim.users(400, seed=3, stream="s", kind="at_risk")
    assert len(risk) == 400 and set(risk.kind) == {"at_risk"}
    again = sim.users(400, seed=3, stream="s", kind="at_risk")
    assert all(np.array_equal(risk.codes[v], again.codes[v]) for v in risk.codes)
    g = PACK.intent_variable
    for users in (natural, risk):
        states = sim.net.states[g]
        goals = [states[c] for c, k in zip(users.codes[g], users.kind, strict=True) if k == "at_risk"]
        share = np.mean([x in ("lost_or_stolen_card", "compromised_card") for x in goals])
        assert 0.45 < share < 0.9, share
    with pytest.raises(ValueError, match="unknown goal kind"):
        sim.users(5, seed=0, kind="nobody")


def test_sampled_codes_follow_the_network(sim: Simulator) -> None:
    from coact.graphs.policy.bayesnet import sample
    from coact.graphs.policy.simulator import seeded_rng

    codes = sim.sample_codes(seeded_rng(0, "x"), 50)
    joint = sample(sim.net, seeded_rng(0, "x"), 50)
    assert all(sim.net.states[v][codes[v][i]] == row[v] for i, row in enumerate(joint) for v in sim.net.variables)


# ------------------------------------------------------------------------------------ one implementation
class Recording(PolicyAgent):
    """The policy agent, recording every message and reply of the conversation."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[tuple[Message, Reply]] = []

    def turn(self, session, message):
        reply = super().turn(session, message)
        self.log.append((message, reply))
        return reply


def test_conversations_run_the_served_turn_logic(sim: Simulator) -> None:
    """Replaying the simulated messages through plan_turn / Policy.decide / close_or_continue gives the same
    decisions: the simulator is the served code on precomputed classifier outputs."""
    users = sim.users(120, seed=4)
    policy = Policy(PACK)
    kinds_seen: set[str] = set()
    for u in range(len(users)):
        agent = Recording(PACK)
        sim.converse(agent, users, u)
        session = SessionState(session_id="replay")
        for message, reply in agent.log:
            plan = plan_turn(session, message.text, message.intent, message.reasoner, PACK, list(message.parts))
            decision = None if plan.reply is not None else policy.decide(plan.evidence, explain=False)
            close_or_continue(session, plan, decision, PACK)
            session.turns += 1
            assert (reply.kind, reply.action) == ((decision.kind, decision.action) if decision
                                                  else ("chitchat", plan.reply_name or "chitchat"))
            kinds_seen.add(reply.kind)
    assert {"ask", "answer"} <= kinds_seen
    # The decision cache changes nothing.
    assert same(sim.run(PolicyAgent(PACK, cache=False), users=users), sim.run(PolicyAgent(PACK), users=users))


def test_scripted_answers_give_the_sampled_state(sim: Simulator) -> None:
    users = sim.users(200, seed=9)
    q = PACK.question("q_payment_pending")
    styles = set()
    for u in range(40):
        for j in range(3):
            msg = sim.answer_message(users, u, 0, Reply("ask", "ask:q_payment_pending", q.variable), j, False,
                                     lambda: 0)
            state = sim.net.states[q.variable][users.codes[q.variable][u]]
            assert read_state(q, msg.intent) == state
            styles.add(msg.intent.answer is not None and msg.intent.answer.state is not None)
    assert styles == {True, False}  # in words and as a yes/no act
    unsure = sim.answer_message(users, 0, 0, Reply("ask", "ask:q_payment_pending", q.variable), 0, True, lambda: 0)
    assert unsure.intent.acts["unsure"] == 1.0 and unsure.intent.content == 0.0
    plan = plan_turn(SessionState(session_id="s", pending_question=q.variable), unsure.text, unsure.intent,
                     unsure.reasoner, PACK)
    assert plan.answered == f"{q.variable}=unsure"


def test_oracle_is_perfect(sim: Simulator) -> None:
    r = sim.run(OracleAgent(), n=400, seed=1)
    s = r.summary()
    assert s["success"] == 1.0 and s["regret"] == 0.0 and s["timeout_rate"] == 0.0
    assert np.all(r.regret == 0.0)
    assert s["mean_turns"] == 1.0 + np.mean(r.user_kind == "follow_up")
    # Under the default utilities: freeze an at-risk card, decline out of scope (hand an upset customer over),
    # otherwise answer the goal; hand over a user who wants a person (unless the card needs freezing first).
    calm = r.user_kind != "wants_human"
    upset = np.array([sim.net.states["upset"][c] == "yes" for c in sim.users(400, seed=1).codes["upset"]])
    assert set(r.oracle_action[(r.kind == "at_risk") & calm]) == {"freeze_card"}
    assert set(r.oracle_action[(r.kind == "out_of_scope") & calm & ~upset]) == {"decline"}
    assert set(r.oracle_action[(r.kind == "out_of_scope") & upset]) <= {"escalate"}
    faq = (r.kind == "faq") & calm
    assert all(a == f"answer:{g}" for a, g in zip(r.oracle_action[faq], r.goal[faq], strict=True))
    assert np.mean(r.oracle_action[~calm] == "escalate") > 0.8


def test_huge_question_cost_never_asks(sim: Simulator) -> None:
    users = sim.users(300, seed=2)
    never = sim.run(PolicyAgent(PACK, {"question_cost": 1e6}), users=users)
    assert never.questions.sum() == 0
    free = sim.run(PolicyAgent(PACK, {"question_cost": 0.0}), users=users)
    assert free.questions.sum() > 0  # the comparison is not vacuous: questions do get asked when free


def test_default_policy_well_above_chance(sim: Simulator) -> None:
    r = sim.run(PolicyAgent(PACK), n=400, seed=3)
    s = r.report()
    assert s["success"] > 0.75  # chance is about 1/80 goal states
    assert 1.0 <= s["mean_turns"] <= sim.max_turns
    assert np.all(r.regret >= -1e-9) and s["regret"] > 0
    assert set(s["by_kind"]) == set(GOAL_KINDS) and sum(k["n"] for k in s["by_kind"].values()) == 400
    assert set(s["by_user_kind"]) == set(USER_KINDS)
    assert sum(k["n"] for k in s["by_user_kind"].values()) == 400
    # One-case users: success means "the oracle's action" (the optimum is unique under the banking pack).
    one = r.user_kind != "follow_up"
    assert np.array_equal(r.success[one], (r.action == r.oracle_action)[one])
    two = ~one
    assert np.array_equal(r.success[two], ((r.action == r.oracle_action) & (r.action2 == r.oracle_action2))[two])
    assert np.all(r.corrections[r.user_kind != "corrector"] == 0)
    assert np.array_equal(r.escalated, (r.action == "escalate") | (r.action2 == "escalate"))
    assert paired_difference(r, r)["mean"] == 0.0


def test_paired_difference_per_kind(sim: Simulator) -> None:
    users = sim.users(300, seed=5)
    a = sim.run(PolicyAgent(PACK), users=users)
    b = sim.run(OracleAgent(), users=users)
    for kind in GOAL_KINDS:
        d = paired_difference(a, b, "success", kind=kind)
        mask = a.kind == kind
        assert d["n"] == mask.sum()
        assert np.isclose(d["mean"], 1.0 - a.success[mask].mean())
    d = paired_difference(a, b, "success", user_kind="corrector")
    assert d["n"] == int((a.user_kind == "corrector").sum())
    head = a.take(slice(0, 100))
    assert len(head) == 100 and np.array_equal(head.success, a.success[:100])


# ------------------------------------------------------------------------------------ Rasa-style baseline
def intent(dist: dict[str, float], content: float = 1.0, **acts: float) -> IntentResult:
    rest = (1 - sum(dist.values())) / (len(GOALS) - len(dist))
    probs = [dist.get(g, rest) for g in GOALS]
    top = sorted(zip(GOALS, probs, strict=True), key=lambda kv: -kv[1])[:5]
    return IntentResult(top=[ScoredLabel(label=k, p=v) for k, v in top], probs=probs, labels=GOALS,
                        class_prior=[1 / len(GOALS)] * len(GOALS), model_version="t",
                        acts={a: acts.get(a, 0.0) for a in ACT_NAMES}, content=content)


def say(agent: RasaAgent, state, result: IntentResult) -> Reply:
    from coact.graphs.policy.messages import ReasonerResult

    return agent.turn(state, Message("…", result, ReasonerResult(findings={}, finding_prior={}, passages=[],
                                                                     model_version="t")))


def test_rasa_fallback_semantics() -> None:
    assert FALLBACK_THRESHOLD == 0.3 and AMBIGUITY_THRESHOLD == 0.1  # Rasa's FallbackClassifier defaults
    assert falls_back(intent({"card_arrival": 0.29}).top)
    assert falls_back(intent({"card_arrival": 0.45, "card_delivery_estimate": 0.36}).top)  # ambiguous
    assert not falls_back(intent({"card_arrival": 0.45, "card_delivery_estimate": 0.34}).top)
    rasa = RasaAgent(PACK)
    yes, no = intent({}, content=0.0, affirm=1.0), intent({}, content=0.0, deny=1.0)
    # Confident: answered directly, rules for out of scope and a lost card.
    assert say(rasa, rasa.start(), intent({"card_arrival": 0.8})) == Reply("answer", "answer:card_arrival",
                                                                           "card_arrival")
    assert say(rasa, rasa.start(), intent({"out_of_scope": 0.8})).kind == "decline"
    assert say(rasa, rasa.start(), intent({"compromised_card": 0.8})).action == "freeze_card"
    assert say(rasa, rasa.start(), intent({"card_arrival": 0.8}, request_human=1.0)).kind == "escalate"
    assert say(rasa, rasa.start(), intent({}, content=0.0, greeting=1.0)).kind == "chitchat"
    # Two-stage fallback: confirm -> affirm answers it.
    st = rasa.start()
    r = say(rasa, st, intent({"card_arrival": 0.25}))
    assert (r.kind, r.target, r.options) == ("ask", "confirm", ("card_arrival",))
    assert say(rasa, st, yes).action == "answer:card_arrival"
    # confirm -> deny -> rephrase; a confident rephrase is answered.
    st = rasa.start()
    say(rasa, st, intent({"card_arrival": 0.25}))
    assert say(rasa, st, no).target == "rephrase"
    assert say(rasa, st, intent({"card_delivery_estimate": 0.7})).action == "answer:card_delivery_estimate"
    # confirm -> deny -> rephrase still unclear -> confirm again -> deny: handed over.
    st = rasa.start()
    say(rasa, st, intent({"card_arrival": 0.25}))
    say(rasa, st, no)
    assert say(rasa, st, intent({"card_linking": 0.2})).options == ("card_linking",)
    assert say(rasa, st, no).kind == "escalate"
    # "not sure" to a confirmation is not an affirm: rephrase.
    st = rasa.start()
    say(rasa, st, intent({"card_arrival": 0.25}))
    assert say(rasa, st, intent({}, content=0.0, unsure=1.0)).target == "rephrase"


def test_rasa_runs_on_the_same_users(sim: Simulator) -> None:
    users = sim.users(300, seed=6)
    rasa = sim.run(RasaAgent(PACK), users=users)
    voi = sim.run(PolicyAgent(PACK), users=users)
    assert np.array_equal(rasa.kind, voi.kind) and np.array_equal(rasa.user_kind, voi.user_kind)
    assert rasa.summary()["success"] > 0.6
    handed = (rasa.user_kind == "wants_human") & (users.request > 0)
    assert np.all(rasa.action[handed] == "escalate")  # the rule a Rasa project writes


# ------------------------------------------------------------------------------------ over-asking
def test_over_asking_on_a_tiny_bank() -> None:
    from coact.cluster.jobs.over_asking import confident_rows, format_report, over_asking

    unauthorised = {i: {"f_unauthorised": 0.99, "f_urgent": 0.9} for i in range(0, 6)}
    bank = synthetic_bank(p=0.9, per_goal=2, findings=unauthorised, second={1: ("card_linking", 0.9)})
    rows = confident_rows(bank, 0.8)
    assert 1 not in rows and len(rows) == len(bank) - 1  # row 1's top intent is wrong
    result = over_asking(PACK, bank, rows=rows)
    sim, agent = Simulator(PACK, bank), PolicyAgent(PACK)
    kinds = [agent.turn(agent.start(), sim.goal_message(i)).kind for i in rows]
    over = sum(k in ("ask", "escalate") for k in kinds)
    assert result["n"] == len(rows) and result["over_asked"] == over
    assert np.isclose(result["over_asking"], over / len(rows))
    assert sum(info["count"] for info in result["top_intents"].values()) == over
    assert "over-asking" in format_report(result)
    # finding_weight only tempers goal-dependent findings: at 0 they carry no evidence at all.
    result0 = over_asking(with_finding_weight(PACK, 0.0), bank, rows=rows)
    assert result0["finding_weight"] == 0.0 and result0["n"] == result["n"]


# ------------------------------------------------------------------------------------ jobs
def test_compare_policies_tables(sim: Simulator, bank: UtteranceBank) -> None:
    from coact.cluster.jobs.compare_policies import markdown_tables, run_agents

    runs = run_agents(PACK, bank, {"question_cost": 2.0}, dialogues=120, risk_dialogues=30, seed=1)
    assert set(runs) == {"voi", "tuned", "rasa", "oracle"}
    assert np.array_equal(runs["voi"].natural.kind, runs["rasa"].natural.kind)
    table = markdown_tables(runs)
    assert "| oracle | 120 | 1.000 |" in table and "| corrector |" in table and "| at_risk |" in table


@pytest.mark.cluster  # Ray Tune starts a Ray of its own
def test_smoke_tune_writes_artefacts(tmp_path: Path, models: Path) -> None:
    import ray

    from coact.cluster.jobs.tune_policy import main

    was_running = ray.is_initialized()
    out = tmp_path / "tune"
    assert main(["--smoke", "--num-samples", "2", "--dialogues", "30", "--eval-dialogues", "60",
                 "--output", str(out), "--models-dir", str(models), "--verbose", "0", "--seed", "0"]) == 0
    assert ray.is_initialized() == was_running  # a cluster we found stays up; one we started is gone
    import pandas as pd

    trials = pd.read_csv(out / "results.csv")
    assert len(trials) == 2 and {"objective", "success", "mean_turns", "w_question_cost"} <= set(trials.columns)
    per_kind = {f"{k}_{c}" for k in GOAL_KINDS
                for c in ("n", "success", "regret", "success_diff", "success_diff_se", "regret_diff", "regret_diff_se")}
    assert per_kind | {"qualifies", "rejected_because", "needless_escalation_rate"} <= set(trials.columns)
    # Trial 0 is the pack's default weights.
    assert trials.loc[0, "w_question_cost"] == PACK.utilities.weights["question_cost"]
    best = json.loads((out / "best_weights.json").read_text())
    assert set(PACK.utilities.weights) <= set(best["weights"])
    comparison = json.loads((out / "comparison.json").read_text())
    reports = comparison["reports"]
    assert set(reports) == {"default", "tuned", "oracle"}
    assert reports["oracle"]["success"] == 1.0 and reports["oracle"]["regret"] == 0.0
    assert reports["default"]["n"] == 60 and isinstance(comparison["target_met"], bool)
    assert set(reports["default"]["by_user_kind"]) == set(USER_KINDS)
    assert set(comparison["target_checks"]) == {"overall", "at_risk", "out_of_scope"}
    assert {"at_risk_success", "out_of_scope_success", "faq_success"} <= set(comparison["paired_tuned_minus_default"])
    # The defaults paired with themselves on the tuning users: no difference, no shortfall, not selectable.
    assert trials.loc[0, "success_diff"] == 0.0 and not trials.loc[0, "qualifies"]
    if comparison["selected_trial"] is None and comparison["closest_trial"] is not None:
        assert comparison["closest_trial"]["held_out_report"]["n"] == 60  # the nearest miss, evaluated not shipped


def _trial(trial: int, objective: float, success: float, turns: float, at_risk: float, oos: float,
           at_risk_se: float = 0.0, oos_se: float = 0.0, status: str = "completed", at_risk_regret: float = 3.44,
           at_risk_regret_se: float = 0.0) -> dict:
    return {"trial": trial, "status": status, "objective": objective, "success": success, "mean_turns": turns,
            "at_risk_n": 75, "at_risk_success": at_risk, "at_risk_success_diff_se": at_risk_se,
            "at_risk_regret": at_risk_regret, "at_risk_regret_diff_se": at_risk_regret_se,
            "out_of_scope_n": 120, "out_of_scope_success": oos, "out_of_scope_success_diff_se": oos_se,
            "out_of_scope_regret": 0.91, "out_of_scope_regret_diff_se": 0.0}


def test_selection_protects_at_risk_and_out_of_scope_success() -> None:
    from coact.cluster.jobs.tune_policy import (
        SEARCH_SPACE,
        TOLERANCE_SE,
        best_row,
        closest_row,
        objective,
        rejection_reasons,
    )

    reference = _trial(0, 0.77, 0.897, 1.068, 0.70, 0.93)
    rows = [
        reference,
        # More success, fewer turns, but fewer at-risk cards frozen (a pure loss: 6 of 75 at-risk users lost).
        _trial(1, 0.81, 0.915, 1.060, 0.62, 0.95, at_risk_se=0.032),
        _trial(2, 0.80, 0.910, 1.060, 0.70, 0.92, oos_se=0.009),  # loses one out-of-scope user, no gain
        _trial(3, 0.79, 0.905, 1.070, 0.72, 0.95),  # more turns
        _trial(4, 0.85, 0.930, 1.050, 0.75, 0.96, status="stopped_early"),  # best numbers, not completed
        # Same at-risk success, but two at-risk users once handed over to a human now get an FAQ answer.
        _trial(5, 0.795, 0.906, 1.047, 0.70, 0.93, at_risk_regret=3.44 + 0.2, at_risk_regret_se=0.14),
        # A net loss of one at-risk user inside the noise of a trade (e.g. 4 gained, 5 lost: se ~ 0.04).
        _trial(6, 0.785, 0.903, 1.066, 0.70 - 1 / 75, 0.93, at_risk_se=0.04),
        _trial(7, 0.78, 0.901, 1.068, 0.71, 0.94),  # qualifies, lower objective than trial 6
    ]
    assert rejection_reasons(reference, reference)  # the defaults never beat themselves
    assert any("at_risk" in r for r in rejection_reasons(rows[1], reference))
    assert any("out_of_scope" in r for r in rejection_reasons(rows[2], reference))
    assert any("turns" in r for r in rejection_reasons(rows[3], reference))
    assert rejection_reasons(rows[4], reference) == ["not completed (stopped_early)"]
    assert any("at_risk regret" in r for r in rejection_reasons(rows[5], reference))
    assert 1 / 75 <= TOLERANCE_SE * 0.04 and rejection_reasons(rows[6], reference) == []
    assert best_row(rows, reference)["trial"] == 6
    assert best_row(rows)["trial"] == 1  # without the bars: the highest completed objective
    assert best_row(rows[:5], reference) is None  # nothing qualifies: the job keeps the defaults
    # A success gain inside the noise (here a third of a paired SE) is not a gain.
    noisy = {**rows[6], "success_diff": 0.001, "success_diff_se": 0.003}
    assert any("within" in r for r in rejection_reasons(noisy, reference))
    assert rejection_reasons({**noisy, "success_diff": 0.006}, reference) == []
    weights = {k: 0.0 for k in SEARCH_SPACE}
    for r in rows:
        r.update({f"w_{k}": v for k, v in weights.items()}, w_question_cost=2.0 if r["trial"] else 0.0)
    assert closest_row(rows[:5], reference, weights)["trial"] == 1  # one bar failed, highest objective
    d = np.zeros(75)
    d[:1] = -1.0
    assert -d.mean() > TOLERANCE_SE * d.std(ddof=1) / np.sqrt(len(d))
    base = {"success": 0.9, "mean_turns": 1.0, "escalation_rate": 0.0}
    assert objective(base) == objective({**base, "at_risk_success_diff": 0.05})
    assert objective({**base, "at_risk_success_diff": -0.08}) < objective(base) - 0.07
    assert objective({**base, "out_of_scope_success_diff": -0.08}) < objective(base) - 0.03
    regret_up = {**base, "at_risk_regret_diff": 0.4, "at_risk_oracle_utility": 14.0}
    assert np.isclose(objective(regret_up), objective(base) - 0.4 / 14)
    assert objective({**regret_up, "at_risk_regret_diff": -0.4}) == objective(base)
    # Only hand-overs the oracle would not make are charged.
    assert objective({**base, "escalation_rate": 0.1, "needless_escalation_rate": 0.0}) == objective(base)


def test_trial_metrics_pool_the_stratum_per_kind_only(sim: Simulator) -> None:
    from coact.cluster.jobs.tune_policy import Runs, trial_metrics

    agent = PolicyAgent(PACK)
    runs = Runs(sim.run(agent, n=300, seed=1), sim.run(agent, n=100, seed=1, kind="at_risk"))
    m = trial_metrics(runs, runs)
    natural = runs.natural.summary()
    assert m["success"] == natural["success"] and m["mean_turns"] == natural["mean_turns"]
    assert m["at_risk_n"] == int((runs.natural.kind == "at_risk").sum()) + 100
    assert m["faq_n"] == int((runs.natural.kind == "faq").sum())
    assert m["at_risk_success_diff"] == 0.0 and m["success_diff"] == 0.0
    head = runs.take(150, 40)
    assert len(head.natural) == 150 and len(head.stratum) == 40
