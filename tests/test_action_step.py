"""The action step without Ray: confirmation VOI (against enumeration), declined and failed actions off the table,
the executor against the real reference action server (retries, refusals, timeouts, no server), Python executors,
the audit log, and the guard's rule that only confirmed actions may be claimed."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from coact.actors.audit_log import AuditLog
from coact.actors.config import ActionsConfig
from coact.actors.executor import ActionExecutor
from coact.actors.guard import check_opener
from coact.cluster.action_server.process import ActionServerProcess, start_action_server
from coact.cluster.runtime import free_port
from coact.graphs.policy.actions import action_call, idempotency_key, result_text
from coact.graphs.policy.bayesnet import SoftEvidence
from coact.graphs.policy.decide import decide, expected_utilities
from coact.graphs.policy.dialogue import CONFIRM_PREFIX, close_or_continue, confirmation_questions, plan_turn
from coact.graphs.policy.domain import DomainPackError, load_pack, parse_pack, resolve_pack_path
from coact.graphs.policy.messages import (
    ActionCall,
    ActionOutcome,
    SessionEvidence,
    SessionState,
    SoftEvidenceItem,
)
from coact.graphs.policy.policy import Policy
from tests.test_dialogue import act, decision, reasoner

pytestmark = pytest.mark.unit

PACK = load_pack("banking")
POLICY = Policy(PACK)
CONFIRM = CONFIRM_PREFIX + "freeze_card"
_turns = itertools.count(1)


def risk_evidence(p_risk: float, goal: str = "compromised_card") -> SessionEvidence:
    """A case read as `goal` whose finding evidence says the card is at risk with odds p : 1 - p."""
    goals = POLICY.net.states[PACK.intent_variable]
    return SessionEvidence(soft=[
        SoftEvidenceItem(variable=PACK.intent_variable, label="intent", likelihood={g: 1.0 if g == goal else 0.03
                                                                                   for g in goals}),
        SoftEvidenceItem(variable="card_at_risk", label="risk", likelihood={"yes": p_risk, "no": 1 - p_risk})])


# --------------------------------------------------------------------------- confirmation by VOI

def test_confirmation_voi_equals_enumerating_its_answers_under_consent() -> None:
    """A yes means that action, a no means any other: the VOI computed in one pass equals the enumeration."""
    ev = risk_evidence(0.3)
    soft = POLICY.soft(ev)
    (vq,) = confirmation_questions(PACK, [a.name for a in POLICY.actions], ev)
    result = decide(POLICY.net, POLICY.actions, POLICY.questions, {}, soft, virtual=[vq], explain=False)
    base = max(expected_utilities(POLICY.net, POLICY.actions, {}, soft).values())
    p_risk = POLICY.net.marginals(["card_at_risk"], {}, soft)["card_at_risk"]
    informed = 0.0
    for row, excluded in zip(vq.likelihood, vq.excludes, strict=True):
        eu = expected_utilities(POLICY.net, POLICY.actions, {}, [*soft, SoftEvidence("card_at_risk", row, "a")])
        informed += float(p_risk @ row) * max(v for k, v in eu.items() if k not in excluded)
    assert vq.excludes[1] == ("freeze_card",)
    assert set(vq.excludes[0]) == {a.name for a in POLICY.actions} - {"freeze_card"}
    assert result.value_of_information[CONFIRM] == pytest.approx(max(informed - base, 0.0), abs=1e-9)


def test_confirmation_is_worth_asking_only_where_the_risk_is_uncertain() -> None:
    def voi(p: float) -> float:
        return POLICY.decide(risk_evidence(p), explain=False).value_of_information[CONFIRM]

    # Near-certain either way, no answer changes the action; in between, asking first can pay.
    assert voi(0.02) == voi(0.999) == 0.0
    assert voi(0.7) > 0.0
    assert POLICY.decide(risk_evidence(0.999), explain=False).action == "freeze_card"
    # Once the question about someone else is spent (answered "not sure"), the confirmation is the best option.
    ev = risk_evidence(0.7)
    ev.asked.append("q_someone_else")
    ev.unsure.append("q_someone_else")
    assert POLICY.decide(ev, explain=False).action == f"ask:{CONFIRM}"


def test_declined_confirmation_excludes_the_action_and_reads_as_evidence() -> None:
    session = SessionState(session_id="s", turns=1, pending_question=CONFIRM, evidence=risk_evidence(0.9))
    session.evidence.asked.append(CONFIRM)
    plan = plan_turn(session, "no", act(deny=0.97), reasoner(), PACK)
    assert plan.answered == f"{CONFIRM}=no"
    assert plan.evidence.unavailable == ["freeze_card"]
    d = POLICY.decide(plan.evidence, explain=False)
    assert d.action != "freeze_card" and "freeze_card" not in d.expected_utility
    before = POLICY.decide(session.evidence, explain=False).posterior["card_at_risk"]["yes"]
    assert d.posterior["card_at_risk"]["yes"] < before  # a customer who declines is less likely at risk


def test_agreed_confirmation_leads_to_the_action() -> None:
    session = SessionState(session_id="s", turns=1, pending_question=CONFIRM, evidence=risk_evidence(0.6))
    session.evidence.asked.append(CONFIRM)
    plan = plan_turn(session, "yes please", act(affirm=0.97), reasoner(), PACK)
    assert plan.answered == f"{CONFIRM}=yes" and not plan.evidence.unavailable
    assert POLICY.decide(plan.evidence, explain=False).action == "freeze_card"


def test_failed_action_is_off_the_table_and_the_policy_hands_over() -> None:
    ev = risk_evidence(0.999)
    assert POLICY.decide(ev, explain=False).action == "freeze_card"
    ev.unavailable.append("freeze_card")
    assert POLICY.decide(ev, explain=False).action == "escalate"


# --------------------------------------------------------------------------- the pack

def test_pack_names_a_bad_executor_and_confirmation() -> None:
    text = resolve_pack_path("banking").read_text()
    with pytest.raises(DomainPackError, match=r"actions\.freeze_card\.executor.*exactly one"):
        parse_pack(text.replace("executor: {webhook: bank}", "executor: {}", 1))
    with pytest.raises(DomainPackError, match=r"actions\.freeze_card\.confirm\.affirm"):
        parse_pack(text.replace('affirm: {"yes": 0.95, "no": 0.5}', 'affirm: {"yes": 0.95}', 1))
    with pytest.raises(DomainPackError, match="failed_reply"):
        parse_pack(text.replace("    failed_reply: \"I couldn't freeze your card just now.\"\n", "", 1))


def test_reply_follows_the_result() -> None:
    def out(status: str, **kw) -> ActionOutcome:
        return ActionOutcome(status=status, **kw)

    assert "F-9" in result_text(PACK, "freeze_card", out("done", reference="F-9"), "K")
    assert "frozen" in result_text(PACK, "freeze_card", out("done"), "K")
    for outcome in (out("failed", reason="timeout"), out("refused", reason="the card is closed")):
        text = result_text(PACK, "freeze_card", outcome, "K")
        assert "couldn't" in text and "have frozen" not in text
    assert "the card is closed" in result_text(PACK, "freeze_card", out("refused", reason="the card is closed."), "K")


def test_idempotency_key_is_per_session_turn_and_action() -> None:
    k = idempotency_key("s1", 3, "freeze_card")
    assert k == idempotency_key("s1", 3, "freeze_card")
    assert len({k, idempotency_key("s1", 4, "freeze_card"), idempotency_key("s2", 3, "freeze_card"),
                idempotency_key("s1", 3, "escalate")}) == 4


# --------------------------------------------------------------------------- the executor, on the real server

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServerProcess]:
    with start_action_server(db_path=tmp_path_factory.mktemp("executor") / "state.sqlite") as srv:
        yield srv


def _call(session_id: str, action: str = "freeze_card") -> ActionCall:
    d = decision(kind="action" if action == "freeze_card" else "escalate", action=action, target=None)
    state = SessionState(session_id=session_id, turns=next(_turns))
    return action_call(PACK, state, d, "someone used my card")


def _executor(url: str, **hook) -> ActionExecutor:
    cfg = ActionsConfig(webhooks={"bank": {"url": url, "timeout_s": 1.0, "attempts": 3, "backoff_s": 0.05, **hook}})
    return ActionExecutor(cfg, PACK)


def _faults(server: ActionServerProcess, **faults) -> None:
    if faults:
        httpx.put(f"{server.url}/v1/admin/faults", json=faults, timeout=5).raise_for_status()
    else:
        httpx.delete(f"{server.url}/v1/admin/faults", timeout=5).raise_for_status()


def test_executor_freezes_once_under_retries_of_the_same_call(server: ActionServerProcess) -> None:
    call = _call("exec-once")
    ex = _executor(server.url)

    async def run():
        return await asyncio.gather(*(ex.execute(call) for _ in range(4)))

    records = asyncio.run(run())
    assert {(r.status, r.reference) for r in records} == {("done", records[0].reference)}
    assert len(httpx.get(f"{server.url}/v1/calls", params={"session_id": "exec-once"}, timeout=5).json()) == 1
    assert httpx.get(f"{server.url}/v1/cards/exec-once", timeout=5).json()["status"] == "frozen"


def test_executor_retries_a_failing_server_then_reports_failed(server: ActionServerProcess) -> None:
    _faults(server, status=503, actions=["freeze_card"])
    try:
        record = asyncio.run(_executor(server.url).execute(_call("exec-503")))
    finally:
        _faults(server)
    assert (record.status, record.attempts) == ("failed", 3)
    assert httpx.get(f"{server.url}/v1/cards/exec-503", timeout=5).status_code == 404  # nothing was frozen


def test_executor_reports_a_slow_server_as_failed(server: ActionServerProcess) -> None:
    _faults(server, delay_s=2.0)
    try:
        record = asyncio.run(_executor(server.url, attempts=1, timeout_s=0.3).execute(_call("exec-slow")))
    finally:
        _faults(server)
    assert record.status == "failed" and "within" in record.reason


def test_executor_refuses_on_a_client_error_without_retrying(server: ActionServerProcess) -> None:
    _faults(server, status=409, actions=["escalate"])
    try:
        record = asyncio.run(_executor(server.url).execute(_call("exec-409", "escalate")))
    finally:
        _faults(server)
    assert (record.status, record.attempts) == ("refused", 1)


def test_executor_without_a_server_fails_cleanly() -> None:
    record = asyncio.run(_executor(f"http://127.0.0.1:{free_port()}").execute(_call("exec-none")))
    assert record.status == "failed" and "reach" in record.reason


def test_executor_config_must_name_the_packs_webhooks() -> None:
    with pytest.raises(ValueError, match=r"actions\.freeze_card\.executor\.webhook: 'bank'"):
        ActionExecutor(ActionsConfig(webhooks={"other": {"url": "http://127.0.0.1:1"}}), PACK)


def _python_pack(entry: str):
    text = resolve_pack_path("banking").read_text().replace("executor: {webhook: bank}",
                                                            f"executor: {{python: \"{entry}\"}}", 1)
    return parse_pack(text)


def freeze_in_memory(call: ActionCall) -> dict:
    return {"status": "done", "reference": f"MEM-{call.turn}"}


def broken_executor(call: ActionCall) -> dict:
    raise RuntimeError("core banking is down")


def test_python_entry_point_executors() -> None:
    ok = ActionExecutor(ActionsConfig(), _python_pack("tests.test_action_step:freeze_in_memory"))
    record = asyncio.run(ok.execute(_call("py-ok")))
    assert record.status == "done" and record.reference.startswith("MEM-")
    broken = ActionExecutor(ActionsConfig(), _python_pack("tests.test_action_step:broken_executor"))
    record = asyncio.run(broken.execute(_call("py-broken")))
    assert record.status == "failed" and "core banking is down" in record.reason


def test_dry_run_calls_nothing() -> None:
    record = asyncio.run(ActionExecutor(ActionsConfig(dry_run=True), PACK).execute(_call("dry")))
    assert (record.status, record.reason, record.attempts) == ("done", "dry run", 0)


# --------------------------------------------------------------------------- audit log

def test_audit_log_is_append_only_per_result_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    call = _call("audit-1").model_dump(mode="json")
    assert log.append(call, {"status": "failed", "reason": "timeout", "attempts": 3})
    assert not log.append(call, {"status": "failed", "reason": "timeout", "attempts": 3})  # a retry: once
    assert log.append(call, {"status": "done", "reference": "F-1"})  # a later success: a second row
    log.append(_call("audit-2").model_dump(mode="json"), {"status": "done"})
    again = AuditLog(path)
    rows = again.entries("audit-1")
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[1]["call"]["expected_utility"] == call["expected_utility"] and rows[1]["call"]["summary"]
    assert again.count() == 3


# --------------------------------------------------------------------------- the guard

def test_guard_allows_claims_only_of_confirmed_actions() -> None:
    freeze = decision(kind="action", action="freeze_card", target=None)
    assert check_opener("I'm sorry, I will freeze it now.", freeze, [], confirmed=["freeze_card"]) is None
    why = check_opener("I have frozen your card.", freeze, [], confirmed=[])
    assert why is not None and "not done" in why
    assert "escalate" in check_opener("Let me connect you to an agent.", freeze, [], confirmed=["freeze_card"])


def test_the_pack_declares_an_executor_for_every_claimed_action() -> None:
    executed = {k for k, a in PACK.actions.items() if a.executor is not None}
    assert executed == {"freeze_card", "escalate"}
    assert np.isclose(sum(PACK.actions["freeze_card"].confirm.affirm.values()), 1.45)  # P(agree) per state


# --------------------------------------------------------------------------- taking an action back

def _after_freeze() -> SessionState:
    return SessionState(session_id="s", turns=1, last_action="freeze_card", last_kind="action",
                        done_actions=["freeze_card"], goal_belief={"compromised_card": 0.9})


def test_no_dont_freeze_it_right_after_the_freeze_undoes_it() -> None:
    from tests.test_dialogue import intent_for

    plan = plan_turn(_after_freeze(), "no, don't freeze it", intent_for("compromised_card", 0.6, deny=0.9), reasoner(),
                     PACK)
    assert plan.undo == "freeze_card" and plan.reply is None
    plan = plan_turn(_after_freeze(), "that's not what I asked", act(correction=0.9), reasoner(), PACK)
    assert plan.undo == "freeze_card"


def test_a_bare_no_or_a_new_topic_does_not_undo() -> None:
    from tests.test_dialogue import intent_for

    assert plan_turn(_after_freeze(), "no", act(deny=0.95), reasoner(), PACK).undo is None
    new_topic = intent_for("exchange_rate", 0.9, deny=0.8)
    assert plan_turn(_after_freeze(), "no, what's the exchange rate?", new_topic, reasoner(), PACK).undo is None
    not_done = _after_freeze()
    not_done.done_actions = []  # the freeze failed: nothing to take back
    assert plan_turn(not_done, "that's not what I asked", act(correction=0.9), reasoner(), PACK).undo is None


def test_undo_runs_on_the_same_executor(server: ActionServerProcess) -> None:
    ex = _executor(server.url)
    undo = _call("undo-1").model_copy(update={"action": "unfreeze_card", "idempotency_key": "undo-1-k"})

    async def both():  # one event loop, as in a replica: the executor's HTTP client belongs to it
        return await ex.execute(_call("undo-1")), await ex.execute(undo)

    froze, record = asyncio.run(both())
    assert (froze.status, record.status) == ("done", "done")
    assert httpx.get(f"{server.url}/v1/cards/undo-1", timeout=5).json()["status"] == "active"


@pytest.mark.parametrize(("p_agree_safe", "after_yes"), [(0.2, f"ask:{CONFIRM}"), (0.3, f"ask:{CONFIRM}"),
                                                         (0.4, "freeze_card"), (0.5, "freeze_card")])
def test_confirmation_after_someone_else_used_it_depends_on_p_agree_when_safe(p_agree_safe: float,
                                                                              after_yes: str) -> None:
    """"Payment I don't recognise" - "someone else?" - "yes" on synthetic evidence, under each P(agree | safe)."""
    from tests.test_dialogue import intent_for

    text = resolve_pack_path("banking").read_text()
    pack = parse_pack(text.replace('affirm: {"yes": 0.95, "no": 0.5}', f'affirm: {{"yes": 0.95, "no": {p_agree_safe}}}'))
    policy = Policy(pack)
    session = SessionState(session_id="s")
    decided = []
    for message, intent in (("I see a payment I don't recognise", intent_for("card_payment_not_recognised", 0.7)),
                            ("yes", act(affirm=0.97))):
        plan = plan_turn(session, message, intent, reasoner(), pack)
        d = policy.decide(plan.evidence)
        close_or_continue(session, plan, d, pack)
        session.turns += 1
        decided.append(d)
    assert decided[0].action == "ask:q_someone_else"
    assert decided[1].action == after_yes, decided[1].value_of_information


def test_claimed_actions_reads_what_a_reply_says_was_done() -> None:
    from coact.graphs.policy.actions import claimed_actions

    done = result_text(PACK, "freeze_card", ActionOutcome(status="done", reference="F-1"), "K")
    failed = result_text(PACK, "freeze_card", ActionOutcome(status="failed"), "K")
    ticket = result_text(PACK, "escalate", ActionOutcome(status="done", reference="T-1"), "K")
    assert claimed_actions(PACK, done) == ["freeze_card"]
    assert claimed_actions(PACK, f"{failed} {ticket}") == ["escalate"]
    assert claimed_actions(PACK, PACK.actions["freeze_card"].done_reply) == []  # "already frozen": nothing new
