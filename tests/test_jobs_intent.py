"""The intent jobs: evaluation report, a tiny fine-tuning run, a Ray Tune smoke run (all on 2 shared cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.models

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- unit: metrics

def test_calibration_and_oos_metrics() -> None:
    from coact.cluster.jobs.evaluate import expected_calibration_error, fpr_at_recall, oos_metrics

    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([1.0, 1.0, 1.0, 0.0])
    # bins: 0.9 (acc 1.0, |gap| 0.1) and 0.6 (acc 0.5, |gap| 0.1)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.1)
    in_scores = np.linspace(0.0, 0.5, 101)
    oos_scores = np.array([0.2, 0.9, 0.95, 1.0])
    fpr, thr = fpr_at_recall(in_scores, oos_scores)
    assert (in_scores <= thr).mean() >= 0.95 and fpr == 0.25
    assert oos_metrics(np.zeros(5), np.ones(5))["auroc"] == 1.0


def test_same_split_as_prepare() -> None:
    from coact.cluster.jobs.common import load_intent_data
    from coact.cluster.prepare import VAL_FRACTION

    data = load_intent_data()
    assert data.num_labels == 78 and data.labels[-1] == data.out_of_scope_label
    assert len(data.val_idx) == pytest.approx(VAL_FRACTION * len(data.texts), abs=2)
    assert not set(data.train_idx) & set(data.val_idx)
    sub = data.subset(3, 2, seed=0)
    assert np.bincount(sub.y[sub.train_idx]).max() <= 3 and len(sub.val_idx) == 2 * 78


# ---------------------------------------------------------------- evaluate.py

def test_evaluate_linear_head(models_dir: Path, tmp_path: Path) -> None:
    from coact.cluster.jobs import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(models_dir / "intent"), "--out", str(out), "--no-progress"]) == 0
    for name in ("report.json", "confusion_matrix.png", "reliability.png", "errors.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["kind"] == "linear_head"
    assert rep["data"]["n_test"] == 3080 and rep["data"]["n_oos_test"] == 1000
    assert rep["accuracy"] >= 0.92 and rep["macro_f1"] >= 0.92
    assert rep["accuracy_78way"] <= rep["accuracy"] + 1e-12
    assert len(rep["per_intent"]) == 77
    assert all(0.0 <= v["f1"] <= 1.0 for v in rep["per_intent"].values())
    assert rep["out_of_scope"]["auroc"] >= 0.95
    assert 0.0 <= rep["out_of_scope"]["fpr_at_95_in_scope_recall"] <= 0.2
    assert 0.0 <= rep["calibration"]["ece"] <= 0.1
    errors = pd.read_csv(out / "errors.csv")
    assert set(errors.columns) >= {"text", "true_label", "predicted_label", "confidence"}
    n_in = int((errors["source"] == "banking77_test").sum())
    assert n_in == round((1 - rep["accuracy_78way"]) * 3080)


# ---------------------------------------------------------------- train_intent.py + intent_models.py

def test_train_tiny_and_load(models_dir: Path, tmp_path: Path) -> None:
    from coact.actors.intent_models import SequenceIntentClassifier, load_intent_model
    from coact.actors.models import IntentClassifier
    from coact.cluster.jobs import train_intent

    out, model_dir = tmp_path / "train", tmp_path / "model"
    rc = train_intent.main(["--train-per-class", "3", "--val-per-class", "2", "--epochs", "1",
                            "--max-length", "16", "--no-test", "--no-progress", "--threads", "2",
                            "--output", str(out), "--model-out", str(model_dir)])
    assert rc == 0
    assert (out / "history.csv").is_file() and (out / "train_summary.json").is_file()
    model = load_intent_model(model_dir)
    assert isinstance(model, SequenceIntentClassifier)
    linear = load_intent_model(models_dir / "intent")
    assert isinstance(linear, IntentClassifier)
    assert model.labels == linear.labels and len(model.labels) == 78
    assert model.out_of_scope_label == linear.out_of_scope_label
    assert model.temperature > 0 and model.priors.shape == (78,) and model.version
    texts = ["I lost my card", "what's the weather like tomorrow", "my transfer has not arrived"]
    probs = model.predict_proba_texts(texts, None)
    assert probs.shape == (3, 78)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the linear head takes embeddings through the same method
    emb = np.random.default_rng(0).normal(size=(3, 384)).astype(np.float32)
    lp = linear.predict_proba_texts(texts, emb)
    assert lp.shape == (3, 78)
    np.testing.assert_allclose(lp.sum(1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- tune_intent.py

@pytest.mark.cluster  # Ray Tune starts a Ray of its own
def test_tune_smoke(models_dir: Path, tmp_path: Path) -> None:
    import ray

    from coact.cluster.jobs import tune_intent

    was_running = ray.is_initialized()
    out = tmp_path / "tune"
    assert tune_intent.main(["--smoke", "--output", str(out), "--verbose", "0"]) == 0
    assert ray.is_initialized() == was_running  # a session cluster is reused and left running
    results = pd.read_csv(out / "results.csv")
    assert len(results) == tune_intent.SMOKE["num_samples"]
    assert set(results["mode"]) == {"frozen", "full"}
    assert (results["status"] != "error").all(), results["error"].tolist()
    curves = pd.read_csv(out / "learning_curves.csv")
    assert {"trial", "training_iteration", "val_macro_f1"} <= set(curves.columns)
    best = json.loads((out / "best_config.json").read_text())
    assert best["config"]["mode"] in ("frozen", "full") and 0.0 < best["best_val_macro_f1"] <= 1.0
    assert best["best_val_macro_f1"] == pytest.approx(results["best_val_macro_f1"].max())
    assert (out / "best_model" / "meta.json").is_file()
    assert (out / "evaluation" / "report.json").is_file()
