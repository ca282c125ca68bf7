"""Autoscaling across nodes: the real autoscaler (fake multi-node provider) adds and removes GPU nodes.

Runs `cluster.experiments.autoscaling --quick` in a subprocess (its own private head, token and temp
folder, stopped by PID) and checks the behaviour it recorded: never absolute speed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def run(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("autoscaling")
    proc = subprocess.run([sys.executable, "-m", "coact.cluster.experiments.autoscaling", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), out


def test_gpu_nodes_are_added_under_load_and_removed_after(run: tuple[dict, Path]) -> None:
    summary, _ = run
    assert not summary["sampler_errors"], summary["sampler_errors"]
    # Deploying asked for one Reasoner and one Responder replica, each a whole logical GPU: two GPU nodes.
    assert summary["gpu_nodes_before_load"] == 2
    # Under load Serve asked for more replicas and the autoscaler launched GPU nodes for them...
    assert any(summary["replicas_peak"][d] > 1 for d in ("ReasonerActor", "ResponderActor")), summary
    assert summary["gpu_nodes_peak"] > summary["gpu_nodes_before_load"]
    assert summary["s_load_to_first_new_gpu_node"] is not None
    assert summary["s_load_to_first_new_replica_running"] is not None
    # ...and never a CPU node: the pending demand named a GPU.
    assert summary["cpu_nodes_max"] == 0
    # After the load: replicas back to their minimum, then the idle GPU nodes terminated.
    assert summary["s_stop_to_replicas_at_min"] is not None
    assert summary["s_stop_to_gpu_nodes_at_base"] is not None
    assert summary["gpu_nodes_end"] <= summary["gpu_nodes_before_load"]


def test_gpu_replicas_run_only_on_gpu_nodes(run: tuple[dict, Path]) -> None:
    summary, out = run
    assert summary["gpu_replicas_placed"] > 2  # the initial two and at least one added under load
    assert summary["gpu_replicas_on_nodes_without_gpu"] == []
    with (out / "placements.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["deployment"] in ("ReasonerActor", "ResponderActor"):
            assert row["node_kind"] == "gpu" and float(row["node_gpus"]) >= 1, row
        else:  # the CPU-only stages stay where no GPU is reserved for them
            assert row["node_kind"] == "head", row


def test_load_was_served_and_the_cluster_was_stopped(run: tuple[dict, Path]) -> None:
    summary, out = run
    codes = summary["requests"]["codes"]
    assert codes.get("200", 0) > 0
    assert set(codes) <= {"200", "503"}, codes  # scaling never fails a request; shedding would be a 503
    # Everything the run started is gone: the head's process group and every fake node's raylet.
    assert summary["stop"]["still_alive"] == []
    for name in ("timeline.csv", "latency.csv", "requests.csv", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "timeline.csv").open() as f:
        header = next(csv.reader(f))
    assert {"t", "in_flight", "nodes_gpu", "nodes_cpu", "running_ReasonerActor", "running_ResponderActor"} <= set(header)
