"""Sweep: concurrency x replicas per deployment x @serve.batch settings, measured against a live local app.

    python -m coact.cluster.experiments.sweep --preset quick             # 1 config, concurrency 1 2, 4 s each (tests)
    python -m coact.cluster.experiments.sweep --preset batching          # batching off/on, concurrency 1 4 16, 20 s each
    python -m coact.cluster.experiments.sweep --preset default           # batching off/on x responder replicas 1/2
    python -m coact.cluster.experiments.sweep --url http://127.0.0.1:8000 --concurrency 1 4   # attach: no redeploy

For every serving configuration the app is (re)deployed with `serve.run` of new args; for every
concurrency the closed-loop load generator runs for `--duration` seconds. Per point it records
throughput, p50/p95/p99 end-to-end latency, per-stage latency from the response trace, Serve's own
per-deployment metrics (batch size, batch compute, batch wait, time inside the replica), queueing
(stage ms seen by the ingress minus time inside the replica), CPU use and errors.
Writes `points.csv`, `turns.csv`, `meta.json` and `plots/*.png` under `--output`
(default `results/experiments/sweep/<timestamp>`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
from dataclasses import asdict, dataclass

from coact.cluster.experiments.harness import start_ray, stop_ray, write_csv
from coact.cluster.experiments.loadgen import STAGES, LoadConfig, opening_messages, run_load, write_records
from coact.cluster.experiments.machine import facts, ray_cluster_root_pids
from coact.graphs.serving.http import AppConfig

APP = "coact-sweep"
STAGE_DEPLOYMENT = {"intent": "IntentActor", "reasoner": "ReasonerActor", "decision": "DecisionActor",
                    "responder": "ResponderActor"}
_DEFAULTS = AppConfig()
# Logical CPUs per replica, as the app config asks for them (the session store ~0).
REPLICA_CPUS = {s: getattr(_DEFAULTS, s).deployment.ray_actor_options.num_cpus
                for s in ("intent", "reasoner", "decision", "responder", "ingress")}


@dataclass(frozen=True)
class ServingConfig:
    """The swept knobs (also tune_serving's search space); their defaults are the app's."""

    reasoner_replicas: int = 1
    responder_replicas: int = 1
    reasoner_max_batch_size: int = _DEFAULTS.reasoner.batching.max_batch_size
    reasoner_batch_wait_s: float = _DEFAULTS.reasoner.batching.batch_wait_timeout_s
    responder_max_batch_size: int = _DEFAULTS.responder.batching.max_batch_size
    responder_batch_wait_s: float = _DEFAULTS.responder.batching.batch_wait_timeout_s

    @property
    def label(self) -> str:
        return (f"rs{self.reasoner_replicas}x{self.reasoner_max_batch_size}@{self.reasoner_batch_wait_s:g}"
                f"-rp{self.responder_replicas}x{self.responder_max_batch_size}@{self.responder_batch_wait_s:g}")

    def cpus(self) -> float:
        r = REPLICA_CPUS
        return (r["intent"] + r["decision"] + r["ingress"] + self.reasoner_replicas * r["reasoner"]
                + self.responder_replicas * r["responder"])

    def app_args(self, base: dict) -> dict:
        """build_app args: `base` with this point's replicas and batching in the stages' sections."""
        args = copy.deepcopy(base)
        for stage in ("reasoner", "responder"):
            section = args.setdefault(stage, {})
            section.setdefault("deployment", {})["num_replicas"] = getattr(self, f"{stage}_replicas")
            section["batching"] = {"max_batch_size": getattr(self, f"{stage}_max_batch_size"),
                                   "batch_wait_timeout_s": getattr(self, f"{stage}_batch_wait_s")}
        return args


OFF = {"reasoner_max_batch_size": 1, "reasoner_batch_wait_s": 0.0, "responder_max_batch_size": 1,
       "responder_batch_wait_s": 0.0}
PRESETS: dict[str, dict] = {
    "quick": {"configs": [ServingConfig()], "concurrency": [1, 2], "duration": 4.0},
    "batching": {"configs": [ServingConfig(**OFF), ServingConfig()], "concurrency": [1, 4, 16], "duration": 20.0},
    "default": {"configs": [ServingConfig(responder_replicas=n, **b) for n in (1, 2) for b in (OFF, {})],
                "concurrency": [1, 4, 16], "duration": 30.0},
    "full": {"configs": [ServingConfig(reasoner_replicas=r, responder_replicas=n, **b)
                         for r in (1, 2) for n in (1, 2)
                         for b in (OFF, {}, {"responder_max_batch_size": 16, "responder_batch_wait_s": 0.05})],
             "concurrency": [1, 4, 16, 32], "duration": 45.0},
}


def deploy_config(args: dict, port: int, name: str = APP, route_prefix: str = "/", timeout_s: float = 600.0) -> str:
    """serve.run the app with these args (replacing the previous version); the URL once healthy.

    serve.run waits forever when replicas cannot be placed, so it runs in a thread with a deadline.
    """
    from coact.cluster.runtime import deploy

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(deploy, args, port=port, timeout_s=timeout_s, name=name, route_prefix=route_prefix)
        return fut.result(timeout=timeout_s + 30)


def flatten(cfg: ServingConfig, load: dict, serve_stats: dict) -> dict:
    """One CSV row for a sweep point."""
    s = load["summary"]
    row: dict = {"config": cfg.label, **asdict(cfg), "cpus_requested": cfg.cpus(),
                 "mode": load["config"]["mode"], "concurrency": load["config"]["concurrency"],
                 "duration_s": load["config"]["duration_s"], "wall_s": s["wall_s"], "turns": s["turns"],
                 "turns_ok": s["turns_ok"], "turns_error": s["turns_error"], "full_turns": s["full_turns"],
                 "throughput_tps": s["throughput_tps"], "reasoner_batch_trace": s["reasoner_batch"]["mean"],
                 "proxy_overhead_ms_p50": s["proxy_overhead_ms"]["p50"]}
    for q in ("p50", "p95", "p99", "mean"):
        row[f"latency_ms_{q}"] = s["latency_ms"][q]
        row[f"latency_full_ms_{q}"] = s["latency_full_turn_ms"][q]  # turns through all four stages
    for stage in STAGES:
        for q in ("p50", "p99", "mean"):
            row[f"{stage}_ms_{q}"] = s["stage_ms"][stage][q]
    for stage, dep in STAGE_DEPLOYMENT.items():
        m = serve_stats.get(dep, {})
        for key in ("batch_size_mean", "batch_exec_ms_mean", "batch_wait_ms_mean", "replica_ms_mean"):
            row[f"{stage}_{key}"] = m.get(key, float("nan"))
        # Queueing before the replica runs the request: router queue + hop (ingress-measured minus in-replica).
        row[f"{stage}_queue_ms"] = (round(s["stage_ms"][stage]["mean"] - m["replica_ms_mean"], 2)
                                    if "replica_ms_mean" in m else float("nan"))
    row.update({k: v for k, v in load["cpu"].items()})
    row["errors"] = json.dumps(s["errors"])
    return row


def run_point(url: str, cfg: ServingConfig, concurrency: int, duration: float, messages: list[str],
              port: int | None, app: str, seed: int, mode: str = "closed", rate: float = 1.0) -> tuple[dict, list]:
    from coact.cluster.experiments import serve_metrics as sm

    before = sm.scrape(port)
    load = run_load(LoadConfig(url=url, mode=mode, concurrency=concurrency, rate=rate, duration_s=duration,
                               seed=seed), messages, cpu_pids=ray_cluster_root_pids())
    s = load["summary"]
    expected = {"IntentActor": s["turns_ok"], "ReasonerActor": s["turns_ok"], "DecisionActor": s["full_turns"],
                "ResponderActor": s["full_turns"]}
    after = sm.settle(port, before, app, expected)
    return flatten(cfg, load, sm.per_deployment(before, after, app)), load["records"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="override the preset's levels")
    ap.add_argument("--duration", type=float, default=None, help="seconds per point (override)")
    ap.add_argument("--url", default=None, help="attach to this running app instead of deploying configs")
    ap.add_argument("--app-name", default=None, help="Serve application name (for its metrics; attach mode)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="the node's metrics export port (attach mode; found through Ray when connected)")
    ap.add_argument("--port", type=int, default=8021, help="HTTP port for the deployed app")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the private Ray (replicas are fractional)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--output", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from coact.cluster.jobs.common import output_dir

    args = parse_args(argv)
    preset = PRESETS[args.preset]
    levels = args.concurrency or preset["concurrency"]
    duration = args.duration or preset["duration"]
    out = output_dir("experiments/sweep", args.output)
    meta = {"facts": facts(), "preset": args.preset, "concurrency": levels, "duration_s": duration,
            "note": "2 shared cores: other work ran on this machine; read ratios and trends, not absolute times"}
    rows: list[dict] = []
    messages = opening_messages(seed=args.seed)
    started, tmp = start_ray(args.num_cpus) if args.url is None else (False, None)
    try:
        import ray

        from coact.cluster.experiments.serve_metrics import metrics_port

        mport = args.metrics_port or (metrics_port() if ray.is_initialized() else None)
        if args.url:
            runs = [(ServingConfig(), args.url.rstrip("/"), args.app_name or "coact")]
        else:
            from coact.cluster.prepare import ensure_models

            base = {"models": str(ensure_models()), "responder": {"max_new_tokens": args.max_new_tokens}}
            meta["base_args"] = base
            runs = [(c, None, APP) for c in preset["configs"]]
        for cfg, url, app in runs:
            if url is None:
                print(f"[sweep] deploying {cfg.label} ({cfg.cpus():.2f} logical CPUs)", flush=True)
                url = deploy_config(cfg.app_args(meta["base_args"]), args.port, name=app)
            for c in levels:
                row, records = run_point(url, cfg, c, duration, messages, mport, app, args.seed)
                rows.append(row)
                write_records(out / "turns.csv", records, {"config": cfg.label, "concurrency": c}, append=True)
                write_csv(out / "points.csv", rows)
                print(f"[sweep] {cfg.label} c={c}: {row['throughput_tps']:.3f} turns/s p50 {row['latency_ms_p50']:.0f}"
                      f" p99 {row['latency_ms_p99']:.0f} ms errors {row['turns_error']}", flush=True)
        if args.url is None:
            from ray import serve

            serve.delete(APP)
    finally:
        stop_ray(started, tmp)
    meta["facts_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    if not args.no_plots:
        from coact.cluster.experiments.plots import sweep_plots

        for p in sweep_plots(out / "points.csv", out / "plots"):
            print("[sweep] plot", p)
    print(f"[sweep] wrote {out}/points.csv ({len(rows)} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
