"""Dialogue simulator and the policy-tuning job (fast: the utterance bank is built once and cached)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from graphs.domain import load_pack
from graphs.simulator import (
    GOAL_KINDS,
    OracleAgent,
    PolicyAgent,
    SimulationResult,
    Simulator,
    UtteranceBank,
    paired_difference,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACK = load_pack("banking")


@pytest.fixture(scope="module")
def models(models_dir: Path) -> Path:
    return models_dir  # conftest: cluster.prepare.ensure_models()


@pytest.fixture(scope="module")
def bank(models: Path) -> UtteranceBank:
    return UtteranceBank.build(models, PACK)  # cached under <models>/cache after the first build


@pytest.fixture(scope="module")
def sim(bank: UtteranceBank) -> Simulator:
    return Simulator(PACK, bank)


def same(a: SimulationResult, b: SimulationResult) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in SimulationResult.__dataclass_fields__)


def test_bank_is_cached_and_held_out(models: Path, bank: UtteranceBank) -> None:
    path = UtteranceBank.cache_path(models, PACK)
    assert path.is_file()
    again = UtteranceBank.load(path)
    assert np.array_equal(again.intent_probs, bank.intent_probs) and list(again.texts) == list(bank.texts)
    assert set(bank.source) == {"banking77/test", "clinc150/oos_test"}
    counts = bank.counts()
    assert set(counts) == set(bank.goal_states) and min(counts.values()) > 0
    assert bank.intent_probs.shape == (len(bank), len(bank.intent_labels))
    assert bank.finding_probs.shape == (len(bank), len(bank.finding_names))
    tune_half, eval_half = bank.split(0.5, seed=0)
    assert len(tune_half) + len(eval_half) == len(bank)
    duplicates = len(bank) - len(set(bank.texts))  # a few texts occur twice in the data sets
    assert len(set(tune_half.texts) & set(eval_half.texts)) <= duplicates
    assert min(tune_half.counts().values()) > 0 and min(eval_half.counts().values()) > 0


def test_reproducible_for_a_fixed_seed(sim: Simulator) -> None:
    u1, u2 = sim.users(150, seed=7), sim.users(150, seed=7)
    assert all(np.array_equal(u1.codes[v], u2.codes[v]) for v in u1.codes)
    assert np.array_equal(u1.utterances, u2.utterances)
    r1 = sim.run(PolicyAgent(PACK), n=150, seed=7)
    r2 = sim.run(PolicyAgent(PACK), n=150, seed=7)
    assert same(r1, r2)
    other = sim.users(150, seed=8)
    assert not np.array_equal(u1.utterances, other.utterances)
    assert not np.array_equal(sim.users(150, seed=7, stream="x").utterances, u1.utterances)


def test_oracle_is_perfect(sim: Simulator) -> None:
    r = sim.run(OracleAgent(), n=400, seed=1)
    s = r.summary()
    assert s["success"] == 1.0 and s["regret"] == 0.0 and s["mean_turns"] == 1.0 and s["escalation_rate"] == 0.0
    assert np.all(r.regret == 0.0)
    # Under the default utilities: freeze an at-risk card, decline out of scope, otherwise answer the goal.
    assert set(r.oracle_action[r.kind == "at_risk"]) == {"freeze_card"}
    assert set(r.oracle_action[r.kind == "out_of_scope"]) == {"decline"}
    faq = r.kind == "faq"
    assert all(a == f"answer:{g}" for a, g in zip(r.oracle_action[faq], r.goal[faq], strict=True))


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
    assert 1.0 <= s["mean_turns"] <= 1 + PACK.utilities.max_questions
    assert np.all(r.regret >= -1e-9) and s["regret"] > 0
    assert set(s["by_kind"]) == set(GOAL_KINDS) and sum(k["n"] for k in s["by_kind"].values()) == 400
    # Success means "the oracle's action" here: the optimum is unique under the banking pack's utilities.
    assert np.array_equal(r.success, r.action == r.oracle_action)
    assert np.array_equal(r.escalated, r.action == "escalate")
    d = paired_difference(r, r)
    assert d["mean"] == 0.0


def test_fast_path_matches_the_live_turn_logic(sim: Simulator) -> None:
    users = sim.users(60, seed=4)
    fast = sim.run(PolicyAgent(PACK), users=users)
    exact = sim.run(PolicyAgent(PACK, exact=True), users=users)
    assert same(fast, exact)
    asking = sim.run(PolicyAgent(PACK, {"question_cost": 0.0}), users=users)
    asking_exact = sim.run(PolicyAgent(PACK, {"question_cost": 0.0}, exact=True), users=users)
    assert same(asking, asking_exact) and asking.questions.sum() > 0


def test_smoke_tune_writes_artefacts(tmp_path: Path, models: Path) -> None:
    import ray

    from cluster.jobs.tune_policy import main

    was_running = ray.is_initialized()
    out = tmp_path / "tune"
    assert main(["--smoke", "--num-samples", "2", "--dialogues", "30", "--eval-dialogues", "60",
                 "--output", str(out), "--models-dir", str(models), "--verbose", "0", "--seed", "0"]) == 0
    assert ray.is_initialized() == was_running  # a cluster we found stays up; one we started is gone
    import pandas as pd

    trials = pd.read_csv(out / "results.csv")
    assert len(trials) == 2 and {"objective", "success", "mean_turns", "w_question_cost"} <= set(trials.columns)
    # Trial 0 is the pack's default weights.
    assert trials.loc[0, "w_question_cost"] == PACK.utilities.weights["question_cost"]
    best = json.loads((out / "best_weights.json").read_text())
    assert set(PACK.utilities.weights) <= set(best["weights"])
    comparison = json.loads((out / "comparison.json").read_text())
    reports = comparison["reports"]
    assert set(reports) == {"default", "tuned", "oracle"}
    assert reports["oracle"]["success"] == 1.0 and reports["oracle"]["regret"] == 0.0
    assert reports["default"]["n"] == 60 and isinstance(comparison["target_met"], bool)
