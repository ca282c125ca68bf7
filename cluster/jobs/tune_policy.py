"""Tune the decision policy's utility weights with Ray Tune on simulated conversations.

Simulated users (``graphs.simulator``: hidden state forward-sampled from the domain's Bayesian network,
a held-out BANKING77 / CLINC150 utterance of their goal, yes/no answers through the network's CPTs) talk
to the policy; Ray Tune searches the utility weights and the question cost, ASHA stops bad trials early.

Objective per trial (maximised), over the trial's dialogues so far::

    objective = success - TURN_PENALTY * mean_turns - ESCALATION_PENALTY * escalation_rate

with ``TURN_PENALTY = 0.1`` (an extra question in every conversation must buy at least 10 points of task
success) and ``ESCALATION_PENALTY = 0.5`` (a hand-over costs half a success on top of not being one:
escalation is never the oracle's action under the default utilities, but it occupies a human agent).

Protocol, all seeded:

1. The held-out texts are split per goal into a *tuning* half and an *evaluation* half.
2. Every trial runs ``--dialogues`` conversations on tuning-half users, reported to Tune in ``--chunks``
   chunks (cumulative metrics after each chunk). Chunk ``k`` uses the same users in every trial (common
   random numbers), so trials differ only by their weights. The default weights are the first trial.
3. Selection encodes the target (more success at equal or fewer turns): the tuned weights are those of the
   trial with the highest objective among the trials that ran all chunks *and*, on the tuning users, reach
   a higher success than the default weights at equal or fewer mean turns (the defaults are re-run in the
   driver on exactly those users). When no trial qualifies, the defaults are kept (and reported as such).
4. The tuned weights are evaluated against the pack's default weights and the oracle on
   ``--eval-dialogues`` *fresh* users (another seed stream) who type texts from the evaluation half only.
   Success, turns, escalations and regret are scored under the pack's default utilities (see
   ``graphs.simulator`` for the exact definitions); tuned-minus-default differences are paired (same users)
   and reported with their standard errors.

Artefacts in ``--output`` (default ``$COACT_RESULTS_DIR`` or ``<repo>/results``, then
``tune_policy/<timestamp>``): ``results.csv`` (every trial: its
weights and last reported metrics), ``best_weights.json`` (``{"weights": {...}}``, usable as the
DecisionActor's ``user_config``), ``comparison.json``, and Tune's own folder ``tune/``.

    python -m cluster.jobs.tune_policy --num-samples 24 --dialogues 600
    python -m cluster.jobs.tune_policy --smoke
    ray job submit --working-dir . -- python -m cluster.jobs.tune_policy --output /abs/out --models-dir /abs/models

Under ``ray job submit`` the uploaded working directory does not carry the git-ignored ``models/`` and
``results/`` folders: pass ``--models-dir`` (or ``COACT_MODELS_DIR``) and an absolute ``--output`` (or
``COACT_RESULTS_DIR``) through the command line or the runtime env.
Per-trial metrics are deterministic; ASHA's stopping decisions depend on the order in which concurrent
trials report, so only ``--max-concurrent 1`` makes the whole tuning run (which trials stop) repeatable
(checked: two such runs give identical results.csv and comparison.json).

Seen on the banking pack (2 shared cores): ``--num-samples 24 --dialogues 600`` keeps the defaults (no trial
clears both bars; the gains on offer, about one point of success, are the size of a 600-dialogue trial's
noise); ``--num-samples 48 --dialogues 1500`` (about 3 minutes) meets the target on held-out users: success
+1.4 points, slightly fewer turns, escalations 3.4% -> 0.3%, but fewer at-risk cards frozen (the success
objective counts every conversation alike; at-risk users are about 5% of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

TURN_PENALTY = 0.1
ESCALATION_PENALTY = 0.5
METRIC = "objective"
TRIAL_CPUS = 0.5

# Tuned weights and their search ranges. answer_correct stays at the pack's value: utilities are only
# defined up to a positive scale, so one weight is the unit. Each range keeps the weight's meaning (a wrong
# answer is bad, freezing a card at risk is good, ...) and spans roughly 0.1x to 2.5x the hand-set value;
# escalation may become a net cost, which the hand-set values never allow.
SEARCH_SPACE: dict[str, tuple[str, float, float]] = {
    "answer_wrong": ("uniform", -10.0, -0.5),
    "risk_unaddressed": ("uniform", -25.0, -4.0),
    "freeze_at_risk": ("uniform", 4.0, 25.0),
    "freeze_needless": ("uniform", -15.0, -1.0),
    "escalate_base": ("uniform", -6.0, 3.0),
    "escalate_upset": ("uniform", 0.0, 10.0),
    "decline_oos": ("uniform", 2.0, 15.0),
    "decline_in_scope": ("uniform", -15.0, -2.0),
    "question_cost": ("loguniform", 0.1, 4.0),
}
SMOKE = {"num_samples": 2, "dialogues": 40, "chunks": 2, "eval_dialogues": 100}
DEFAULTS = {"num_samples": 24, "dialogues": 600, "chunks": 6, "eval_dialogues": 3000}
SUMMARY_COLUMNS = ("success", "mean_turns", "escalation_rate", "regret", "question_rate", "timeout_rate")


def log(msg: str) -> None:
    print(f"[tune_policy] {msg}", flush=True)


def objective(summary: dict[str, float]) -> float:
    return float(summary["success"] - TURN_PENALTY * summary["mean_turns"]
                 - ESCALATION_PENALTY * summary["escalation_rate"])


def chunk_sizes(total: int, chunks: int) -> list[int]:
    chunks = max(1, min(int(chunks), int(total)))
    base, extra = divmod(int(total), chunks)
    return [base + (1 if k < extra else 0) for k in range(chunks)]


def param_space() -> dict[str, Any]:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    return {name: make[kind](lo, hi) for name, (kind, lo, hi) in SEARCH_SPACE.items()}


def weights_of(config: dict[str, Any]) -> dict[str, float]:
    return {k: float(config[k]) for k in SEARCH_SPACE if k in config}


# ------------------------------------------------------------------------------------ trainable
def tune_trial(config: dict[str, Any], bank: Any = None, pack: Any = None, seed: int = 0, dialogues: int = 600,
               chunks: int = 6, max_turns: int = 6) -> None:
    """One Tune trial: the policy with ``config``'s weights on ``dialogues`` tuning users, reported per chunk."""
    from ray import tune

    from graphs.simulator import PolicyAgent, SimulationResult, Simulator

    sim = Simulator(pack, bank, max_turns=max_turns)
    agent = PolicyAgent(pack, weights_of(config))
    parts = []
    done = 0
    for k, size in enumerate(chunk_sizes(dialogues, chunks)):
        parts.append(sim.run(agent, n=size, seed=seed, stream=f"tune-{k}"))
        done += size
        summary = SimulationResult.concat(parts).summary()
        tune.report({METRIC: objective(summary), "dialogues": done,
                     **{c: summary[c] for c in SUMMARY_COLUMNS}})


