"""Autoscaling across nodes on one machine: Serve asks for GPU replicas, Ray's autoscaler adds "GPU" nodes.

A private head runs under Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=…`): the real autoscaler launches and terminates worker "nodes" as local raylets.
Node types: the head (CPU only), CPU workers and GPU workers that declare logical GPUs. The GPU-style
application (Reasoner and Responder ask `num_gpus`, both autoscale) is deployed, closed-loop HTTP load is
driven, and a sampler records replicas per deployment, nodes per type, requests in flight and latency.

    python -m coact.cluster.experiments.autoscaling --quick --out results/autoscaling/quick

Everything started here is stopped by PID (never `ray stop`): the head's `ray start --block` process
group, then any process left whose command line names this run's private temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray

from coact.cluster.experiments.harness import (
    ClosedLoopLoad,
    Record,
    args_dict,
    experiment_main,
    experiment_parser,
    interval_rows,
    latency_by_interval,
    parse_experiment,
    percentile,
    save_figure,
    serve_config,
    timeline_axes,
    wait_for,
    write_csv,
)
from coact.cluster.runtime import (
    PrivateHead,
    free_port,
    init_ray,
    kill_leftovers,
    start_head,
    use_cluster_token,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[2]
APP = "coact"
GPU_DEPLOYMENTS = ("ReasonerActor", "ResponderActor")
DEPLOYMENTS = ("ChatIngress", "IntentActor", "ReasonerActor", "DecisionActor", "ResponderActor")


# --- the private cluster ----------------------------------------------------------------------


@dataclass
class FakeAutoscalingCluster:
    """``runtime.start_head`` under the fake multi-node provider: private temp dir, HOME and token; stopped by PID."""

    node_types: dict
    head_cpus: float = 2
    idle_timeout_minutes: float = 0.25
    upscaling_speed: float = 2.0
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="coact-as-", dir="/tmp")))
    gcs_port: int = field(default_factory=free_port)
    head: PrivateHead | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        assert self.head is not None, "start() first"
        return self.head.dashboard_url

    def config(self) -> dict:
        head = {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": f"coact-{self.tmp.name}",
            "max_workers": sum(t["max_workers"] for t in self.node_types.values()),
            "provider": {
                "type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True,
            },
            "available_node_types": {"ray.head.default": head, **self.node_types},
            "head_node_type": "ray.head.default",
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout_s: float = 120.0) -> None:
        cfg = self.tmp / "autoscaling.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        # The fake nodes inherit the head's environment: every replica imports the app from the repo.
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "COACT_MODELS_DIR": str(REPO / "models"),
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.head = start_head(self.head_cpus, 0, env=env, cwd=REPO, timeout_s=timeout_s, port=self.gcs_port,
                               root=self.tmp, extra_args=["--autoscaling-config", str(cfg)])

    def connect(self) -> None:
        """Attach this process as a driver with the cluster's token."""
        assert self.head is not None, "start() first"
        use_cluster_token(self.head.token)
        init_ray(self.address, _node_ip_address="127.0.0.1", log_to_driver=False)

    def stop(self) -> dict:
        """Stop the head and every fake node it spawned; returns what had to be cleaned up."""
        report: dict = {"head_exit": None, "leftover_killed": []}
        if ray.is_initialized():
            try:  # replicas first, through Serve, so nothing is mid-request when the nodes go
                from ray import serve

                serve.shutdown()
            except Exception as e:  # noqa: BLE001 - the cluster may be half gone already
                report["serve_shutdown_error"] = repr(e)[:200]
            ray.shutdown()
        if self.head is not None:
            report["sigkilled"] = self.head.stop(cleanup=False)
            report["head_exit"] = self.head.proc.returncode
        # Fake worker raylets and their workers name this run's temp folder in their command line.
        report.update(kill_leftovers(str(self.tmp)))
        return report

    def cleanup_files(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- load and sampling ------------------------------------------------------------------------


def node_kind(resources: dict) -> str:
    if "node:__internal_head__" in resources:
        return "head"
    return "gpu" if resources.get("GPU", 0) > 0 else "cpu"


def cluster_nodes() -> dict[str, dict]:
    """Alive nodes: id -> {kind, resources}."""
    return {n["NodeID"]: {"kind": node_kind(n["Resources"]), "resources": n["Resources"]}
            for n in ray.nodes() if n["Alive"]}


def serve_replicas(app: str = APP) -> list[dict]:
    """Every replica of the app with its state and node, from Serve's own status (the controller)."""
    from ray.serve.context import _get_global_client  # the same source `serve status` reads

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return []
    details = client.get_serve_details()
    out = []
    for dep_name, dep in details.get("applications", {}).get(app, {}).get("deployments", {}).items():
        for r in dep.get("replicas", []):
            out.append({"deployment": dep_name, "replica_id": r.get("replica_id"), "state": r.get("state"),
                        "node_id": r.get("node_id"), "actor_name": r.get("actor_name")})
    return out


class Sampler:
    """Every `period_s`: replicas RUNNING per deployment, nodes per kind, requests in flight, placement."""

    def __init__(self, load: ClosedLoopLoad | None, period_s: float = 1.0) -> None:
        self.load, self.period_s = load, period_s
        self.rows: list[dict] = []
        self.placements: list[dict] = []  # (replica, node kind, node resources) seen, for the placement check
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.time()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def sample(self) -> dict:
        nodes = cluster_nodes()
        replicas = serve_replicas()
        row = {"t": round(time.time() - self.t0, 2), "wall": time.time(),
               "in_flight": self.load.in_flight if self.load else 0}
        for kind in ("head", "cpu", "gpu"):
            row[f"nodes_{kind}"] = sum(1 for n in nodes.values() if n["kind"] == kind)
        for dep in DEPLOYMENTS:
            row[f"running_{dep}"] = sum(1 for r in replicas if r["deployment"] == dep and r["state"] == "RUNNING")
            row[f"replicas_{dep}"] = sum(1 for r in replicas if r["deployment"] == dep)
        seen = {(p["replica_id"], p["node_id"]) for p in self.placements}
        for r in replicas:
            if r["state"] == "RUNNING" and r["node_id"] and (r["replica_id"], r["node_id"]) not in seen:
                node = nodes.get(r["node_id"], {"kind": "gone", "resources": {}})
                self.placements.append({**r, "node_kind": node["kind"], "node_gpus": node["resources"].get("GPU", 0),
                                        "t": row["t"]})
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.rows.append(self.sample())
            except Exception as e:  # noqa: BLE001 - a missed sample must not end the experiment
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))


