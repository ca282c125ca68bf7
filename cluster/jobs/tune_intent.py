"""Ray Tune search over the intent classifier: frozen-encoder head versus full fine-tuning.

Search space (``SEARCH_SPACE``): ``mode`` (``frozen``: a linear head on cached MiniLM embeddings; ``full``: the
whole encoder fine-tuned, see ``cluster.jobs.train_intent``), ``lr`` (full fine-tuning), ``head_lr`` (the frozen
head), ``epochs``, ``batch_size`` and ``max_length``. Each parameter is sampled for every trial; a trial uses the
learning rate of its mode. Objective: macro-F1 on the validation split (``val_macro_f1``, maximised), reported
after every epoch (for the frozen head one "epoch" is ``frozen_passes`` passes over the embeddings). Full
fine-tuning trials start their head from a linear probe on the same training examples (LP-FT, see
``train_intent``), so both modes start from the same features and the comparison shows what training the
encoder adds.

Search algorithm: random search (``BasicVariantGenerator``, seeded) whose first trials are the two defaults
(a frozen head and a full fine-tuning run); scheduler: ASHA on the epoch count (grace period 1 by default,
``--grace-period``; reduction factor 2), so weak trials stop after their first epochs. Each trial declares
``--cpus-per-trial`` CPUs (default 1, with as many torch threads) so trials run side by side. Each trial checkpoints its best epoch's model folder;
the best trial's checkpoint becomes ``best_model/``, and only that model is evaluated on the test splits.

Artefacts in ``--output`` (default ``results/tune_intent/<timestamp>``): ``results.csv`` (every trial: config,
status, epochs, best and last validation metrics), ``learning_curves.csv``/``.json`` (per-trial metric history),
``best_config.json``, ``best_model/`` (a folder ``actors.intent_models.load_intent_model`` loads),
``evaluation/`` (``cluster.jobs.evaluate`` on the best model) and Tune's own folder ``tune/`` (with one
TensorBoard event file per trial, ``ray/tune/<metric>`` per epoch: ``tensorboard --logdir <output>/tune``;
``--tracking mlflow|wandb|none``, see ``cluster.jobs.tracking``).

    python -m coact.cluster.jobs.tune_intent --smoke
    python -m coact.cluster.jobs.tune_intent --num-samples 8 --train-per-class 40
    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"COACT_MODELS_DIR": "/abs/models"}}' \
        -- python -m coact.cluster.jobs.tune_intent --smoke --output /abs/results/tune_intent/job

Reproducibility: trial configurations (seeded search), data subsets and every trial's training are seeded, so
each trial's metrics repeat; which trials ASHA stops depends on the order in which concurrent trials report,
so only ``--max-concurrent 1`` makes the whole run repeatable.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.jobs import common as C
from coact.cluster.jobs import train_intent as T
from coact.cluster.jobs.tracking import add_tracking_arg, tune_callbacks
from coact.cluster.runtime import init_ray, quiet_env

JOB = "tune_intent"
log = C.logger(JOB)
METRIC = T.METRIC
CONFIG_KEYS = ("mode", "lr", "head_lr", "epochs", "batch_size", "max_length")

SEARCH_SPACE: dict[str, tuple] = {
    "mode": ("choice", ["frozen", "full"]),
    "lr": ("loguniform", 2e-5, 2e-4),
    "head_lr": ("loguniform", 1e-3, 3e-2),
    "epochs": ("choice", [2, 3, 4]),
    "batch_size": ("choice", [16, 32, 64]),
    "max_length": ("choice", [32, 64]),
}
SMOKE_SPACE: dict[str, tuple] = {
    **SEARCH_SPACE,
    "epochs": ("choice", [1, 2]),
    "batch_size": ("choice", [32]),
    "max_length": ("choice", [16]),
}
FIRST_POINTS = [
    {"mode": "frozen", "head_lr": 1e-2, "epochs": 4, "batch_size": 32, "max_length": 64},
    {"mode": "full", "lr": 5e-5, "epochs": 4, "batch_size": 32, "max_length": 64},
]
SMOKE = {"num_samples": 3, "train_per_class": 4, "val_per_class": 2, "eval_limit": 150, "oos_limit": 50}
DEFAULTS = {"num_samples": 8, "train_per_class": None, "val_per_class": None, "eval_limit": None, "oos_limit": None}


def param_space(space: dict[str, tuple]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind, *args = spec
        out[name] = tune.choice(args[0]) if kind == "choice" else getattr(tune, kind)(*args)
    return out


def first_points(space: dict[str, tuple]) -> list[dict[str, Any]]:
    """The two default configurations, restricted to values the space allows."""
    pts = []
    for p in FIRST_POINTS:
        q = {}
        for k, v in p.items():
            kind, *args = space[k]
            if kind == "choice" and v not in args[0]:
                v = args[0][0]
            q[k] = v
        pts.append(q)
    return pts


# ---------------------------------------------------------------- trainable

def intent_trial(config: dict[str, Any], data: C.IntentData | None = None,
                 embeddings: dict[int, np.ndarray] | None = None, base: dict[str, Any] | None = None,
                 threads: int = 1) -> None:
    """One Tune trial: train ``config`` (merged over ``base``) and report validation metrics every epoch,
    with the model folder as a checkpoint whenever validation macro-F1 improved."""
    from ray import tune

    quiet_env()
    C.set_threads(threads)
    cfg = T.TrainConfig.from_dict({**(base or {}), **{k: config[k] for k in CONFIG_KEYS if k in config}})

    def on_epoch(epoch: int, metrics: dict[str, float], save) -> None:
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if save is None:
            tune.report(report)
            return
        tmp = tempfile.mkdtemp(prefix="coact-intent-ckpt-")
        try:
            save(Path(tmp) / "model")
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if cfg.mode == "full":
        T.train_full(data, cfg, on_epoch=on_epoch, progress=False, X=embeddings.get(int(cfg.max_length)))
    else:
        T.train_frozen(data, cfg, embeddings[int(cfg.max_length)], on_epoch=on_epoch, progress=False)


# ---------------------------------------------------------------- driver

def run_tuning(args: argparse.Namespace, data: C.IntentData, embeddings: dict[int, np.ndarray],
               base: dict[str, Any], space: dict[str, tuple], storage: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    max_t = max(space["epochs"][1])
    trainable = tune.with_parameters(intent_trial, data=data, embeddings=embeddings, base=base,
                                     threads=max(1, int(round(args.cpus_per_trial))))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=args.num_samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=first_points(space), random_state=args.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                    grace_period=max(1, min(args.grace_period, max_t)), reduction_factor=2),
            max_concurrent_trials=args.max_concurrent or None,
        ),
        run_config=tune.RunConfig(
            storage_path=str(storage), name="tune", verbose=args.verbose,
            callbacks=tune_callbacks(args.tracking, storage, JOB),  # TensorBoard files per trial in tune/<trial>/
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="max"),
        ),
    )
    return tuner.fit()


def trial_status(history: list[float], epochs: int, patience: int) -> str:
    """'completed' (all its epochs), 'early_stopped' (its own patience: the last ``patience`` epochs did not beat
    the best) or 'stopped_by_asha' (the scheduler), from the per-epoch objective."""
    n = len(history)
    if n >= epochs:
        return "completed"
    best_epoch = int(np.argmax(history)) + 1 if history else 0
    return "early_stopped" if n - best_epoch >= patience else "stopped_by_asha"


def trial_tables(grid: Any, patience: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per trial, one row per trial and epoch)."""
    rows, curves = [], []
    for i, result in enumerate(grid):
        m = result.metrics or {}
        df = result.metrics_dataframe
        cfg = {k: result.config.get(k) for k in CONFIG_KEYS}
        trial_id = m.get("trial_id") or (df["trial_id"].iloc[-1] if df is not None and "trial_id" in df else "")
        iters = int(m.get("training_iteration", 0) or 0)
        history = list(df[METRIC]) if df is not None and METRIC in df else []
        status = "error" if result.error else trial_status(history, int(cfg["epochs"] or 0), patience)
        best = float(max(history)) if history else float("nan")
        rows.append({
            "trial": i, "trial_id": trial_id, "status": status, "epochs_run": iters,
            **cfg, "effective_lr": cfg["lr"] if cfg["mode"] == "full" else cfg["head_lr"],
            f"best_{METRIC}": best, METRIC: m.get(METRIC, float("nan")),
            "val_accuracy": m.get("val_accuracy", float("nan")), "val_loss": m.get("val_loss", float("nan")),
            "train_loss": m.get("train_loss", float("nan")), "seconds": m.get("elapsed_seconds", float("nan")),
            "error": str(result.error)[:300] if result.error else "",
        })
        if df is not None:
            for _, r in df.iterrows():
                curves.append({"trial": i, "trial_id": trial_id, "mode": cfg["mode"],
                               "training_iteration": int(r.get("training_iteration", 0)),
                               **{c: float(r[c]) for c in ("train_loss", "val_loss", "val_accuracy", METRIC,
                                                          "epoch_seconds", "elapsed_seconds") if c in r}})
    return rows, curves


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.tune_intent", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"trials (default {DEFAULTS['num_samples']})")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="tune on at most N training examples per label (default: all)")
    p.add_argument("--val-per-class", type=int, default=None, help="at most N validation examples per label")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the best model on N test queries")
    p.add_argument("--oos-limit", type=int, default=None, help="... and N out-of-scope queries")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=0, help="concurrent trials (default 0: as CPUs allow)")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--grace-period", type=int, default=1,
                   help="ASHA grace period in epochs (full fine-tuning often dips after epoch 1: 2 is fairer to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="artefact folder (default results/tune_intent/<timestamp>)")
    p.add_argument("--address", default=None, help="Ray address (default: local Ray, or the job's cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    p.add_argument("--domain", default="banking")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the test evaluation of the best model")
    p.add_argument("--verbose", type=int, default=1, help="Tune verbosity 0-3")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: {SMOKE}, 1-2 epochs, max length 16")
    add_tracking_arg(p)
    args = p.parse_args(argv)
    C.apply_preset(args, SMOKE if args.smoke else DEFAULTS)
    if args.num_samples < 1:
        p.error("--num-samples must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()
    timer = C.Timer()
    out = C.output_dir(JOB, args.output)
    log(f"artefacts will go to {out}")
    C.set_threads(None)
    space = SMOKE_SPACE if args.smoke else SEARCH_SPACE
    data = C.load_intent_data(args.domain).subset(args.train_per_class, args.val_per_class, seed=args.seed)
    log(f"data: {len(data.train_idx)} train / {len(data.val_idx)} validation examples, {data.num_labels} labels")

    # Embeddings for the frozen-head trials, computed (or read from the cache) once here.
    t0 = C.Timer()
    lengths = sorted(set(space["max_length"][1]))
    embeddings = {ml: C.intent_embeddings(data, ml, log=log) for ml in lengths}
    log(f"embeddings for max lengths {lengths} ready in {t0():.1f}s")
    base = {"patience": args.patience, "seed": args.seed, "init_head": "auto"}

    owns_ray = init_ray(args.address, args.num_cpus)
    try:
        import ray

        log(f"Ray resources: {ray.cluster_resources().get('CPU', 0):g} CPUs; {args.cpus_per_trial:g} per trial")
        t0 = C.Timer()
        grid = run_tuning(args, data, embeddings, base, space, out)
        tune_s = t0()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()

    import pandas as pd

    rows, curves = trial_tables(grid, args.patience)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    pd.DataFrame(curves).to_csv(out / "learning_curves.csv", index=False)
    C.write_json(out / "learning_curves.json", curves)
    ok = [r for r in rows if r["status"] != "error" and np.isfinite(r[f"best_{METRIC}"])]
    if not ok:
        raise RuntimeError("every Tune trial failed; see the trial errors above and results.csv")
    best = max(ok, key=lambda r: (r[f"best_{METRIC}"], -r["trial"]))
    result = grid[best["trial"]]
    ckpt = result.get_best_checkpoint(METRIC, "max") or result.checkpoint
    best_model = out / "best_model"
    shutil.rmtree(best_model, ignore_errors=True)
    with ckpt.as_directory() as d:
        shutil.copytree(Path(d) / "model", best_model)
    log(f"tuning: {len(rows)} trials in {tune_s:.0f}s; best trial {best['trial']} ({best['mode']}): "
        f"val macro-F1 {best[f'best_{METRIC}']:.4f}")

    by_mode = {}
    for mode in ("frozen", "full"):
        rs = [r for r in ok if r["mode"] == mode]
        if rs:
            b = max(rs, key=lambda r: r[f"best_{METRIC}"])
            by_mode[mode] = {"trial": b["trial"], f"best_{METRIC}": b[f"best_{METRIC}"],
                             "config": {k: b[k] for k in CONFIG_KEYS}}
    summary: dict[str, Any] = {
        "best_trial": best["trial"], "trial_id": best["trial_id"],
        "config": {k: best[k] for k in CONFIG_KEYS},
        "train_config": dataclasses.asdict(T.TrainConfig.from_dict({**base, **{k: best[k] for k in CONFIG_KEYS}})),
        f"best_{METRIC}": best[f"best_{METRIC}"], "model": str(best_model), "checkpoint": str(ckpt.path),
        "best_by_mode": by_mode,
        "search": {"space": {k: list(v) for k, v in space.items()}, "first_points": first_points(space),
                   "algorithm": "BasicVariantGenerator (random search, seeded)",
                   "scheduler": f"ASHA (training_iteration = epoch, grace {args.grace_period}, reduction factor 2)",
                   "num_samples": args.num_samples, "cpus_per_trial": args.cpus_per_trial, "seed": args.seed},
        "data": {"n_train": int(len(data.train_idx)), "n_val": int(len(data.val_idx)),
                 "train_per_class": args.train_per_class, "val_per_class": args.val_per_class},
        "smoke": args.smoke,
        "seconds": {"tune": round(tune_s, 1)},
    }
    if args.eval:
        from coact.cluster.jobs import evaluate

        rep = evaluate.evaluate(best_model, out / "evaluation", limit=args.eval_limit, oos_limit=args.oos_limit,
                                progress=False)
        summary["test"] = {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                           "accuracy_78way": rep["accuracy_78way"], "oos_auroc": rep["out_of_scope"]["auroc"],
                           "oos_fpr_at_95_in_scope_recall": rep["out_of_scope"]["fpr_at_95_in_scope_recall"],
                           "ece": rep["calibration"]["ece"], "sampled": rep["data"]["sampled"]}
    summary["seconds"]["total"] = round(timer(), 1)
    C.write_json(out / "best_config.json", summary)

    print()
    cols = ["trial", "mode", "status", "epochs_run", "effective_lr", "epochs", "batch_size", "max_length",
            f"best_{METRIC}", "seconds"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(pd.DataFrame(rows)[cols].to_string(index=False))
    print()
    print(f"best configuration (trial {best['trial']}): {summary['config']}  val macro-F1 "
          f"{best[f'best_{METRIC}']:.4f}")
    if "test" in summary:
        t = summary["test"]
        print(f"best model on the test split{' (sample)' if t['sampled'] else ''}: accuracy {t['accuracy']:.4f}, "
              f"macro-F1 {t['macro_f1']:.4f}, OOS AUROC {t['oos_auroc']:.4f}, ECE {t['ece']:.4f}")
    print(f"artefacts: {out}")
    for name in ("results.csv", "learning_curves.csv", "learning_curves.json", "best_config.json", "best_model/",
                 "evaluation/", "tune/"):
        if (out / name.rstrip("/")).exists():
            print(f"  {out / name}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
