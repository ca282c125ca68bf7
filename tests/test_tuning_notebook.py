"""notebooks/tuning.ipynb runs top to bottom on tiny configurations of the tuning and evaluation jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.notebook_run import run_notebook


def test_tuning_notebook_executes(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel is its own process and starts (and stops) its own private Ray.
    monkeypatch.setenv("COACT_TUNING_SMOKE", "1")
    monkeypatch.setenv("COACT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("COACT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("COACT_TORCH_THREADS", "1")
    outputs = run_notebook("tuning.ipynb", monkeypatch, timeout_s=900)
    text = "".join(o.get("text", "") for o in outputs)
    assert "tune_intent --smoke" in text and "best_val_macro_f1" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # learning curves, confusion matrix, reliability diagrams (+ policy plot)
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "accuracy" in html and "frozen" in html