# --- the experiment -----------------------------------------------------------------------------


def app_config(port: int, args: argparse.Namespace) -> dict:
    """The GPU-style Serve config (cf. cluster/serve/gpu.yaml) with short autoscaling delays."""
    def autoscaling(max_replicas: int, target: float) -> dict:
        return {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
                "target_ongoing_requests": target, "upscale_delay_s": args.upscale_delay_s,
                "downscale_delay_s": args.downscale_delay_s, "look_back_period_s": args.look_back_s,
                "metrics_interval_s": 1.0}

    return serve_config(port, {
        "intent": {"threads": 1},
        "reasoner": {"threads": 1, "deployment": {
            "ray_actor_options": {"num_gpus": 1},
            "autoscaling_config": autoscaling(args.max_reasoners, args.reasoner_target)}},
        "responder": {"generate": args.max_new_tokens > 0, "max_new_tokens": max(1, args.max_new_tokens),
                      "deployment": {"ray_actor_options": {"num_gpus": 1},
                                     "autoscaling_config": autoscaling(args.max_responders,
                                                                       args.responder_target)}},
    })


def node_types(args: argparse.Namespace) -> dict:
    store = 150 * 1024**2
    return {
        "cpu.worker": {"resources": {"CPU": 2, "object_store_memory": store}, "node_config": {},
                       "min_workers": 0, "max_workers": args.max_cpu_nodes},
        "gpu.worker": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": store}, "node_config": {},
                       "min_workers": 0, "max_workers": args.max_gpu_nodes},
    }


