"""The ingress's metrics (graphs/serving/metrics.py) on the cluster's Prometheus endpoint: scraped before and
after real turns, they move by what the turns did."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers.serve import wait_for

pytestmark = pytest.mark.serve

APP = "coact-templates"
DASHBOARD = Path(__file__).parents[1] / "cluster" / "grafana" / "coact.json"


def _metrics_url() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(re.search(rf'\b{k}="{re.escape(v)}"', head) for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_move_with_the_turns(template_app_url: str) -> None:
    url = _metrics_url()
    before = httpx.get(url, timeout=30).text
    asks = _sample(before, "ray_coact_turns_total", app=APP, kind="ask")
    refused = _sample(before, "ray_coact_refusals_total", app=APP, status="404")
    stages = _sample(before, "ray_coact_stage_ms_count", app=APP, stage="decision")

    r = httpx.post(f"{template_app_url}/v1/chat", json={"message": "I see a payment I don't recognise"}, timeout=120)
    assert r.status_code == 200 and r.json()["action"]["kind"] == "ask", r.text
    sid = r.json()["session_id"]
    r = httpx.post(f"{template_app_url}/v1/chat", json={"message": "yes", "session_id": sid, "stream": True},
                   timeout=120)
    assert r.status_code == 200 and "event: done" in r.text
    missing = httpx.post(f"{template_app_url}/v1/chat", json={"message": "hi", "session_id": uuid.uuid4().hex},
                         timeout=60)
    assert missing.status_code == 404

    def moved() -> str | None:
        text = httpx.get(url, timeout=30).text
        done = (_sample(text, "ray_coact_turns_total", app=APP, kind="ask") >= asks + 1
                and _sample(text, "ray_coact_refusals_total", app=APP, status="404") >= refused + 1
                and _sample(text, "ray_coact_stage_ms_count", app=APP, stage="decision") >= stages + 2)
        return text if done else None

    after = wait_for(moved, timeout_s=90, what="the metrics to be exported", every_s=2)
    assert _sample(after, "ray_coact_turns_total", app=APP, route="chat") >= 2
    assert _sample(after, "ray_coact_questions_per_case_count", app=APP) >= 1  # the case the freeze closed
    assert _sample(after, "ray_coact_turn_ms_count", app=APP) >= 2
    assert "ray_coact_stage_ms_bucket" in after


def test_dashboard_queries_name_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    names = {m for panel in dash["panels"] for t in panel["targets"] for m in re.findall(r"ray_coact_\w+", t["expr"])}
    exported = {"ray_coact_turns_total", "ray_coact_turn_ms_bucket", "ray_coact_stage_ms_bucket",
                "ray_coact_questions_per_case_sum", "ray_coact_questions_per_case_count", "ray_coact_escalations_total",
                "ray_coact_guard_rejections_total", "ray_coact_template_fallbacks_total", "ray_coact_refusals_total",
                "ray_coact_store_errors_total"}
    assert names <= exported and len(names) >= 9, names
