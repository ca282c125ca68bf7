"""The multi-turn test dialogues: the set itself, the runner's turn check, and the whole set against the app."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest

from coact.cluster.jobs.test_dialogues import (
    DEFAULT_FILE,
    Category,
    DialogueSetError,
    Turn,
    check_turn,
    known_intents,
    load_dialogues,
    markdown_table,
    run_dialogues,
    write_report,
)

pytestmark = pytest.mark.unit

MIN_DIALOGUES = 90
MIN_PER_CATEGORY = 5
MIN_OVERALL = 0.80  # measured 0.862 (94/109) on the template-reply app
MIN_CATEGORY = 0.5
MIN_CLEAR = 0.83  # one miss at most where the right behaviour is unambiguous (all at 100% when measured)
CLEAR_CATEGORIES = {"one_shot", "request_human", "frustration", "closing", "out_of_scope", "injection"}


def response(kind: str, name: str | None = None, target: str | None = None, reply: str = "ok") -> dict:
    return {"session_id": "s1", "reply": reply, "action": {"kind": kind, "name": name or kind, "target": target, "executed": []},
            "trace": {"stages": []}}


# --- the set --------------------------------------------------------------------------------------


def test_dialogue_set_loads_with_enough_dialogues_per_category() -> None:
    dialogues = load_dialogues(DEFAULT_FILE)
    assert len(dialogues) >= MIN_DIALOGUES
    names = [d.name for d in dialogues]
    assert len(names) == len(set(names))
    per_category = Counter(d.category for d in dialogues)
    assert set(per_category) == set(get_args(Category))
    assert min(per_category.values()) >= MIN_PER_CATEGORY, per_category


def test_dialogue_set_uses_only_the_domain_intents() -> None:
    intents = known_intents("banking")
    assert intents and len(intents) == 77
    used = {i for d in load_dialogues(DEFAULT_FILE) for t in d.turns for i in t.intents or []}
    assert used <= intents


def test_one_shot_and_clear_categories_are_strict() -> None:
    # (category, the turn that carries the clear request, the only kind allowed for it)
    strict = {"one_shot": (0, {"answer"}), "out_of_scope": (0, {"decline"}),
              "request_human": (-1, {"escalate"}), "closing": (-1, {"chitchat"})}
    for d in load_dialogues(DEFAULT_FILE):
        if d.category in strict:
            index, kinds = strict[d.category]
            assert set(d.turns[index].kinds) == kinds, d.name
        if d.category == "one_shot":
            assert d.turns[0].intents, d.name
        assert all("decline" not in t.kinds for t in d.turns) or d.category in ("out_of_scope", "injection"), d.name


def test_loader_names_the_dialogue_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "dialogues:\n"
        "  - name: first\n    category: one_shot\n    turns:\n      - user: hi\n        kinds: [answr]\n"
        "  - name: second\n    category: nonsense\n    turns:\n      - user: hi\n        kinds: [chitchat]\n"
        "  - name: third\n    category: greeting\n    turns:\n      - user: hi\n        kinds: [chitchat]\n"
        "        intents: [card_arrival]\n"
        "  - name: third\n    category: greeting\n    turns:\n      - user: hi\n        kinds: [chitchat]\n",
        encoding="utf-8")
    with pytest.raises(DialogueSetError) as err:
        load_dialogues(bad)
    text = str(err.value)
    assert "'first': turns.0.kinds.0" in text
    assert "'second': category" in text
    assert "'third': turns.0" in text and "intents" in text
    assert "duplicate name" in text


def test_loader_rejects_unknown_intents(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dialogues:\n  - name: a\n    category: one_shot\n    turns:\n"
                   "      - user: hi\n        kinds: [answer]\n        intents: [no_such_intent]\n", encoding="utf-8")
    with pytest.raises(DialogueSetError, match="'a': turns.0.intents: unknown intents"):
        load_dialogues(bad, intents={"card_arrival"})


# --- the turn check -------------------------------------------------------------------------------


def test_check_turn_passes_allowed_responses() -> None:
    turn = Turn(user="x", kinds=["answer", "ask"], intents=["cash_withdrawal_charge"], targets=["goal"],
                not_contains=["Top Up"], contains=["ATM"])
    assert check_turn(turn, 200, response("answer", "answer:cash_withdrawal_charge", "cash_withdrawal_charge",
                                          "The atm operator may add a fee.")) == []
    assert check_turn(turn, 200, response("ask", "ask:goal", "goal", "Do you mean ATM fees or...?")) == []
    freeze = Turn(user="x", kinds=["action"], actions=["freeze_card"])
    assert check_turn(freeze, 200, response("action", "freeze_card")) == []


def test_check_turn_catches_wrong_kind_intent_target_and_action() -> None:
    turn = Turn(user="x", kinds=["answer", "ask", "action"], intents=["change_pin"], targets=["q_wants_human"],
                actions=["freeze_card"])
    assert check_turn(turn, 200, response("decline"))[0].startswith("kind 'decline' not in")
    assert check_turn(turn, 200, response("answer", target="pin_blocked")) == [
        "intent 'pin_blocked' not in ['change_pin']"]
    assert check_turn(turn, 200, response("ask", target="goal")) == ["question 'goal' not in ['q_wants_human']"]
    assert check_turn(turn, 200, response("action", name="transfer_money")) == [
        "action 'transfer_money' not in ['freeze_card']"]


def test_check_turn_substrings_are_case_insensitive() -> None:
    turn = Turn(user="x", kinds=["answer"], not_contains=["top up"], contains=["Withdrawal"])
    problems = check_turn(turn, 200, response("answer", target="atm_support", reply="You can TOP UP at any ATM."))
    assert problems == ["reply contains 'top up'", "reply lacks 'Withdrawal'"]
    assert check_turn(turn, 200, response("answer", target="atm_support", reply="Each WITHDRAWAL is free.")) == []


def test_check_turn_records_non_200_and_malformed_bodies() -> None:
    turn = Turn(user="x", kinds=["chitchat"])
    problems = check_turn(turn, 503, {"error": "queue full"})
    assert len(problems) == 1 and problems[0].startswith("HTTP 503") and "queue full" in problems[0]
    assert check_turn(turn, 0, "ConnectError: refused")[0].startswith("HTTP 0: ConnectError")
    assert check_turn(turn, 200, {"reply": "hi"})[0].startswith("malformed response")


def test_turn_lists_must_match_its_kinds() -> None:
    with pytest.raises(ValueError, match="intents needs"):
        Turn(user="x", kinds=["ask"], intents=["change_pin"])


# --- the whole set against the real app -----------------------------------------------------------


@pytest.mark.serve
def test_dialogue_set_against_the_app(template_app_url: str, tmp_path: Path) -> None:
    """The whole set over HTTP, against the session's second app of the same graph, with template replies.

    The decisions are the policy's whatever phrases them; templates keep the 109 dialogues to about
    a minute on two cores (the LM-phrased path is covered by the e2e and streaming tests).
    """
    url = template_app_url
    report = asyncio.run(run_dialogues(url, load_dialogues(DEFAULT_FILE), concurrency=4))
    md = write_report(report, tmp_path)
    print(md.read_text(encoding="utf-8"))
    assert (tmp_path / "report.json").exists()
    # A ratchet on what the policy achieves today (86% of dialogues; docs/dialogue.md lists the misses),
    # not the 95% / 85%-per-category target: the clear-cut categories must hold, none may collapse.
    # Every reply claims exactly the actions the executor did in that turn (none claimed and not done).
    assert not report.action_mismatches(), report.action_mismatches()
    assert sum(len(t.executed) for r in report.results for t in r.turns) > 0
    rates = {s.category: s.rate for s in report.categories()}
    weak = {c: round(r, 3) for c, r in rates.items() if r < (MIN_CLEAR if c in CLEAR_CATEGORIES else MIN_CATEGORY)}
    assert report.rate >= MIN_OVERALL and not weak, (
        f"{report.passed}/{report.total} dialogues passed; categories below their floor: {weak}\n"
        f"{markdown_table(report)}")
