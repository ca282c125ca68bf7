"""Load generator, sweep and Tune serving search, run for a few seconds against real local apps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from coact.cluster.experiments import loadgen as L

pytestmark = pytest.mark.serve

SUMMARY_KEYS = {"turns", "turns_ok", "turns_error", "full_turns", "sessions", "wall_s", "throughput_tps",
                "latency_ms", "stage_ms", "proxy_overhead_ms", "reasoner_batch", "actions", "errors"}


def ordered(p: dict) -> bool:
    return p["p50"] <= p["p95"] <= p["p99"]


def check_run(out: Path, max_turns: int | None = None) -> tuple[dict, list[dict]]:
    doc = json.loads((out / "summary.json").read_text())
    assert {"facts", "config", "summary", "cpu"} <= set(doc)
    assert doc["facts"]["versions"]["ray"] and doc["facts"]["host_cpus"] >= 1
    s = doc["summary"]
    assert SUMMARY_KEYS <= set(s)
    with open(out / "turns.csv") as f:
        rows = list(csv.DictReader(f))
    assert s["turns"] == len(rows) == s["turns_ok"] + s["turns_error"] and s["turns"] >= 1
    assert s["turns_error"] == 0 and s["errors"] == {}, s["errors"]
    if max_turns is not None:
        assert s["turns"] <= max_turns
    assert ordered(s["latency_ms"]) and ordered(s["proxy_overhead_ms"])
    assert s["throughput_tps"] == pytest.approx(s["turns_ok"] / s["wall_s"], rel=1e-3)
    assert s["sessions"] == len({r["session"] for r in rows})
    for r in rows:
        lat, server = float(r["latency_ms"]), float(r["server_ms"])
        assert r["status"] == "200" and r["kind"]
        assert 0 < server <= lat  # the client sees at least what the ingress measured
        assert all(float(r[f"{st}_ms"]) >= 0 for st in ("session", "intent", "reasoner"))
        if r["kind"] != "chitchat":
            assert float(r["responder_ms"]) > 0 and float(r["reasoner_batch"]) >= 1
    # Each session's turns are numbered 0, 1, ... with no gap, and a follow-up comes after its opener.
    by_session: dict[str, list[dict]] = {}
    for r in rows:
        by_session.setdefault(r["session"], []).append(r)
    for turns in by_session.values():
        turns.sort(key=lambda r: int(r["turn"]))
        assert [int(r["turn"]) for r in turns] == list(range(len(turns)))
        assert [float(r["t_start_s"]) for r in turns] == sorted(float(r["t_start_s"]) for r in turns)
        # A session goes on only after a question (the user answers) or a decision (the user may thank it).
        assert all(prev["kind"] != "chitchat" for prev in turns[:-1])
    return s, rows


def test_closed_loop_load(app_url: str, tmp_path: Path) -> None:
    res = L.run_load(L.LoadConfig(url=app_url, mode="closed", concurrency=2, duration_s=5.0, seed=1))
    L.write_result(tmp_path, res)
    s, rows = check_run(tmp_path)
    assert s["sessions"] >= 2  # both users started a session
    assert max(float(r["t_start_s"]) for r in rows) < 5.0 + 0.5  # no new turn after the duration


def test_open_loop_load_is_bounded_by_count(app_url: str, tmp_path: Path) -> None:
    res = L.run_load(L.LoadConfig(url=app_url, mode="open", rate=2.0, duration_s=20.0, max_turns=3, seed=2))
    L.write_result(tmp_path, res)
    s, rows = check_run(tmp_path, max_turns=3)
    assert s["turns"] == 3
    # Open loop: sessions start on the seeded Poisson schedule (the generator's first two draws), whatever
    # the response times; only scheduling lag separates an arrival from its planned time.
    import random

    draws = random.Random(2)
    planned = [draws.expovariate(2.0)]
    planned.append(planned[0] + draws.expovariate(2.0))
    opens = sorted(float(r["t_start_s"]) for r in rows if r["turn"] == "0")
    assert len(opens) >= 2
    assert all(0 <= got - want < 0.5 for got, want in zip(opens[:2], planned, strict=True)), (opens, planned)


def test_refuses_a_remote_target() -> None:
    with pytest.raises(ValueError, match="local"):
        L.check_local("http://example.com:8000")
    L.check_local("http://127.0.0.1:8000")


def test_sweep_attached_to_the_app(app_url: str, tmp_path: Path) -> None:
    from coact.cluster.experiments import sweep

    assert sweep.main(["--url", app_url, "--app-name", "coact", "--concurrency", "1", "2", "--duration", "3",
                       "--output", str(tmp_path)]) == 0
    with open(tmp_path / "points.csv") as f:
        points = list(csv.DictReader(f))
    assert [int(p["concurrency"]) for p in points] == [1, 2]
    for p in points:
        assert int(p["turns_ok"]) >= 1 and int(p["turns_error"]) == 0
        assert float(p["latency_ms_p50"]) <= float(p["latency_ms_p95"]) <= float(p["latency_ms_p99"])
        # Serve's own metrics were read for this app: time inside each stage's replica, batches formed.
        assert float(p["responder_replica_ms_mean"]) > 0 and float(p["reasoner_batch_size_mean"]) >= 1
        assert not math.isnan(float(p["intent_queue_ms"]))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["facts"]["versions"]["ray"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"throughput_latency.png", "stage_breakdown.png"}


def test_tune_serving_two_trials(app_url: str, tmp_path: Path) -> None:
    """Two sequential trials redeploy a second app (responder batching off vs on) next to the session app."""
    from urllib.parse import urlparse

    from coact.cluster.experiments import tune_serving

    port = urlparse(app_url).port
    assert tune_serving.main(["--quick", "--duration", "3", "--port", str(port), "--verbose", "0",
                              "--output", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        trials = list(csv.DictReader(f))
    assert sorted(int(t["config/responder_max_batch_size"]) for t in trials) == [1, 8]
    for t in trials:
        assert t["feasible"] == "True" and int(t["turns_error"]) == 0 and float(t["throughput_tps"]) > 0
    best = json.loads((tmp_path / "best_config.json").read_text())
    assert best["metrics"]["score"] == max(float(t["score"]) for t in trials)


def test_decision_engine_benchmark_quick(tmp_path: Path) -> None:
    """bench_inference --quick: every policy query replayed through pgmpy gives the same posterior."""
    from coact.cluster.experiments import bench_inference

    out = tmp_path / "inference.json"
    bench_inference.main(["--quick", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert {r["network"] for r in doc["networks"]} == {"asia", "banking"}
    assert all(r["max_diff"] < 1e-9 for r in doc["networks"])
    p = doc["policy"]
    assert p["max_diff"] < 1e-9 and p["queries_per_turn"] >= 2 and p["coact_turn_ms"] > 0


def test_busy_time_merges_overlapping_calls() -> None:
    from coact.cluster.experiments.bench_batching import busy_seconds

    assert busy_seconds([(0.0, 1.0, 1), (0.5, 1.5, 1), (3.0, 4.0, 8)]) == pytest.approx(2.5)
    assert busy_seconds([(0.0, 2.0, 1), (0.5, 1.0, 1)]) == pytest.approx(2.0)