# ------------------------------------------------------------------------------------ ray
def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Attach to Ray or start a local one; True when this call started (or connected) the driver."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False  # someone else's cluster (a test fixture, a notebook): reuse it, leave it running
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init()  # inside `ray job submit`: attach to the job's cluster
    else:
        # address="local": a fresh local Ray even when another one runs on this machine (plain ray.init()
        # would attach to the latest cluster started with `ray start`).
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus)
    return True


def run_tuning(args: argparse.Namespace, pack: Any, bank_tune: Any, storage: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    defaults = {k: float(pack.utilities.weights[k]) for k in SEARCH_SPACE}
    trainable = tune.with_parameters(tune_trial, bank=bank_tune, pack=pack, seed=args.seed,
                                     dialogues=args.dialogues, chunks=args.chunks, max_turns=args.max_turns)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPUS}),
        param_space=param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=args.num_samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=[defaults], random_state=args.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.chunks,
                                    grace_period=min(2, args.chunks), reduction_factor=3),
            max_concurrent_trials=args.max_concurrent or None,
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name="tune", verbose=args.verbose),
    )
    return tuner.fit()


def trial_table(grid: Any, chunks: int) -> list[dict[str, Any]]:
    rows = []
    for i, result in enumerate(grid):
        m = result.metrics or {}
        iters = int(m.get("training_iteration", 0))
        rows.append({
            "trial": i,
            "trial_id": m.get("trial_id", ""),
            "status": "error" if result.error else ("completed" if iters >= chunks else "stopped_early"),
            "iterations": iters,
            "dialogues": int(m.get("dialogues", 0)),
            METRIC: m.get(METRIC, float("nan")),
            **{c: m.get(c, float("nan")) for c in SUMMARY_COLUMNS},
            **{f"w_{k}": result.config.get(k) for k in SEARCH_SPACE},
        })
    return rows


def best_row(rows: list[dict[str, Any]], reference: dict[str, float] | None = None) -> dict[str, Any] | None:
    """The completed trial with the highest objective; with ``reference`` (the defaults on the same users),
    only among trials with higher success and equal or fewer mean turns than the reference.

    None when no completed trial qualifies. Ties (several weightings that make the same decisions) go to the
    earliest trial, so the defaults (trial 0) win a tie.
    """
    ok = [r for r in rows if r["status"] == "completed"]
    if reference is not None:
        ok = [r for r in ok if r["mean_turns"] <= reference["mean_turns"] + 1e-12
              and r["success"] > reference["success"] + 1e-12]
    return max(ok, key=lambda r: (r[METRIC], -r["trial"])) if ok else None


