"""notebooks/tuning.ipynb runs top to bottom on tiny configurations of the tuning and evaluation jobs, and
shows the results of the runs it made."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers.notebooks import run_notebook

pytestmark = pytest.mark.cluster


def test_tuning_notebook_executes(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coact.cluster.jobs import tune_intent

    # The kernel is its own process and starts (and stops) its own private Ray.
    monkeypatch.setenv("COACT_TUNING_SMOKE", "1")
    monkeypatch.setenv("COACT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("COACT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("COACT_TORCH_THREADS", "1")
    run = run_notebook("tuning.ipynb", monkeypatch, timeout_s=900)

    # The folders it read are the ones its smoke runs just wrote (not older runs under the results folder).
    where = run.text('print("tune_intent:", TUNE_DIR)')
    tune_dir = Path(re.search(r"^tune_intent: (.+)$", where, re.M).group(1))
    policy = re.search(r"^tune_policy: (.+)$", where, re.M).group(1)
    evals = [Path(p.strip()) for p in where.split("evaluations:\n", 1)[1].split("tune_policy:", 1)[0].splitlines()]
    assert tune_dir.name == "tune_intent" and tune_dir.parent.name.startswith("coact-tuning-nb-"), where
    assert policy != "None" and (Path(policy) / "comparison.json").is_file(), where
    assert evals == [tune_dir.parent / "eval-intent", tune_dir / "evaluation"], where

    # The tune_intent run has the smoke's trials, and the best configuration shown is that run's best trial.
    trials = pd.read_csv(tune_dir / "results.csv")
    best = json.loads((tune_dir / "best_config.json").read_text())
    assert len(trials) == tune_intent.SMOKE["num_samples"] and best["smoke"]
    assert best["best_val_macro_f1"] == pytest.approx(trials["best_val_macro_f1"].max())
    shown = run.text('print(json.dumps({k: best_cfg[k] for k in ("best_trial"')
    printed = json.JSONDecoder().raw_decode(shown)[0]
    assert printed == {k: best[k] for k in printed} and set(printed) >= {"best_trial", "config", "best_val_macro_f1"}

    # The plots: learning curves of these trials, one reliability diagram per evaluation, the policy trials.
    assert len(run.images('axes[0].set(xlabel="epoch", ylabel="validation macro-F1"')) == 1
    assert len(run.images('display(Image(filename=str(d / "reliability.png")')) == len(evals)
    assert len(run.images("policy trials (tuning users)")) == 1
