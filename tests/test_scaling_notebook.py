"""notebooks/scaling.ipynb runs top to bottom on the committed sample of scaling results."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from tests.helpers.notebooks import run_notebook

pytestmark = pytest.mark.unit

SAMPLE = REPO / "cluster" / "experiments" / "sample_results"


def test_scaling_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COACT_SCALING_RESULTS", str(SAMPLE))
    run = run_notebook("scaling.ipynb", monkeypatch, timeout_s=300)
    outputs = run.outputs
    text = "".join(o.get("text", "") for o in outputs)
    assert "sweep points" in text and "predicted / measured p99" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # throughput/latency, stage breakdown, batch sizes, predicted vs measured
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "responder_replicas" in html and "gpus" in html  # the capacity tables
    assert "graph overhead" in html and "batching" in html  # the benchmark ratios