def summarise(rows: list[dict], records: list[Record], placements: list[dict], marks: dict) -> dict:
    """The timeline's figures: when nodes and replicas came and went relative to the load."""
    t_load, t_stop = marks["load_start"], marks["load_stop"]
    before = [r for r in rows if r["wall"] <= t_load]
    base_gpu = before[-1]["nodes_gpu"] if before else rows[0]["nodes_gpu"]
    base_rep = {d: (before[-1] if before else rows[0])[f"running_{d}"] for d in GPU_DEPLOYMENTS}
    during = [r for r in rows if t_load < r["wall"] <= t_stop + 5]
    after = [r for r in rows if r["wall"] > t_stop]

    def first(rs: list[dict], cond) -> float | None:
        return next((round(r["wall"] - rs_ref, 1) for r in rs if cond(r)), None) if rs else None

    rs_ref = t_load
    peak_gpu = max((r["nodes_gpu"] for r in during), default=base_gpu)
    peak_rep = {d: max((r[f"running_{d}"] for r in during), default=base_rep[d]) for d in GPU_DEPLOYMENTS}
    out = {
        "gpu_nodes_before_load": base_gpu, "gpu_nodes_peak": peak_gpu,
        "replicas_before_load": base_rep, "replicas_peak": peak_rep,
        # replicas Serve holds in any state (starting, running, stopping): a replica it asked for may be
        # withdrawn before it runs when its start outlasts the downscale delay
        "replicas_requested_peak": {d: max((r[f"replicas_{d}"] for r in during), default=0) for d in GPU_DEPLOYMENTS},
        "s_load_to_first_new_gpu_node": first(during, lambda r: r["nodes_gpu"] > base_gpu),
        "s_load_to_first_new_replica_running": first(
            during, lambda r: any(r[f"running_{d}"] > base_rep[d] for d in GPU_DEPLOYMENTS)),
        "s_load_to_peak_replicas_running": first(
            during, lambda r: all(r[f"running_{d}"] >= peak_rep[d] for d in GPU_DEPLOYMENTS)),
    }
    rs_ref = t_stop
    out["s_stop_to_replicas_at_min"] = first(
        after, lambda r: all(r[f"replicas_{d}"] <= 1 for d in GPU_DEPLOYMENTS))
    out["s_stop_to_gpu_nodes_at_base"] = first(
        after, lambda r: r["nodes_gpu"] <= base_gpu and all(r[f"replicas_{d}"] <= 1 for d in GPU_DEPLOYMENTS))
    out["gpu_nodes_end"] = rows[-1]["nodes_gpu"] if rows else None
    out["cpu_nodes_max"] = max((r["nodes_cpu"] for r in rows), default=0)
    gpu_placed = [p for p in placements if p["deployment"] in GPU_DEPLOYMENTS]
    out["gpu_replicas_placed"] = len(gpu_placed)
    out["gpu_replicas_on_nodes_without_gpu"] = [p for p in gpu_placed if p["node_gpus"] < 1]
    out["gpu_replica_nodes"] = sorted({p["node_id"] for p in gpu_placed})
    codes = Counter(r.status for r in records)
    lat = [r.end - r.start for r in records if r.status == 200]
    out["requests"] = {"total": len(records), "codes": {str(k): v for k, v in codes.items()},
                       "p50_s": round(percentile(lat, 50, "higher"), 3) if lat else None,
                       "max_s": round(max(r.end - r.start for r in records), 3) if records else None}
    return out


