"""Ray Tune over the serving configuration: maximise throughput subject to a p99 latency target.

    python -m coact.cluster.experiments.tune_serving --quick                  # 2 trials, a few seconds of load each
    python -m coact.cluster.experiments.tune_serving --num-samples 12 --p99-s 20 --concurrency 8 --duration 30

Searched: batch size and batch wait of ReasonerActor and ResponderActor, replicas of each, within a
logical-CPU budget (a configuration over budget is reported infeasible without deploying). Trials run
one at a time against one live local app: each trial redeploys it with `serve.run` of its args
(application `coact-tune`, route prefix `/tune`), runs the closed-loop load generator, and reports
throughput and latency. Score: turns/s when p99 <= target, otherwise -p99/target (always worse).
Writes `results.csv`, `best_config.json`, `meta.json` under `--output`
(default `results/experiments/tune_serving/<timestamp>`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coact.cluster.experiments.harness import DRY_RUN_ACTIONS, start_ray, stop_ray
from coact.cluster.experiments.machine import facts
from coact.cluster.experiments.sweep import ServingConfig, deploy_config

APP = "coact-tune"
ROUTE = "/tune"
KNOBS = ("reasoner_replicas", "responder_replicas", "reasoner_max_batch_size", "reasoner_batch_wait_s",
         "responder_max_batch_size", "responder_batch_wait_s")


def search_space(quick: bool) -> dict:
    from ray import tune

    if quick:  # the smallest comparison that means something: responder batching off vs on
        return {"responder_max_batch_size": tune.grid_search([1, 8]), "responder_batch_wait_s": 0.02}
    return {
        "reasoner_replicas": tune.choice([1, 2]),
        "responder_replicas": tune.choice([1, 2, 3]),
        "reasoner_max_batch_size": tune.choice([1, 8, 32]),
        "reasoner_batch_wait_s": tune.choice([0.0, 0.005, 0.02]),
        "responder_max_batch_size": tune.choice([1, 4, 8, 16]),
        "responder_batch_wait_s": tune.choice([0.0, 0.02, 0.05]),
    }


def score(throughput: float, p99_s: float, target_s: float, errors: int) -> float:
    if errors or p99_s != p99_s:  # errors or no turn finished: infeasible
        return -1e9
    return throughput if p99_s <= target_s else -p99_s / target_s


def trial(config: dict, *, base_args: dict, port: int, load: dict, p99_s: float, cpu_budget: float) -> None:
    from ray import tune

    from coact.cluster.experiments.loadgen import LoadConfig, run_load

    cfg = ServingConfig(**{k: config[k] for k in KNOBS if k in config})
    if cfg.cpus() > cpu_budget:
        tune.report({"score": -1e9, "feasible": False, "cpus": cfg.cpus()})
        return
    url = deploy_config(cfg.app_args(base_args), port, name=APP, route_prefix=ROUTE)
    res = run_load(LoadConfig(url=url, **load))
    s = res["summary"]
    p99 = s["latency_ms"]["p99"] / 1000
    tune.report({"score": score(s["throughput_tps"], p99, p99_s, s["turns_error"]), "feasible": True,
                 "cpus": cfg.cpus(), "throughput_tps": s["throughput_tps"], "p50_s": s["latency_ms"]["p50"] / 1000,
                 "p99_s": p99, "turns": s["turns"], "turns_error": s["turns_error"],
                 "reasoner_batch": s["reasoner_batch"]["mean"], "label": cfg.label})


def run(args: argparse.Namespace, out: Path) -> dict:
    import ray
    from ray import serve, tune

    from coact.cluster.prepare import ensure_models

    base = {"models": str(ensure_models()), "responder": {"max_new_tokens": args.max_new_tokens}, **DRY_RUN_ACTIONS}
    # Serve's controller must exist before the trials: created from inside a trial it would be placed in the
    # trial's placement group, which Ray refuses. Trials then only connect to it.
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    load = {"mode": "closed", "concurrency": args.concurrency, "duration_s": args.duration, "seed": args.seed,
            "drain_s": args.drain_s}
    fn = tune.with_parameters(trial, base_args=base, port=args.port, load=load, p99_s=args.p99_s,
                              cpu_budget=args.cpu_budget)
    space = search_space(args.quick)
    # Defaults for the knobs a quick grid leaves out: the app's own defaults.
    defaults = ServingConfig()
    space = {k: space.get(k, getattr(defaults, k)) for k in KNOBS}
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 0.1}),  # the trial only drives HTTP load; the app holds the CPUs
        param_space=space,
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=1 if args.quick else args.num_samples,
                                    max_concurrent_trials=1, search_alg=None),
        run_config=tune.RunConfig(storage_path=str(out / "tune"), name="serving", verbose=args.verbose),
    )
    grid = tuner.fit()
    df = grid.get_dataframe()
    cols = [c for c in df.columns if c.startswith("config/") or c in (
        "score", "feasible", "cpus", "throughput_tps", "p50_s", "p99_s", "turns", "turns_error", "reasoner_batch",
        "label")]
    df[cols].to_csv(out / "results.csv", index=False)
    best = grid.get_best_result()
    best_doc = {"config": {k: best.config[k] for k in KNOBS}, "metrics": {k: best.metrics.get(k) for k in (
        "score", "throughput_tps", "p50_s", "p99_s", "turns", "label")}, "p99_target_s": args.p99_s}
    (out / "best_config.json").write_text(json.dumps(best_doc, indent=2, default=str))
    if ray.is_initialized():
        try:
            serve.delete(APP)
        except Exception as e:  # the app may never have been deployed (every trial infeasible)
            print(f"[tune_serving] serve.delete({APP}): {e}")
    return best_doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 trials (responder batching off/on), 4 s of load each")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--p99-s", type=float, default=20.0, help="p99 turn latency target (seconds)")
    ap.add_argument("--cpu-budget", type=float, default=2.0, help="logical CPUs the app's replicas may ask for")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds of load per trial")
    ap.add_argument("--drain-s", type=float, default=60.0)
    ap.add_argument("--port", type=int, default=8031)
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    args.concurrency = args.concurrency or (2 if args.quick else 8)
    args.duration = args.duration or (4.0 if args.quick else 30.0)
    return args


def main(argv: list[str] | None = None) -> int:
    from coact.cluster.jobs.common import output_dir

    args = parse_args(argv)
    out = output_dir("experiments/tune_serving", args.output)
    started, tmp = start_ray(args.num_cpus)
    try:
        best = run(args, out)
    finally:
        stop_ray(started, tmp)
    (out / "meta.json").write_text(json.dumps({"facts": facts(), "args": vars(args)}, indent=2, default=str))
    print(json.dumps(best, indent=1, default=str))
    print(f"[tune_serving] wrote {out}/results.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
