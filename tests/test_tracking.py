"""TensorBoard tracking of the jobs: the event files a tiny training run and a tiny Tune search write, read back
with tensorboard's EventAccumulator and compared with what the jobs themselves report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.models

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_train_intent_writes_curves(models_dir: Path, tmp_path: Path) -> None:
    from coact.cluster.jobs import train_intent
    from coact.cluster.jobs.tracking import TENSORBOARD_DIR, event_dirs, read_scalars

    out = tmp_path / "train"
    # The quickest training path: a frozen-encoder head, 2 epochs of 2 passes over 3 examples per label.
    assert train_intent.main(["--mode", "frozen", "--epochs", "2", "--frozen-passes", "2", "--patience", "5",
                              "--train-per-class", "3", "--val-per-class", "2", "--max-length", "16",
                              "--batch-size", "64", "--no-test", "--no-progress", "--threads", "2",
                              "--output", str(out)]) == 0
    assert event_dirs(out) == [out / TENSORBOARD_DIR]
    scalars = read_scalars(out / TENSORBOARD_DIR)
    summary = json.loads((out / "train_summary.json").read_text())
    history = pd.read_csv(out / "history.csv")
    # One point per optimiser step: ceil(n_train / batch) batches per pass, 2 passes per epoch, 2 epochs.
    steps = -(-summary["n_train"] // 64) * 2 * 2
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, steps + 1))
    assert len(scalars["train/lr"]) == steps and scalars["train/lr"][-1][1] < scalars["train/lr"][0][1]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1"):
        points = scalars[f"epoch/{key}"]
        assert [s for s, _ in points] == [1, 2], key
        assert [v for _, v in points] == pytest.approx(list(history[key]), rel=1e-6), key
    # The logged final validation metrics are the ones the job reports, at its best epoch.
    for key, value in summary["val"].items():
        assert scalars[f"best/{key}"] == [(summary["best_epoch"], pytest.approx(value, rel=1e-6))], key


def test_train_intent_tracking_none(models_dir: Path, tmp_path: Path) -> None:
    from coact.cluster.jobs import train_intent
    from coact.cluster.jobs.tracking import event_dirs

    out = tmp_path / "train"
    assert train_intent.main(["--mode", "frozen", "--epochs", "1", "--frozen-passes", "1", "--train-per-class", "2",
                              "--val-per-class", "1", "--max-length", "16", "--no-test", "--no-progress",
                              "--threads", "2", "--tracking", "none", "--output", str(out)]) == 0
    assert (out / "train_summary.json").is_file() and event_dirs(out) == []


def test_tracking_refuses_a_missing_package(tmp_path: Path) -> None:
    import importlib.util

    from coact.cluster.jobs.tracking import tune_callbacks

    with pytest.raises(ValueError, match="tracking must be one of"):
        tune_callbacks("neptune", tmp_path, "x")
    for name in ("mlflow", "wandb"):
        if importlib.util.find_spec(name) is None:  # not installed here: refused, naming the package
            with pytest.raises(SystemExit, match=f"'{name}' package is not installed"):
                tune_callbacks(name, tmp_path, "x")
        else:
            assert len(tune_callbacks(name, tmp_path, "x")) == 4


@pytest.mark.cluster  # Ray Tune starts a Ray of its own
def test_tune_policy_writes_curves_per_trial(models_dir: Path, tmp_path: Path) -> None:
    from coact.cluster.jobs import tune_policy
    from coact.cluster.jobs.tracking import event_dirs, read_scalars

    out = tmp_path / "tune"
    assert tune_policy.main(["--smoke", "--num-samples", "2", "--dialogues", "20", "--chunks", "2",
                             "--eval-dialogues", "20", "--risk-dialogues", "4", "--eval-risk-dialogues", "4",
                             "--max-concurrent", "1", "--output", str(out), "--models-dir", str(models_dir),
                             "--verbose", "0"]) == 0
    trials = pd.read_csv(out / "results.csv", dtype={"trial_id": str})  # "873423e5" is not a float
    dirs = event_dirs(out / "tune")
    assert len(dirs) == len(trials) == 2 and all(d.parent == out / "tune" for d in dirs)
    by_id = {}
    for d in dirs:
        scalars = read_scalars(d)
        progress = pd.read_csv(d / "progress.csv", dtype={"trial_id": str})
        by_id[progress["trial_id"].iloc[-1]] = scalars
        # One step per report (chunk), the objective each time as Tune's own progress.csv has it.
        points = scalars[f"ray/tune/{tune_policy.METRIC}"]
        assert [s for s, _ in points] == list(progress["training_iteration"])
        assert [v for _, v in points] == pytest.approx(list(progress[tune_policy.METRIC]))
        assert "ray/tune/success" in scalars and "ray/tune/mean_turns" in scalars
    # The last logged objective of every trial is the one the job reports for it in results.csv.
    for _, row in trials.iterrows():
        points = by_id[row["trial_id"]][f"ray/tune/{tune_policy.METRIC}"]
        assert len(points) == row["iterations"]
        assert points[-1][1] == pytest.approx(row[tune_policy.METRIC])