def reference_run(pack: Any, bank_tune: Any, args: argparse.Namespace) -> dict[str, float]:
    """The default weights on exactly the tuning users every trial met (same chunks, same streams)."""
    from graphs.simulator import PolicyAgent, SimulationResult, Simulator

    sim = Simulator(pack, bank_tune, max_turns=args.max_turns)
    agent = PolicyAgent(pack, None)
    parts = [sim.run(agent, n=size, seed=args.seed, stream=f"tune-{k}")
             for k, size in enumerate(chunk_sizes(args.dialogues, args.chunks))]
    summary = SimulationResult.concat(parts).summary()
    return {METRIC: objective(summary), **summary}


# ------------------------------------------------------------------------------------ report
def format_table(rows: dict[str, dict[str, float]]) -> str:
    head = f"{'policy':10s} {'n':>6s} {'success':>8s} {'turns':>6s} {'escal.':>7s} {'asked':>6s} {'regret':>7s}"
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(f"{name:10s} {s['n']:6d} {s['success']:8.4f} {s['mean_turns']:6.3f} {s['escalation_rate']:7.4f} "
                     f"{s['question_rate']:6.3f} {s['regret']:7.3f}")
    return "\n".join(lines)


def format_kinds(reports: dict[str, dict[str, Any]]) -> str:
    from graphs.simulator import GOAL_KINDS

    lines = [f"{'kind':13s} {'policy':9s} {'n':>6s} {'success':>8s} {'turns':>6s} {'escal.':>7s} {'regret':>7s}"]
    for kind in GOAL_KINDS:
        for name, rep in reports.items():
            s = rep["by_kind"][kind]
            if s.get("n", 0) == 0:
                continue
            lines.append(f"{kind:13s} {name:9s} {s['n']:6d} {s['success']:8.4f} {s['mean_turns']:6.3f} "
                         f"{s['escalation_rate']:7.4f} {s['regret']:7.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.jobs.tune_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"Tune trials (default {DEFAULTS['num_samples']})")
    p.add_argument("--dialogues", type=int, default=None,
                   help=f"simulated conversations per trial (default {DEFAULTS['dialogues']})")
    p.add_argument("--chunks", type=int, default=None,
                   help=f"reports per trial, ASHA's time unit (default {DEFAULTS['chunks']})")
    p.add_argument("--eval-dialogues", type=int, default=None,
                   help=f"fresh conversations for the final comparison (default {DEFAULTS['eval_dialogues']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="artefact folder (default $COACT_RESULTS_DIR or <repo>/results, then tune_policy/<timestamp>)")
    p.add_argument("--address", default=None, help="Ray address to attach to (default: a local Ray on 127.0.0.1, "
                                                   "or the job's cluster under `ray job submit`)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    p.add_argument("--max-concurrent", type=int, default=0, help="concurrent trials (default 0: as CPUs allow)")
    p.add_argument("--max-turns", type=int, default=6, help="user turns before a conversation is handed over")
    p.add_argument("--domain", default="banking", help="domain pack name or YAML path")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models folder (default: $COACT_MODELS_DIR or <repo>/models, built if missing)")
    p.add_argument("--verbose", type=int, default=1, help="Tune verbosity 0-3")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: {SMOKE}")
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("num_samples", "dialogues", "chunks", "eval_dialogues"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    args.chunks = min(args.chunks, args.dialogues)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    results_root = Path(os.environ.get("COACT_RESULTS_DIR") or Path(__file__).resolve().parents[2] / "results")
    out = args.output or results_root / "tune_policy" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"artefacts will go to {out}")

    from graphs.domain import load_pack
    from graphs.simulator import OracleAgent, PolicyAgent, Simulator, UtteranceBank, paired_difference

    pack = load_pack(args.domain)
    if args.models_dir is not None:
        models = args.models_dir.expanduser().resolve()
    else:
        from cluster.prepare import ensure_models

        models = ensure_models(args.domain)
    t0 = time.perf_counter()
    bank = UtteranceBank.build(models, pack, log=log)
    log(f"utterance bank: {len(bank)} held-out texts ({UtteranceBank.cache_path(models, pack)}, "
        f"{time.perf_counter() - t0:.1f}s)")
    bank_tune, bank_eval = bank.split(0.5, seed=args.seed)
    log(f"tuning on {len(bank_tune)} texts, evaluating on the other {len(bank_eval)}")

    owns_ray = connect(args.address, args.num_cpus)
    try:
        t0 = time.perf_counter()
        grid = run_tuning(args, pack, bank_tune, out)
        tune_s = time.perf_counter() - t0
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    rows = trial_table(grid, args.chunks)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    if not any(r["status"] != "error" for r in rows):
        raise RuntimeError("every Tune trial failed; see the trial errors above")
    reference = reference_run(pack, bank_tune, args)
    best = best_row(rows, reference)
    unconstrained = best_row(rows)
    log(f"tuning: {len(rows)} trials in {tune_s:.1f}s "
        f"({sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{sum(r['status'] == 'stopped_early' for r in rows)} stopped early by ASHA); default weights on the "
        f"tuning users: objective {reference[METRIC]:.4f}, success {reference['success']:.4f}, "
        f"turns {reference['mean_turns']:.3f}")
    if unconstrained is not None:
        log(f"best trial overall: {unconstrained['trial']} (objective {unconstrained[METRIC]:.4f}, "
            f"success {unconstrained['success']:.4f}, turns {unconstrained['mean_turns']:.3f})")
    if best is None:
        log("no completed trial has higher success than the default weights at equal or fewer turns on the "
            "tuning users: keeping the defaults")
        tuned = dict(pack.utilities.weights)
    else:
        log(f"selected trial {best['trial']} (best objective among those beating the defaults' success at "
            f"equal or fewer turns): "
            f"objective {best[METRIC]:.4f}, success {best['success']:.4f}, turns {best['mean_turns']:.3f}")
        tuned = {**pack.utilities.weights, **{k: float(best[f"w_{k}"]) for k in SEARCH_SPACE}}

    # Held-out comparison: fresh users (own seed stream) typing texts from the evaluation half only.
    t0 = time.perf_counter()
    sim = Simulator(pack, bank_eval, max_turns=args.max_turns)
    users = sim.users(args.eval_dialogues, args.seed, stream="eval")
    results = {
        "default": sim.run(PolicyAgent(pack, None), users=users),
        "tuned": sim.run(PolicyAgent(pack, tuned), users=users),
        "oracle": sim.run(OracleAgent(), users=users),
    }
    eval_s = time.perf_counter() - t0
    reports = {name: r.report() for name, r in results.items()}
    for rep in reports.values():
        rep[METRIC] = objective(rep)
    paired = {m: paired_difference(results["default"], results["tuned"], m)
              for m in ("success", "turns", "escalated", "regret")}
    d, t = reports["default"], reports["tuned"]
    target_met = bool(t["success"] > d["success"] and t["mean_turns"] <= d["mean_turns"] + 1e-12)
    comparison = {
        "target": "tuned success > default success at equal or fewer mean turns (held-out users)",
        "target_met": target_met,
        "reports": reports,
        "paired_tuned_minus_default": paired,
        "weights": {"default": dict(pack.utilities.weights), "tuned": tuned},
        "selected_trial": None if best is None else {k: (v.item() if isinstance(v, np.generic) else v)
                                                     for k, v in best.items()},
        "selection": "highest objective among completed trials that, on the tuning users, have higher success "
                     "than the default weights at equal or fewer mean turns; otherwise the defaults",
        "default_on_tuning_users": reference,
        "objective": {"formula": "success - a * mean_turns - b * escalation_rate",
                      "a": TURN_PENALTY, "b": ESCALATION_PENALTY},
        "settings": {"num_samples": args.num_samples, "dialogues_per_trial": args.dialogues, "chunks": args.chunks,
                     "eval_dialogues": args.eval_dialogues, "seed": args.seed, "max_turns": args.max_turns,
                     "domain": pack.name, "models_dir": str(models), "bank": bank.meta,
                     "tune_texts": len(bank_tune), "eval_texts": len(bank_eval), "smoke": args.smoke},
        "seconds": {"tune": round(tune_s, 1), "eval": round(eval_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    (out / "best_weights.json").write_text(json.dumps(
        {"weights": tuned, "trial": None if best is None else int(best["trial"]),
         "objective": reference[METRIC] if best is None else float(best[METRIC]),
         "tuned_on_dialogues": args.dialogues, "seed": args.seed}, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"held-out comparison ({args.eval_dialogues} fresh simulated users, evaluation utilities = pack defaults)")
    print(format_table({k: reports[k] for k in ("default", "tuned", "oracle")}))
    print()
    print(format_kinds({k: reports[k] for k in ("default", "tuned")}))
    ds, dt = paired["success"], paired["turns"]
    print()
    print(f"tuned - default: success {ds['mean']:+.4f} (se {ds['se']:.4f}), turns {dt['mean']:+.4f} "
          f"(se {dt['se']:.4f}); target met: {target_met}")
    print()
    print(f"artefacts: {out}")
    for name in ("results.csv", "best_weights.json", "comparison.json", "tune/"):
        print(f"  {out / name}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
