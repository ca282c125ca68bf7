"""The notebooks run top to bottom against the live app."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.notebook_run import run_notebook


@pytest.mark.e2e
def test_quickstart_notebook_executes(app_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COACT_URL", app_url)
    outputs = run_notebook("quickstart.ipynb", monkeypatch, timeout_s=600)
    text = "".join(o.get("text", "") for o in outputs)
    assert "ask" in text and "freeze_card" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
