"""Faults under load: replica kills, a session-store kill and a worker-node crash lose no session,
fail only with 503 + Retry-After, never hang, and capacity comes back.

Runs `cluster.experiments.faults --quick` in a subprocess (its own multi-node `ray.cluster_utils.Cluster`, token
and temp folder) and checks what it recorded. The session journal alone: tests/test_session_journal.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def run(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    proc = subprocess.run([sys.executable, "-m", "coact.cluster.experiments.faults", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "faults.png").stat().st_size > 0 and (out / "requests.csv").stat().st_size > 0
    return json.loads((out / "summary.json").read_text())


def test_no_session_is_lost(run: dict) -> None:
    sessions = run["sessions"]
    assert sessions["sessions"] >= 4  # every client held a conversation through all the faults
    assert sessions["lost"] == [] and sessions["fewer_turns"] == [], sessions
    # The store lives on the head, restarted in place after its kill and replayed its journal.
    head = run["head_node_id"]
    assert run["store_at_start"]["node_id"] == head and run["store_at_end"]["node_id"] == head
    kill = next(e for e in run["events"] if e["what"] == "kill session store")
    assert kill["store_after"]["pid"] != run["store_at_start"]["pid"]
    assert kill["store_after"]["restored"] >= kill["sessions_before"] > 0


def test_failures_are_503_with_retry_after_and_nothing_hangs(run: dict) -> None:
    requests = run["requests"]
    assert -1 not in requests["codes"] and "-1" not in requests["codes"], requests  # no client timeout
    assert requests["max_latency_s"] < requests["client_timeout_s"]
    assert requests["codes"]["200"] > requests["failed"]
    for fault in run["per_fault"]:
        if fault["what"] == "kill replica ChatIngress":
            continue  # below: the HTTP-facing replica itself, which no retry inside the app can cover
        # Stage replicas, the store and a whole GPU node die under the ingress, which retries the pure
        # stages and otherwise answers 503 + Retry-After: never a 500, never a dropped connection.
        assert set(fault["codes"]) <= {"200", "503"}, fault
        assert fault["failed_without_retry_after"] == 0, fault


def test_killing_an_ingress_replica_fails_at_most_its_requests_in_flight(run: dict) -> None:
    """Serve's proxy answers 500 for the requests in flight on an HTTP replica that dies (not retried, the
    body was consumed); the blast radius is those requests only, and the next turns are answered."""
    fault = next(f for f in run["per_fault"] if f["what"] == "kill replica ChatIngress")
    assert set(fault["codes"]) <= {"200", "500", "503"}, fault
    assert fault["failed"] <= fault["in_flight_at_fault"], fault
    assert fault["s_to_first_answered_turn"] is not None, fault


def test_capacity_returns_after_every_fault(run: dict) -> None:
    kinds = [e["what"] for e in run["events"]]
    for what in ("kill replica ReasonerActor", "kill replica ResponderActor", "kill replica IntentActor",
                 "kill replica DecisionActor", "kill replica ChatIngress", "kill session store",
                 "kill GPU worker node"):
        assert what in kinds
        assert run["recovery_s"][what] is not None, (what, run["recovery_s"])
    node = next(e for e in run["events"] if e["what"] == "kill GPU worker node")
    assert node["gpu_replicas_on_it"] >= 1  # the crash really took GPU replicas with it
    # max_replicas_per_node: 1 spread them, so it could not take every replica of a stage at once.
    assert all(node["replicas_on_it"].get(d, 0) <= 1 for d in ("ReasonerActor", "ResponderActor")), node
    # After the last fault the load is served again.
    last = run["per_fault"][-1]
    assert last["codes"].get("200", 0) > 0, last