def plot_timeline(path: Path, rows: list[dict], lat: dict[int, dict], interval_s: float, marks: dict,
                  t0: float, title: str) -> None:
    t = [r["wall"] - t0 for r in rows]
    fig, axes = timeline_axes(4, (10, 10))
    for dep in DEPLOYMENTS:
        if any(r[f"replicas_{dep}"] for r in rows):
            line, = axes[0].step(t, [r[f"running_{dep}"] for r in rows], where="post", label=dep)
            if dep in GPU_DEPLOYMENTS:  # what Serve asked for, starting replicas included
                axes[0].step(t, [r[f"replicas_{dep}"] for r in rows], where="post", ls="--", lw=0.8,
                             color=line.get_color(), label=f"{dep} requested")
    axes[0].set_ylabel("replicas RUNNING")
    for kind in ("head", "cpu", "gpu"):
        axes[1].step(t, [r[f"nodes_{kind}"] for r in rows], where="post", label=f"{kind} nodes")
    axes[1].set_ylabel("nodes alive")
    axes[2].plot(t, [r["in_flight"] for r in rows], color="tab:purple")
    axes[2].set_ylabel("requests in flight")
    xs = [(k + 0.5) * interval_s for k in lat]
    axes[3].plot(xs, [v["p50_ms"] for v in lat.values()], "o-", label="p50")
    axes[3].plot(xs, [v["p99_ms"] for v in lat.values()], "s--", label="p99")
    axes[3].set_ylabel(f"latency ms (per {interval_s:.0f} s)")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        for when in marks.values():
            ax.axvline(when - t0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    for name, when in marks.items():
        axes[0].text(when - t0, 0.03, name, rotation=90, fontsize=7, va="bottom",
                     transform=axes[0].get_xaxis_transform())
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    save_figure(fig, path, title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = experiment_parser(__doc__, "autoscaling", "short phases for the test suite")
    for flag, kind, default, help_ in (
        ("--clients", int, 8, "closed-loop HTTP clients during the load phase"),
        ("--load-s", float, 90.0, "minimum load phase"),
        ("--load-max-s", float, 300.0, "longest load phase, waiting for the scale-up"),
        ("--hold-s", float, 15.0, "load kept on after the scale-up was seen"),
        ("--cooldown-s", float, 150.0, "max wait for scale-down after the load"),
        ("--reasoner-target", float, 0.5,
         "target_ongoing_requests (the Reasoner is fast: few requests are ever in it)"),
        ("--idle-timeout-min", float, 0.25,
         "autoscaler idle_timeout_minutes (shorter churns: a new node can idle out before its replica lands)"),
        ("--idle-before-s", float, 10.0, None), ("--responder-target", float, 2.0, None),
        ("--upscale-delay-s", float, 2.0, None), ("--downscale-delay-s", float, 8.0, None),
        ("--look-back-s", float, 5.0, None), ("--max-reasoners", int, 2, None), ("--max-responders", int, 3, None),
        ("--max-gpu-nodes", int, 5, None), ("--max-cpu-nodes", int, 2, None),
    ):
        p.add_argument(flag, type=kind, default=default, help=help_)
    args = parse_experiment(p, argv, "autoscaling")
    if args.quick:
        args.load_s, args.idle_before_s, args.cooldown_s = min(args.load_s, 30.0), 3.0, min(args.cooldown_s, 120.0)
        args.hold_s, args.downscale_delay_s = min(args.hold_s, 5.0), min(args.downscale_delay_s, 5.0)
        args.clients = min(args.clients, 6)
        args.max_responders = min(args.max_responders, 2)
        args.interval_s = min(args.interval_s, 5.0)
    return args


def run(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = FakeAutoscalingCluster(node_types=node_types(args), idle_timeout_minutes=args.idle_timeout_min)
    marks: dict[str, float] = {}
    summary: dict = {"args": args_dict(args),
                     "tmp": str(cluster.tmp)}
    t_begin = time.time()
    sampler: Sampler | None = None
    load: ClosedLoopLoad | None = None
    try:
        cluster.start()
        summary["s_head_up"] = round(time.time() - t_begin, 1)
        cluster.connect()
        port = free_port()
        load = ClosedLoopLoad(f"http://127.0.0.1:{port}", args.clients)
        sampler = Sampler(load, period_s=1.0)
        marks["deploy"] = time.time()
        config = app_config(port, args)
        (args.out / "serve_config.json").write_text(json.dumps(config, indent=1))
        # Sample from the start: the deploy itself makes the autoscaler launch the first GPU nodes.
        started = False
        deploy_error: Exception | None = None
        try:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            ServeSubmissionClient(cluster.dashboard_url).deploy_applications(config)
            wait_for(lambda: bool(serve_replicas()), 120, 1.0)  # controller + app registered
            sampler.start()
            started = True
            wait_healthy(load.url, args.deploy_timeout_s)
        except Exception as e:  # noqa: BLE001 - recorded in the summary, then re-raised after cleanup
            deploy_error = e
        if not started:
            sampler.start()
        if deploy_error:
            raise deploy_error
        # /healthz answers once the ingress and the store are up; the stages may still be loading models.
        if wait_for(lambda: all(sampler.rows and sampler.rows[-1][f"running_{d}"] >= 1 for d in DEPLOYMENTS),
                    args.deploy_timeout_s, 1.0) is None:
            raise TimeoutError("not every deployment had a RUNNING replica in time")
        marks["ready"] = time.time()
        summary["s_deploy_to_ready"] = round(marks["ready"] - marks["deploy"], 1)
        time.sleep(args.idle_before_s)
        base_gpu = sampler.rows[-1]["nodes_gpu"]
        marks["load_start"] = time.time()
        load.start()

        def scaled_up() -> bool:
            row = sampler.rows[-1]
            return row["nodes_gpu"] > base_gpu and any(row[f"running_{d}"] > 1 for d in GPU_DEPLOYMENTS)

        # At least --load-s of load; longer (up to --load-max-s) until a replica on a new GPU node serves,
        # so that a slow, shared machine shows the same sequence, only stretched.
        time.sleep(args.load_s)
        if wait_for(scaled_up, max(0.0, args.load_max_s - args.load_s), 1.0) is not None:
            marks["scaled_up"] = time.time()
            time.sleep(args.hold_s)
        marks["load_stop"] = time.time()
        load.stop()
        # Scale-down: replicas back to min, then the autoscaler removes the idle GPU nodes.
        def scaled_down() -> bool:
            row = sampler.rows[-1]
            return row["wall"] > marks["load_stop"] and row["nodes_gpu"] <= base_gpu and all(
                row[f"replicas_{d}"] <= 1 for d in GPU_DEPLOYMENTS)

        wait_for(scaled_down, args.cooldown_s, 1.0)
        time.sleep(2)
        marks["end"] = time.time()
    finally:
        if sampler is not None:
            sampler.stop()
        if load is not None:
            load.stop()
        summary["stop"] = cluster.stop()
        if not args.keep_tmp:
            cluster.cleanup_files()
    rows = sampler.rows if sampler else []
    records = load.records if load else []
    t0 = marks.get("deploy", t_begin)
    lat = latency_by_interval(records, t0, args.interval_s)
    write_csv(args.out / "timeline.csv", [{k: v for k, v in r.items() if k != "wall"} for r in rows])
    write_csv(args.out / "latency.csv", interval_rows(lat, args.interval_s))
    write_csv(args.out / "requests.csv", [{"client": r.client, "start": round(r.start - t0, 3),
                                           "end": round(r.end - t0, 3), "status": r.status, "error": r.error}
                                          for r in records])
    write_csv(args.out / "placements.csv", sampler.placements if sampler else [])
    summary.update(summarise(rows, records, sampler.placements if sampler else [], marks) if rows and
                   "load_stop" in marks else {})
    summary["marks_s"] = {k: round(v - t0, 1) for k, v in marks.items()}
    summary["sampler_errors"] = (sampler.errors if sampler else [])[:20]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if rows:
        plot_timeline(args.out / "timeline.png", rows, lat, args.interval_s,
                      {k: v for k, v in marks.items() if k != "end"}, t0,
                      "coact on a fake autoscaling cluster: GPU replicas and nodes under load")
    return summary


main = experiment_main(parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
