"""Domain pack validation: errors name the bad field; the banking pack compiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coact.graphs.policy.domain import (
    DOMAINS_DIR,
    DomainPackError,
    build_actions,
    build_network,
    load_pack,
    parse_pack,
)

pytestmark = pytest.mark.unit

BANKING = (DOMAINS_DIR / "banking.yaml").read_text()


def test_banking_pack_covers_banking77() -> None:
    pack = load_pack("banking")
    cats = json.loads((Path(__file__).resolve().parents[2] / "shared/data/banking77/categories.json").read_text()) \
        if (Path(__file__).resolve().parents[2] / "shared/data/banking77/categories.json").exists() else None
    if cats is not None:
        assert [i.name for i in pack.intents] == cats
    assert len({i.faq for i in pack.intents}) == len(pack.intents)
    net = build_network(pack)
    assert len(net.states["goal"]) == len(pack.intents) + 1
    actions = build_actions(pack, pack.utilities.weights)
    assert sum(a.kind == "answer" for a in actions) == len(pack.intents)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("  - name: upset\n", "  - name: upset\n    bogus: 1\n", "variables.2.bogus"),
        ("question_cost: 1.0", "question_cost: cheap", "utilities.weights.question_cost"),
        ("parents: [card_at_risk]\n    cpt:\n      default: [0.08, 0.92]",
         "parents: [card_at_risk]\n    cpt:\n      default: [0.08, 0.9]", "variables.f_urgent.cpt.default"),
        ("{on: upset, values: {\"yes\": escalate_upset}", "{on: moon, values: {\"yes\": escalate_upset}",
         "unknown variable 'moon'"),
        ("intent_variable: goal", "intent_variable: target", "intent_variable"),
        ("- when: {goal: [lost_or_stolen_card, compromised_card]}", "- when: {goal: [lost_card_typo]}",
         "when.goal: unknown states"),
    ],
)
def test_bad_pack_names_the_field(old: str, new: str, needle: str) -> None:
    assert old in BANKING, old
    with pytest.raises(DomainPackError) as err:
        parse_pack(BANKING.replace(old, new, 1), "bad.yaml")
    assert needle in str(err.value)


def test_yes_no_stay_strings() -> None:
    pack = parse_pack(BANKING)
    assert pack.questions[0].answers == {"affirm": "yes", "deny": "no"}
