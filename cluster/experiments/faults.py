"""Faults under steady load: kill a replica of every deployment, the session store, then a GPU worker node.

A multi-node cluster on this machine (`ray.cluster_utils.Cluster`: a head and GPU worker raylets that
declare logical GPUs), the GPU-style app with two replicas of every deployment, and closed-loop HTTP
clients, each holding one multi-turn conversation. While they run, at fixed offsets:

1. `ray.kill` one replica of each deployment (Reasoner, Responder, Intent, Decision, ChatIngress);
2. `ray.kill` the session store's actor (it restarts and replays its journal);
3. `Cluster.remove_node` on the worker node holding the most Reasoner/Responder replicas (a node crash).

Recorded: every request's status code, Retry-After and latency; per fault, the requests that failed
after it and how long until every deployment had its replicas RUNNING again; at the end, every
conversation is read back from /v1/sessions and compared with the turns its client saw answered.

    python -m coact.cluster.experiments.faults --quick --out results/faults/quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import ray

from coact.actors.session_store import HEAD_RESOURCE
from coact.cluster.experiments import harness as H
from coact.cluster.experiments.autoscaling import (
    DEPLOYMENTS,
    GPU_DEPLOYMENTS,
    REPO,
    Sampler,
    cluster_nodes,
    serve_replicas,
)
from coact.cluster.runtime import free_port, init_ray, kill_leftovers, use_cluster_token, wait_healthy

SERVE_NAMESPACE = "serve"
_saved_env: dict[str, str | None] = {}  # what start_cluster changed in this process, restored by stop_cluster
KILL_ORDER = ("ReasonerActor", "ResponderActor", "IntentActor", "DecisionActor", "ChatIngress")


def start_cluster(tmp: Path, gpu_nodes: int, gpus_per_node: int):
    """Head (CPU only, holds the session store) + GPU workers, loopback only, token auth with our own token."""
    from ray.cluster_utils import Cluster

    token = uuid.uuid4().hex + uuid.uuid4().hex
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    (tmp / "ray").mkdir(exist_ok=True)  # <RAY_TMPDIR>/ray, where Cluster writes the address file
    # Raylets started here inherit this process's environment, and so do their workers: token, repo path.
    # RAY_TMPDIR: Cluster writes (and on shutdown deletes) `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`,
    # the file `ray.init("auto")` reads; in /tmp/ray it would be other local clusters' file.
    _saved_env.update({k: os.environ.get(k) for k in ("HOME", "RAY_TMPDIR")})
    os.environ.update({"HOME": str(home), "RAY_TMPDIR": str(tmp), "COACT_MODELS_DIR": str(REPO / "models"),
                       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    # ray.cluster_utils.Cluster starts raylets in this process (not `ray start --address`, which the loopback
    # flag refuses), so the head is not runtime.start_head's; its environment and token are set the same way.
    use_cluster_token(token)

    def ports() -> dict:
        return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
                "runtime_env_agent_port": free_port(), "node_ip_address": "127.0.0.1"}

    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "temp_dir": str(tmp), "gcs_server_port": free_port(),
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "object_store_memory": 200 * 1024**2, **ports()})
    workers = [cluster.add_node(num_cpus=2, num_gpus=gpus_per_node, object_store_memory=150 * 1024**2, **ports())
               for _ in range(gpu_nodes)]
    init_ray(cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    return cluster, workers, f"http://127.0.0.1:{dashboard_port}"


def app_config(port: int, args: argparse.Namespace) -> dict:
    """GPU-style config (Reasoner/Responder ask one logical GPU each), two replicas of every deployment."""
    return H.serve_config(port, {
        # The HTTP-facing replica stays on the head, beside the proxy: a worker-node crash then only
        # takes stage replicas, whose calls the ingress retries. Where it is not pinned, a crash
        # that takes an ingress replica fails its requests in flight with the proxy's 500.
        "ingress": {"deployment": {"num_replicas": 2,
                                   "ray_actor_options": {"resources": {HEAD_RESOURCE: 0.001}}}},
        "intent": {"threads": 1, "deployment": {"num_replicas": 2}},
        "decision": {"deployment": {"num_replicas": 2}},
        # One replica per node: a node crash must not take every replica of a stage at once (seen
        # without it: both Responders on the crashed node, ~50 s with no Responder, turns waiting 70 s).
        "reasoner": {"threads": 1, "deployment": {"num_replicas": 2, "max_replicas_per_node": 1,
                                                  "ray_actor_options": {"num_gpus": 1}}},
        "responder": {"generate": args.max_new_tokens > 0, "max_new_tokens": max(1, args.max_new_tokens),
                      "deployment": {"num_replicas": 2, "max_replicas_per_node": 1,
                                     "ray_actor_options": {"num_gpus": 1}}},
    })


def all_running(target: int = 2, without_replica: str | None = None, without_node: str | None = None) -> bool:
    """Every deployment back to `target` RUNNING replicas, none of them the killed one or on the dead node."""
    replicas = [r for r in serve_replicas() if r["state"] == "RUNNING"]
    if any(r["replica_id"] == without_replica or (without_node and r["node_id"] == without_node) for r in replicas):
        return False  # the controller has not noticed the loss yet
    return all(sum(1 for r in replicas if r["deployment"] == d) >= target for d in DEPLOYMENTS)


def kill_replica(deployment: str) -> dict:
    running = [r for r in serve_replicas() if r["deployment"] == deployment and r["state"] == "RUNNING"]
    victim = running[0]
    ray.kill(ray.get_actor(victim["actor_name"], namespace=SERVE_NAMESPACE), no_restart=True)
    return {"what": f"kill replica {deployment}", "target": victim["replica_id"], "node_id": victim["node_id"],
            "recovered": lambda: all_running(without_replica=victim["replica_id"])}


def store_placement() -> dict:
    from coact.actors.session_store import STORE_NAME, STORE_NAMESPACE

    return ray.get(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE).placement.remote(), timeout=60)


def kill_store() -> dict:
    from coact.actors.session_store import STORE_NAME, STORE_NAMESPACE

    before = store_placement()
    # no_restart=False: the actor's own max_restarts brings it back, as after a crash of its process.
    ray.kill(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE), no_restart=False)
    return {"what": "kill session store", "target": before["pid"], "node_id": before["node_id"],
            "sessions_before": before["sessions"], "recovered": lambda: store_placement()["pid"] != before["pid"]}


def kill_node(cluster, workers: list) -> dict:
    """Crash (no graceful drain) the worker node that holds the most GPU replicas."""
    running = [r for r in serve_replicas() if r["state"] == "RUNNING"]
    counts = Counter(r["node_id"] for r in running if r["deployment"] in GPU_DEPLOYMENTS)
    victim = max(workers, key=lambda n: counts.get(n.node_id, 0))
    cluster.remove_node(victim, allow_graceful=False)
    workers.remove(victim)
    return {"what": "kill GPU worker node", "target": victim.node_id,
            "gpu_replicas_on_it": counts.get(victim.node_id, 0),
            "replicas_on_it": dict(Counter(r["deployment"] for r in running if r["node_id"] == victim.node_id)),
            "recovered": lambda: all_running(without_node=victim.node_id)}


def attribute(records: list[H.Record], events: list[dict]) -> list[dict]:
    """Failures and latency per fault: requests that ended between a fault and the next one."""
    out = []
    for i, ev in enumerate(events):
        end = events[i + 1]["wall"] if i + 1 < len(events) else float("inf")
        rs = [r for r in records if ev["wall"] <= r.end < end]
        first_ok = min((r.end for r in records if r.status == 200 and r.start >= ev["wall"]), default=None)
        out.append({"what": ev["what"], "requests": len(rs), "codes": dict(Counter(str(r.status) for r in rs)),
                    "failed": sum(r.status != 200 for r in rs),
                    "failed_without_retry_after": sum(r.status != 200 and not r.retry_after for r in rs),
                    "in_flight_at_fault": sum(1 for r in records if r.start < ev["wall"] < r.end),
                    "max_latency_s": round(max((r.end - r.start for r in rs), default=0.0), 2),
                    "recovered_s": ev.get("recovered_s"),
                    # from the users' side: a turn sent after the fault was answered this long after it
                    "s_to_first_answered_turn": None if first_ok is None else round(first_ok - ev["wall"], 1)})
    return out


def check_sessions(url: str, load: H.ClosedLoopLoad) -> dict:
    """Every conversation a client saw answered must still be there with at least those turns."""
    import httpx

    lost, short, extra, ok = [], [], [], 0
    for sid, turns in load.ok_turns.items():
        r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=60)
        if r.status_code != 200:
            lost.append({"session_id": sid, "status": r.status_code})
            continue
        server_turns = r.json()["session"]["turns"]
        if server_turns < turns:
            short.append({"session_id": sid, "client_ok": turns, "server": server_turns})
        elif server_turns > turns:  # saved, but the answer never reached the client
            extra.append({"session_id": sid, "client_ok": turns, "server": server_turns})
        else:
            ok += 1
    return {"sessions": len(load.ok_turns), "intact": ok, "lost": lost, "fewer_turns": short,
            "more_turns_than_answered": extra}


def plot(path: Path, rows: list[dict], records: list[H.Record], events: list[dict], t0: float, interval_s: float) -> None:
    fig, axes = H.timeline_axes(3, (11, 9))
    t = [r["wall"] - t0 for r in rows]
    for dep in DEPLOYMENTS:
        axes[0].step(t, [r[f"running_{dep}"] for r in rows], where="post", label=dep)
    axes[0].step(t, [r["nodes_gpu"] for r in rows], where="post", color="black", ls="--", label="GPU nodes")
    axes[0].set_ylabel("replicas RUNNING / nodes")
    axes[0].legend(fontsize=7, ncol=3)
    buckets: dict[int, Counter] = {}
    for r in records:
        buckets.setdefault(int((r.end - t0) // interval_s), Counter())[r.status] += 1
    codes = sorted({c for b in buckets.values() for c in b})
    xs = sorted(buckets)
    bottom = [0] * len(xs)
    for code in codes:
        ys = [buckets[x].get(code, 0) for x in xs]
        axes[1].bar([(x + 0.5) * interval_s for x in xs], ys, width=interval_s * 0.9, bottom=bottom,
                    label=str(code), color={200: "tab:green", 503: "tab:orange"}.get(code, "tab:red"))
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    axes[1].set_ylabel(f"responses per {interval_s:.0f} s")
    axes[1].legend(fontsize=7, title="status")
    axes[2].scatter([r.end - t0 for r in records], [r.end - r.start for r in records], s=6,
                    c=["tab:green" if r.status == 200 else "tab:red" for r in records])
    axes[2].set_ylabel("latency s (red: not 200)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        for ev in events:
            ax.axvline(ev["wall"] - t0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    for ev in events:
        axes[0].text(ev["wall"] - t0, 0.03, ev["what"].replace("kill ", ""), rotation=90, fontsize=7,
                     va="bottom", transform=axes[0].get_xaxis_transform())
    H.save_figure(fig, path, "coact under faults: replica kills, session-store kill, worker node crash")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = H.experiment_parser(__doc__, "faults", "short gaps between faults, for the test suite")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--warmup-s", type=float, default=15.0, help="steady load before the first fault")
    p.add_argument("--gap-s", type=float, default=25.0, help="time between faults")
    p.add_argument("--tail-s", type=float, default=20.0, help="steady load after recovery from the last fault")
    p.add_argument("--recover-timeout-s", type=float, default=180.0)
    p.add_argument("--gpu-nodes", type=int, default=3)
    p.add_argument("--gpus-per-node", type=int, default=2)
    p.add_argument("--client-timeout-s", type=float, default=150.0, help="a request slower than this is a hang")
    args = H.parse_experiment(p, argv, "faults")
    if args.quick:
        args.warmup_s, args.gap_s, args.tail_s = 8.0, min(args.gap_s, 12.0), min(args.tail_s, 10.0)
        args.clients = min(args.clients, 4)
    return args


def run(args: argparse.Namespace) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="coact-ft-", dir="/tmp"))
    summary: dict = {"args": H.args_dict(args)}
    events: list[dict] = []
    cluster = sampler = load = None
    url = ""
    t0 = time.time()
    try:
        cluster, workers, dashboard = start_cluster(tmp, args.gpu_nodes, args.gpus_per_node)
        summary["s_cluster_up"] = round(time.time() - t0, 1)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = app_config(port, args)
        (args.out / "serve_config.json").write_text(json.dumps(config, indent=1))
        t_deploy = time.time()
        ServeSubmissionClient(dashboard).deploy_applications(config)
        wait_healthy(url, args.deploy_timeout_s)
        if H.wait_for(all_running, args.deploy_timeout_s, 1.0) is None:
            raise TimeoutError("not every deployment reached 2 RUNNING replicas")
        summary["s_deploy_to_ready"] = round(time.time() - t_deploy, 1)
        summary["store_at_start"] = store_placement()
        summary["head_node_id"] = next(n for n, v in cluster_nodes().items() if v["kind"] == "head")

        load = H.ClosedLoopLoad(url, args.clients, timeout_s=args.client_timeout_s)
        sampler = Sampler(load, period_s=1.0)
        t0 = sampler.t0 = time.time()
        sampler.start()
        load.start()
        events.append({"what": "steady load", "wall": time.time()})
        time.sleep(args.warmup_s)

        def fault(action) -> None:
            wall = time.time()
            ev = {"wall": wall, **action()}
            ev["t"] = round(wall - t0, 1)
            events.append(ev)
            # Capacity is back when Serve reports every deployment at full strength without the lost part.
            took = H.wait_for(ev.pop("recovered"), args.recover_timeout_s, 0.5)
            ev["recovered_s"] = None if took is None else round(time.time() - wall, 1)
            time.sleep(max(0.0, args.gap_s - (time.time() - wall)))

        for dep in KILL_ORDER:
            fault(lambda dep=dep: kill_replica(dep))
        fault(kill_store)
        events[-1]["store_after"] = store_placement()
        fault(lambda: kill_node(cluster, workers))
        time.sleep(args.tail_s)
        events.append({"what": "end", "wall": time.time()})
        load.stop()
        sampler.stop()
        summary["sessions"] = check_sessions(url, load)
        summary["store_at_end"] = store_placement()
    finally:
        if load is not None:
            load.stop()
        if sampler is not None:
            sampler.stop()
        summary["stop"] = stop_cluster(cluster, tmp)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    records = load.records
    faults = [e for e in events if e["what"] not in ("steady load", "end")]
    non_200 = [r for r in records if r.status != 200]
    summary["events"] = [{k: v for k, v in e.items() if k != "wall"} for e in events]
    summary["per_fault"] = attribute(records, events[:-1])
    summary["requests"] = {
        "total": len(records), "codes": {str(k): v for k, v in Counter(r.status for r in records).items()},
        "failed": len(non_200),
        "failed_without_retry_after": sum(1 for r in non_200 if not r.retry_after),
        "errors": dict(Counter(r.error[:80] for r in non_200)),
        "max_latency_s": round(max((r.end - r.start for r in records), default=0.0), 2),
        "client_timeout_s": args.client_timeout_s,
    }
    summary["recovery_s"] = {e["what"]: e.get("recovered_s") for e in faults}
    summary["sampler_errors"] = sampler.errors[:20] if sampler else []
    lat = H.latency_by_interval(records, t0, args.interval_s)
    H.write_csv(args.out / "requests.csv", [{"client": r.client, "start": round(r.start - t0, 3),
                                           "end": round(r.end - t0, 3), "status": r.status,
                                           "retry_after": r.retry_after, "error": r.error} for r in records])
    H.write_csv(args.out / "timeline.csv", [{k: v for k, v in r.items() if k != "wall"} for r in sampler.rows])
    H.write_csv(args.out / "latency.csv", H.interval_rows(lat, args.interval_s))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(args.out / "faults.png", sampler.rows, records, events[1:-1], t0, args.interval_s)
    return summary


def stop_cluster(cluster, tmp: Path) -> dict:
    """Driver first, then every node we started (Cluster.shutdown kills by PID), then stragglers in tmp."""
    from ray import serve

    report: dict = {}
    if ray.is_initialized():
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - the cluster may already be half gone
            report["serve_shutdown_error"] = repr(e)[:200]
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    report["leftover_killed"] = kill_leftovers(str(tmp), wait_s=0)["leftover_killed"]
    for key, value in _saved_env.items():  # e.g. matplotlib must not write into the private HOME
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return report


main = H.experiment_main(parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
