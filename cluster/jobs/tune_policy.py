"""Tune the decision policy's utility weights with Ray Tune on simulated conversations.

Simulated users (``graphs.simulator``: hidden state forward-sampled from the domain's Bayesian network, held-out
BANKING77 / CLINC150 utterances of their goal, answers through the network's CPTs, and a mix of user kinds: plain,
unsure, follow-up, corrector, wants a person) talk to the served policy (``plan_turn`` -> ``Policy.decide`` ->
``close_or_continue``); Ray Tune searches the utility weights and the question cost, ASHA stops bad trials early.

Objective per trial (maximised), over the trial's dialogues so far::

    objective = success - TURN_PENALTY * mean_turns - ESCALATION_PENALTY * needless_escalation_rate
                - TURN_EXCESS_PENALTY * max(0, mean turns - the defaults' mean turns)
                - sum over k in (at_risk, out_of_scope) of SHORTFALL_PENALTY[k] * shortfall_k
    shortfall_k = max(0, -(k success diff)) + max(0, k regret diff) / (k oracle utility)

with ``TURN_PENALTY = 0.1`` (an extra question in every conversation must buy at least 10 points of task
success), ``ESCALATION_PENALTY = 0.5`` (a hand-over the oracle would not make costs half a success on top of not
being one: it occupies a human agent; handing over a user who wants a person is the oracle's action and a
success, so it is not charged) and
``SHORTFALL_PENALTY = {at_risk: 1.0, out_of_scope: 0.5}``. The diffs are the trial minus the default weights on
the same users of that goal kind (the defaults' per-chunk run is made once in the driver and handed to every
trial). Success counts every conversation alike and at-risk users are about 5% of them, so without the
shortfall terms the search happily trades frozen compromised cards for FAQ answers; the regret term also
catches an at-risk user who used to be handed over to a human and is now answered (a failure either way, but
one that leaves the card unprotected under the pack's utilities).

Protocol, all seeded:

1. The held-out texts are split per goal into a *tuning* half and an *evaluation* half.
2. Every trial runs ``--dialogues`` conversations on tuning-half users, reported to Tune in ``--chunks``
   chunks (cumulative metrics after each chunk). Chunk ``k`` uses the same users in every trial (common
   random numbers), so trials differ only by their weights. The default weights are the first trial.
3. Selection encodes the target: the tuned weights are those of the trial with the highest objective among
   the trials that ran all chunks *and*, on the tuning users (where the defaults are run in the driver on
   exactly those users), reach a higher success than the default weights (by more than ``MIN_GAIN_SE = 1``
   paired standard error of the difference) at equal or fewer mean turns *and* serve the protected kinds no
   worse: at-risk and out-of-scope success no lower, and their regret no higher, than the defaults' beyond
   ``TOLERANCE_SE = 0.5`` paired standard errors of the trial-minus-default difference on that kind's users
   (half an SE never excuses a trial that only loses such users; see the constant). When no trial
   qualifies, the defaults are kept (and reported as such, with the closest trial).
4. The tuned weights are evaluated against the pack's default weights and the oracle on
   ``--eval-dialogues`` *fresh* users (another seed stream) who type texts from the evaluation half only.
   Success, turns, escalations and regret are scored under the pack's default utilities (see
   ``graphs.simulator`` for the exact definitions), overall and per goal kind; tuned-minus-default
   differences are paired (same users) and reported with their standard errors. ``target_met`` applies the
   same bars to the held-out users.

Artefacts in ``--output`` (default ``$COACT_RESULTS_DIR`` or ``<repo>/results``, then
``tune_policy/<timestamp>``): ``results.csv`` (every trial: its weights, its last reported metrics overall
and per goal kind ``<kind>_*``, its paired differences with the defaults ``*_diff`` / ``*_diff_se``, whether
it qualifies and why not), ``best_weights.json`` (``{"weights": {...}}``, usable as the
DecisionActor's ``user_config``), ``comparison.json``, and Tune's own folder ``tune/`` (one TensorBoard event
file per trial, ``ray/tune/<metric>`` per chunk: ``tensorboard --logdir <output>/tune``; ``--tracking
mlflow|wandb|none``, see ``cluster.jobs.tracking``).

    python -m coact.cluster.jobs.tune_policy --num-samples 24 --dialogues 600
    python -m coact.cluster.jobs.tune_policy --smoke
    ray job submit --working-dir . -- python -m coact.cluster.jobs.tune_policy --output /abs/out --models-dir /abs/models

Under ``ray job submit`` the uploaded working directory does not carry the git-ignored ``models/`` and
``results/`` folders: pass ``--models-dir`` (or ``COACT_MODELS_DIR``) and an absolute ``--output`` (or
``COACT_RESULTS_DIR``) through the command line or the runtime env.
Per-trial metrics are deterministic; ASHA's stopping decisions depend on the order in which concurrent
trials report, so only ``--max-concurrent 1`` makes the whole tuning run (which trials stop) repeatable
(checked: two such runs give identical results.csv and comparison.json).

Seen on the banking pack (2 shared cores), with the simulator's user kinds and the corrected finding prior:
``python -m coact.cluster.jobs.tune_policy --num-cpus 2`` (the defaults: 48 trials x (2000 + 600) conversations,
11 min of tuning, 12 min in all) selected trial 33 of 13 qualifying; on 3000 fresh users + 1500 at-risk
ones (paired, tuned - default): success 0.879 -> 0.885 (+0.0060, se 0.0021), turns 1.432 -> 1.416,
escalations 9.9% -> 8.5%, regret -0.044 (se 0.020), out-of-scope success +0.025, but at-risk success
0.689 -> 0.678 (-0.0109, se 0.0027): target not met, the pack keeps the hand-set weights. A smaller run
(24 trials x (1200 + 400)) selected a trial whose tuning-set gain was a tenth of an SE and lost 0.012 success
held out, hence ``MIN_GAIN_SE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.jobs import common as C
from coact.cluster.jobs.tracking import add_tracking_arg, tune_callbacks
from coact.cluster.runtime import init_ray, quiet_env

TURN_PENALTY = 0.1
ESCALATION_PENALTY = 0.5
# The target is more success at equal or fewer turns than the defaults: mean turns above the defaults' (same
# users) cost 1 point of success per tenth of a turn, so the search stops buying success with questions.
TURN_EXCESS_PENALTY = 1.0
# Goal kinds a tuned policy must not serve worse than the defaults (selection), and what a shortfall costs in
# the objective (search). Shortfall of a kind = lost success, plus added regret as a fraction of the kind's
# oracle utility (the pack's own utilities: an at-risk user who used to be handed over to a human and is now
# answered with an FAQ is a failure either way, but the card is no longer protected). At-risk users are about 5%
# of the conversations and out-of-scope users about 8%, so plain success weighs a lost at-risk card at 0.05
# points; the penalty makes it cost about 20x (at risk) and 6x (out of scope) more, so the search is steered
# away from trading compromised cards for FAQ answers. At risk weighs more: an unfrozen compromised card costs
# more than a misrouted off-topic question.
PROTECTED_KINDS = ("at_risk", "out_of_scope")
SHORTFALL_PENALTY = {"at_risk": 1.0, "out_of_scope": 0.5}
# A protected kind may lose at most TOLERANCE_SE paired standard errors of (trial - default) success, and gain at
# most TOLERANCE_SE paired SEs of regret, on that kind's tuning users. Same users, so the difference is exact on
# them and its paired SE (about sqrt(flips)/n for success) says how much of it is the luck of which users were
# drawn. Half an SE never excuses a pure loss: a trial that only loses users of a kind (k lost, none gained)
# has |mean| / se >= sqrt(k) >= 1 (likewise for regret that only goes up); only a net loss inside the noise of a
# trade (e.g. 5 lost, 4 gained of ~75 at-risk users: -1.3 points, se 4.0 points) is tolerated.
TOLERANCE_SE = 0.5
# The gain a trial must show over the defaults on the tuning users: its paired success difference must exceed
# MIN_GAIN_SE paired standard errors. Seen: with 1200 tuning users a trial selected at +0.0008 success (about a
# tenth of an SE) lost 0.012 (se 0.003) on held-out users; a gain inside the noise is noise fitted by the search.
MIN_GAIN_SE = 1.0
METRIC = "objective"
TRIAL_CPUS = 0.5
EPS = 1e-12

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
SMOKE = {"num_samples": 2, "dialogues": 40, "chunks": 2, "eval_dialogues": 100, "risk_dialogues": 10,
         "eval_risk_dialogues": 20}
DEFAULTS = {"num_samples": 48, "dialogues": 2000, "chunks": 4, "eval_dialogues": 3000, "risk_dialogues": 600,
            "eval_risk_dialogues": 1500}
# The at-risk stratum: extra users drawn from the network given card_at_risk = yes. In the natural mix they
# are ~5% (about 100 of 2000), too few to certify that a change of weights loses none of their cards.
STRATUM_KIND = "at_risk"
SUMMARY_COLUMNS = ("success", "mean_turns", "escalation_rate", "needless_escalation_rate", "regret", "question_rate",
                   "timeout_rate")
KIND_COLUMNS = ("n", "success", "mean_turns", "escalation_rate", "regret", "oracle_utility")
DIFF_COLUMNS = ("success_diff", "success_diff_se", "regret_diff", "regret_diff_se")
OVERALL_DIFF_COLUMNS = (*DIFF_COLUMNS, "turns_diff")


def log(msg: str) -> None:
    print(f"[tune_policy] {msg}", flush=True)


def finite(x: Any) -> bool:
    return x is not None and bool(np.isfinite(float(x)))


def objective(metrics: dict[str, float]) -> float:
    """success - a * mean_turns - b * needless_escalation_rate (escalation_rate when absent)
    - sum_k c_k * (max(0, -<k>_success_diff) + max(0, <k>_regret_diff) / <k>_oracle_utility).

    ``<k>_success_diff`` / ``<k>_regret_diff``: this policy minus the defaults on the same users of kind ``k``
    (see :func:`trial_metrics`); without them (a plain summary) the objective is the unpenalised one."""
    escalations = metrics.get("needless_escalation_rate", metrics["escalation_rate"])
    value = metrics["success"] - TURN_PENALTY * metrics["mean_turns"] - ESCALATION_PENALTY * escalations
    extra_turns = metrics.get("turns_diff")
    if finite(extra_turns):
        value -= TURN_EXCESS_PENALTY * max(0.0, float(extra_turns))
    for kind, c in SHORTFALL_PENALTY.items():
        diff = metrics.get(f"{kind}_success_diff")
        if finite(diff):
            value -= c * max(0.0, -float(diff))
        extra, scale = metrics.get(f"{kind}_regret_diff"), metrics.get(f"{kind}_oracle_utility")
        if finite(extra) and finite(scale) and float(scale) > 0:
            value -= c * max(0.0, float(extra)) / float(scale)
    return float(value)


@dataclass
class Runs:
    """One policy's conversations with the natural mix of users and with the at-risk stratum.

    Overall measures (success, turns, escalations) come from the natural users only; per-kind measures pool
    both, since the stratum's users are draws from the same conditional distribution as the natural mix's
    at-risk users."""

    natural: Any  # SimulationResult
    stratum: Any | None = None  # SimulationResult of STRATUM_KIND users, or None

    @property
    def pooled(self) -> Any:
        from coact.graphs.policy.simulator import SimulationResult

        if self.stratum is None or len(self.stratum) == 0:
            return self.natural
        return SimulationResult.concat([self.natural, self.stratum])

    def take(self, natural: int, stratum: int) -> Runs:
        return Runs(self.natural.take(slice(0, natural)),
                    None if self.stratum is None else self.stratum.take(slice(0, stratum)))

    @staticmethod
    def concat(parts: list[Runs]) -> Runs:
        from coact.graphs.policy.simulator import SimulationResult

        strata = [p.stratum for p in parts if p.stratum is not None]
        return Runs(SimulationResult.concat([p.natural for p in parts]),
                    SimulationResult.concat(strata) if strata else None)

    def report(self) -> dict[str, Any]:
        return {**self.natural.summary(), "by_kind": self.pooled.by_kind(),
                "by_user_kind": self.natural.by_user_kind()}


def trial_metrics(result: Any, reference: Any) -> dict[str, float]:
    """Flat metrics of ``result`` (Runs, or a plain SimulationResult) and its paired differences with
    ``reference`` (the default weights on the same users): the summary columns, per goal kind
    ``<kind>_<column>``, ``success_diff`` and ``<kind>_success_diff`` and ``<kind>_regret_diff`` with their
    standard errors (``*_se``), and the objective. Overall columns: the natural users; per-kind columns: the
    natural users and the stratum pooled."""
    from coact.graphs.policy.simulator import paired_difference

    result = result if isinstance(result, Runs) else Runs(result)
    reference = reference if isinstance(reference, Runs) else Runs(reference)
    summary = result.natural.summary()
    out: dict[str, float] = {c: summary[c] for c in SUMMARY_COLUMNS}
    d = paired_difference(reference.natural, result.natural, "success")
    out["success_diff"], out["success_diff_se"] = d["mean"], d["se"]
    d = paired_difference(reference.natural, result.natural, "regret")
    out["regret_diff"], out["regret_diff_se"] = d["mean"], d["se"]
    out["turns_diff"] = paired_difference(reference.natural, result.natural, "turns")["mean"]
    pooled, pooled_ref = result.pooled, reference.pooled
    for kind, s in pooled.by_kind().items():
        for c in KIND_COLUMNS:
            out[f"{kind}_{c}"] = s.get(c, 0 if c == "n" else float("nan"))
        for m in ("success", "regret"):
            d = paired_difference(pooled_ref, pooled, m, kind=kind)
            out[f"{kind}_{m}_diff"], out[f"{kind}_{m}_diff_se"] = d["mean"], d["se"]
    out[METRIC] = objective(out)
    return out


def protected_tolerance(se: float, tolerance_se: float = TOLERANCE_SE) -> float:
    """The loss a protected kind may show: ``tolerance_se`` paired SEs (0 when the SE is undefined)."""
    return float(tolerance_se * se) if finite(se) else 0.0


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
def run_chunk(sim: Any, agent: Any, seed: int, k: int, natural: int, stratum: int) -> Runs:
    """Tuning chunk ``k``: ``natural`` users of the natural mix and ``stratum`` at-risk users (own streams)."""
    return Runs(sim.run(agent, n=natural, seed=seed, stream=f"tune-{k}"),
                sim.run(agent, n=stratum, seed=seed, stream=f"tune-{k}", kind=STRATUM_KIND) if stratum else None)


def chunk_plan(dialogues: int, risk_dialogues: int, chunks: int) -> list[tuple[int, int]]:
    """(natural, stratum) users per chunk."""
    return list(zip(chunk_sizes(dialogues, chunks), chunk_sizes(risk_dialogues, chunks) if risk_dialogues
                    else [0] * min(chunks, dialogues), strict=False))


def run_chunks(pack: Any, bank: Any, weights: dict[str, float] | None, seed: int, dialogues: int, chunks: int,
               max_turns: int, risk_dialogues: int = 0) -> Runs:
    """The policy with ``weights`` (None: defaults) on all tuning chunks, concatenated in chunk order."""
    from coact.graphs.policy.simulator import PolicyAgent, Simulator

    sim = Simulator(pack, bank, max_turns=max_turns)
    agent = PolicyAgent(pack, weights)
    return Runs.concat([run_chunk(sim, agent, seed, k, a, b)
                        for k, (a, b) in enumerate(chunk_plan(dialogues, risk_dialogues, chunks))])


def tune_trial(config: dict[str, Any], bank: Any = None, pack: Any = None, seed: int = 0, dialogues: int = 600,
               chunks: int = 6, max_turns: int = 6, reference: Runs | None = None, risk_dialogues: int = 0) -> None:
    """One Tune trial: the policy with ``config``'s weights on ``dialogues`` tuning users (and
    ``risk_dialogues`` at-risk ones), reported per chunk.

    ``reference`` is the default weights' Runs on the same chunks (computed once in the driver;
    recomputed here when missing): each report pairs the trial's conversations so far with the defaults' on
    the same users, for the per-kind shortfall terms of the objective."""
    from ray import tune

    from coact.graphs.policy.simulator import PolicyAgent, Simulator

    if reference is None:
        reference = run_chunks(pack, bank, None, seed, dialogues, chunks, max_turns, risk_dialogues)
    sim = Simulator(pack, bank, max_turns=max_turns)
    agent = PolicyAgent(pack, weights_of(config))
    parts: list[Runs] = []
    done = done_risk = 0
    for k, (a, b) in enumerate(chunk_plan(dialogues, risk_dialogues, chunks)):
        parts.append(run_chunk(sim, agent, seed, k, a, b))
        done, done_risk = done + a, done_risk + b
        result, ref = Runs.concat(parts), reference.take(done, done_risk)
        if not np.array_equal(result.pooled.kind, ref.pooled.kind):
            raise RuntimeError("tune_trial: the reference run met other users than this trial")
        tune.report({"dialogues": done, "risk_dialogues": done_risk, **trial_metrics(result, ref)})


def run_tuning(args: argparse.Namespace, pack: Any, bank_tune: Any, storage: Path, reference: Any = None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    defaults = {k: float(pack.utilities.weights[k]) for k in SEARCH_SPACE}
    trainable = tune.with_parameters(tune_trial, bank=bank_tune, pack=pack, seed=args.seed,
                                     dialogues=args.dialogues, chunks=args.chunks, max_turns=args.max_turns,
                                     reference=reference, risk_dialogues=args.risk_dialogues)
    if args.search == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE, seeded, started from the hand-set weights: the bars of the selection reward changes that keep
        # the defaults' handling of at-risk users, which random draws over the whole box rarely make.
        search_alg = OptunaSearch(points_to_evaluate=[defaults], sampler=optuna.samplers.TPESampler(
            seed=args.seed, n_startup_trials=max(4, args.num_samples // 6)))
    else:
        search_alg = BasicVariantGenerator(points_to_evaluate=[defaults], random_state=args.seed)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPUS}),
        param_space=param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=args.num_samples,
            search_alg=search_alg,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.chunks,
                                    grace_period=min(2, args.chunks), reduction_factor=3),
            max_concurrent_trials=args.max_concurrent or None,
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name="tune", verbose=args.verbose,
                                  # TensorBoard files per trial in tune/<trial>/ (and MLflow / W&B on request)
                                  callbacks=tune_callbacks(args.tracking, storage, "tune_policy")),
    )
    return tuner.fit()


def trial_columns() -> list[str]:
    from coact.graphs.policy.simulator import GOAL_KINDS

    cols = [METRIC, *SUMMARY_COLUMNS, *OVERALL_DIFF_COLUMNS]
    for kind in GOAL_KINDS:
        cols += [f"{kind}_{c}" for c in (*KIND_COLUMNS, *DIFF_COLUMNS)]
    return cols


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
            **{c: m.get(c, float("nan")) for c in trial_columns()},
            **{f"w_{k}": result.config.get(k) for k in SEARCH_SPACE},
        })
    return rows


def rejection_reasons(row: dict[str, Any], reference: dict[str, float] | None,
                      tolerance_se: float = TOLERANCE_SE) -> list[str]:
    """Why ``row`` (a trial, metrics on the tuning users) may not replace the defaults; [] when it may.

    The bars, all against ``reference`` (the defaults on the same users): the trial ran all chunks; higher
    success; equal or fewer mean turns; and for each protected kind (at risk, out of scope) a success no lower
    than the defaults' minus ``tolerance_se`` paired standard errors of the difference (``<kind>_success_diff_se``)
    and a regret no higher than the defaults' plus ``tolerance_se`` paired SEs (``<kind>_regret_diff_se``).
    A kind without users on the tuning side is not checked.
    """
    reasons = []
    if row["status"] != "completed":
        reasons.append(f"not completed ({row['status']})")
    if reference is None:
        return reasons
    if not row["success"] > reference["success"] + EPS:
        reasons.append(f"success {row['success']:.4f} not above the defaults' {reference['success']:.4f}")
    elif finite(row.get("success_diff")) and finite(row.get("success_diff_se")) and \
            float(row["success_diff"]) <= MIN_GAIN_SE * float(row["success_diff_se"]) + EPS:
        reasons.append(f"success gain {float(row['success_diff']):+.4f} within {MIN_GAIN_SE} paired SE "
                       f"({float(row['success_diff_se']):.4f})")
    if row["mean_turns"] > reference["mean_turns"] + EPS:
        reasons.append(f"mean turns {row['mean_turns']:.4f} above the defaults' {reference['mean_turns']:.4f}")
    for kind in PROTECTED_KINDS:
        if not reference.get(f"{kind}_n", 0):
            continue
        for m, sign, word in (("success", -1.0, "lower"), ("regret", 1.0, "higher")):
            mine, theirs = float(row[f"{kind}_{m}"]), float(reference[f"{kind}_{m}"])
            worse = sign * (mine - theirs)  # > 0: worse than the defaults
            tol = protected_tolerance(row.get(f"{kind}_{m}_diff_se"), tolerance_se)
            if not np.isfinite(worse) or worse > tol + EPS:
                reasons.append(f"{kind} {m} {mine:.4f} {word} than the defaults' {theirs:.4f} "
                               f"({mine - theirs:+.4f}, tolerance {tol:.4f})")
    return reasons


def best_row(rows: list[dict[str, Any]], reference: dict[str, float] | None = None,
             tolerance_se: float = TOLERANCE_SE) -> dict[str, Any] | None:
    """The completed trial with the highest objective; with ``reference`` (the defaults on the same users),
    only among trials that pass every bar of :func:`rejection_reasons` (more success, no more turns, no lost
    success and no added regret on the protected kinds beyond the tolerance).

    None when no completed trial qualifies. Ties (several weightings that make the same decisions) go to the
    earliest trial, so the defaults (trial 0) win a tie.
    """
    ok = [r for r in rows if not rejection_reasons(r, reference, tolerance_se)]
    return max(ok, key=lambda r: (r[METRIC], -r["trial"])) if ok else None


def closest_row(rows: list[dict[str, Any]], reference: dict[str, float], defaults: dict[str, float],
                tolerance_se: float = TOLERANCE_SE) -> dict[str, Any] | None:
    """For the report when nothing qualifies: the completed non-default trial that fails the fewest bars,
    highest objective first."""
    cand = [r for r in rows if r["status"] == "completed"
            and any(abs(float(r[f"w_{k}"]) - float(defaults[k])) > EPS for k in SEARCH_SPACE)]
    return min(cand, key=lambda r: (len(rejection_reasons(r, reference, tolerance_se)), -r[METRIC], r["trial"]),
               default=None)


def reference_run(pack: Any, bank_tune: Any, args: argparse.Namespace) -> tuple[Any, dict[str, float]]:
    """The default weights on exactly the tuning users every trial met (same chunks, same streams): the
    SimulationResult (handed to the trials) and its metrics (the bars of the selection)."""
    result = run_chunks(pack, bank_tune, None, args.seed, args.dialogues, args.chunks, args.max_turns,
                        args.risk_dialogues)
    return result, {"n": len(result.natural), **trial_metrics(result, result)}


def held_out_checks(default: Runs, other: Runs) -> tuple[dict[str, bool], dict[str, dict[str, float]]]:
    """The selection's bars applied to ``other`` vs ``default`` on the same (held-out) users, and the paired
    differences (other minus default) they read: overall (natural users) and per goal kind (pooled with
    the stratum)."""
    from coact.graphs.policy.simulator import GOAL_KINDS, paired_difference

    paired = {m: paired_difference(default.natural, other.natural, m)
              for m in ("success", "turns", "escalated", "regret")}
    for kind in GOAL_KINDS:
        for m in ("success", "regret"):
            paired[f"{kind}_{m}"] = paired_difference(default.pooled, other.pooled, m, kind=kind)
    checks = {"overall": bool(paired["success"]["mean"] > EPS and paired["turns"]["mean"] <= EPS)}
    for kind in PROTECTED_KINDS:
        ps, pr = paired[f"{kind}_success"], paired[f"{kind}_regret"]
        checks[kind] = bool(ps["n"] == 0 or (ps["mean"] >= -protected_tolerance(ps["se"]) - EPS
                                             and pr["mean"] <= protected_tolerance(pr["se"]) + EPS))
    return checks, paired


def plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def jsonable(value: Any) -> Any:
    """Strict JSON: numpy scalars as Python ones, nan (an undefined SE, a kind without users) as null."""
    value = plain(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------ report
def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Policies side by side: overall measures and success per goal kind (``rows``: name -> report)."""
    head = (f"{'policy':10s} {'n':>6s} {'success':>8s} {'turns':>6s} {'escal.':>7s} {'asked':>6s} {'regret':>7s} "
            f"{'at risk':>8s} {'out of sc.':>10s} {'plain FAQ':>9s}")
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        k = s["by_kind"]
        lines.append(f"{name:10s} {s['n']:6d} {s['success']:8.4f} {s['mean_turns']:6.3f} {s['escalation_rate']:7.4f} "
                     f"{s['question_rate']:6.3f} {s['regret']:7.3f} {k['at_risk'].get('success', float('nan')):8.4f} "
                     f"{k['out_of_scope'].get('success', float('nan')):10.4f} {k['faq'].get('success', float('nan')):9.4f}")
    return "\n".join(lines)


def format_kinds(reports: dict[str, dict[str, Any]], key: str = "by_kind") -> str:
    """Per goal kind (``key="by_kind"``) or user kind (``"by_user_kind"``): each policy's line."""
    from coact.graphs.policy.simulator import GOAL_KINDS, USER_KINDS

    label = "kind" if key == "by_kind" else "user kind"
    lines = [f"{label:13s} {'policy':9s} {'n':>6s} {'success':>8s} {'turns':>6s} {'escal.':>7s} {'regret':>7s}"]
    for kind in GOAL_KINDS if key == "by_kind" else USER_KINDS:
        for name, rep in reports.items():
            s = rep.get(key, {}).get(kind, {})
            if s.get("n", 0) == 0:
                continue
            lines.append(f"{kind:13s} {name:9s} {s['n']:6d} {s['success']:8.4f} {s['mean_turns']:6.3f} "
                         f"{s['escalation_rate']:7.4f} {s['regret']:7.3f}")
    return "\n".join(lines)


def describe(row: dict[str, Any]) -> str:
    return (f"objective {row[METRIC]:.4f}, success {row['success']:.4f}, turns {row['mean_turns']:.3f}, "
            f"regret {row['regret']:.3f}; " + ", ".join(
                f"{k.replace('_', ' ')} success {row[f'{k}_success']:.4f} ({row[f'{k}_success_diff']:+.4f}) "
                f"regret {row[f'{k}_regret']:.3f} ({row[f'{k}_regret_diff']:+.3f})" for k in PROTECTED_KINDS))


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.tune_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"Tune trials (default {DEFAULTS['num_samples']})")
    p.add_argument("--dialogues", type=int, default=None,
                   help=f"simulated conversations per trial (default {DEFAULTS['dialogues']})")
    p.add_argument("--chunks", type=int, default=None,
                   help=f"reports per trial, ASHA's time unit (default {DEFAULTS['chunks']})")
    p.add_argument("--eval-dialogues", type=int, default=None,
                   help=f"fresh conversations for the final comparison (default {DEFAULTS['eval_dialogues']})")
    p.add_argument("--risk-dialogues", type=int, default=None,
                   help=f"extra at-risk users per trial (default {DEFAULTS['risk_dialogues']}; 0: none)")
    p.add_argument("--eval-risk-dialogues", type=int, default=None,
                   help=f"extra at-risk users in the final comparison (default {DEFAULTS['eval_risk_dialogues']})")
    p.add_argument("--search", choices=("tpe", "random"), default="tpe",
                   help="Optuna TPE (default) or random search; both start from the hand-set weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="artefact folder (default $COACT_RESULTS_DIR or <repo>/results, then tune_policy/<timestamp>)")
    p.add_argument("--address", default=None, help="Ray address to attach to (default: a local Ray on 127.0.0.1, "
                                                   "or the job's cluster under `ray job submit`)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    p.add_argument("--max-concurrent", type=int, default=0, help="concurrent trials (default 0: as CPUs allow)")
    p.add_argument("--max-turns", type=int, default=None,
                   help="user turns before a conversation is handed over (default: graphs.simulator's)")
    p.add_argument("--domain", default="banking", help="domain pack name or YAML path")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models folder (default: $COACT_MODELS_DIR or <repo>/models, built if missing)")
    p.add_argument("--verbose", type=int, default=1, help="Tune verbosity 0-3")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: {SMOKE}")
    add_tracking_arg(p)
    args = p.parse_args(argv)
    C.apply_preset(args, SMOKE if args.smoke else DEFAULTS)
    for key in ("num_samples", "dialogues", "chunks", "eval_dialogues"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("risk_dialogues", "eval_risk_dialogues"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must not be negative")
    args.chunks = min(args.chunks, args.dialogues)
    if args.max_turns is None:
        from coact.graphs.policy.simulator import DEFAULT_MAX_TURNS

        args.max_turns = DEFAULT_MAX_TURNS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()
    started = time.perf_counter()
    out = C.output_dir("tune_policy", args.output)
    log(f"artefacts will go to {out}")

    from coact.cluster.bank import bank_cache_path
    from coact.graphs.policy.simulator import OracleAgent, PolicyAgent, Simulator

    t0 = time.perf_counter()
    pack, bank, models = C.utterance_bank(args.domain, args.models_dir, log=log)
    log(f"utterance bank: {len(bank)} held-out texts ({bank_cache_path(models, pack)}, "
        f"{time.perf_counter() - t0:.1f}s)")
    bank_tune, bank_eval = bank.split(0.5, seed=args.seed)
    log(f"tuning on {len(bank_tune)} texts, evaluating on the other {len(bank_eval)}")

    t0 = time.perf_counter()
    reference_result, reference = reference_run(pack, bank_tune, args)
    log(f"default weights on the {len(reference_result.natural)} tuning users (+{args.risk_dialogues} at risk) ({time.perf_counter() - t0:.1f}s): "
        f"success {reference['success']:.4f}, turns {reference['mean_turns']:.3f}, at risk "
        f"{reference['at_risk_success']:.4f} (n={reference['at_risk_n']}), out of scope "
        f"{reference['out_of_scope_success']:.4f} (n={reference['out_of_scope_n']})")
    owns_ray = init_ray(args.address, args.num_cpus)
    try:
        t0 = time.perf_counter()
        grid = run_tuning(args, pack, bank_tune, out, reference=reference_result)
        tune_s = time.perf_counter() - t0
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    rows = trial_table(grid, args.chunks)
    for r in rows:
        reasons = rejection_reasons(r, reference) if r["status"] != "error" else ["error"]
        r["qualifies"] = not reasons
        r["rejected_because"] = "; ".join(reasons)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    if not any(r["status"] != "error" for r in rows):
        raise RuntimeError("every Tune trial failed; see the trial errors above")
    defaults = dict(pack.utilities.weights)
    best = best_row(rows, reference)
    unconstrained = best_row(rows)
    closest = closest_row(rows, reference, defaults) if best is None else None
    log(f"tuning: {len(rows)} trials in {tune_s:.1f}s "
        f"({sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{sum(r['status'] == 'stopped_early' for r in rows)} stopped early by ASHA, "
        f"{sum(r['qualifies'] for r in rows)} qualify); defaults on the tuning users: {describe(reference)}")
    if unconstrained is not None:
        log(f"best trial by objective alone: {unconstrained['trial']} ({describe(unconstrained)})")
    if best is None:
        log("no completed trial beats the defaults' success at equal or fewer turns without losing at-risk or "
            "out-of-scope success or adding regret there on the tuning users: keeping the defaults")
        if closest is not None:
            log(f"closest trial: {closest['trial']} ({describe(closest)}); fails: "
                f"{'; '.join(rejection_reasons(closest, reference))}")
        tuned = defaults
    else:
        log(f"selected trial {best['trial']} (best objective among the qualifying trials): {describe(best)}")
        tuned = {**defaults, **{k: float(best[f"w_{k}"]) for k in SEARCH_SPACE}}

    # Held-out comparison: fresh users (own seed stream) typing texts from the evaluation half only.
    t0 = time.perf_counter()
    sim = Simulator(pack, bank_eval, max_turns=args.max_turns)
    users = sim.users(args.eval_dialogues, args.seed, stream="eval")
    stratum = sim.users(args.eval_risk_dialogues, args.seed, stream="eval", kind=STRATUM_KIND) \
        if args.eval_risk_dialogues else None

    def held_out(agent: Any) -> Runs:
        return Runs(sim.run(agent, users=users), None if stratum is None else sim.run(agent, users=stratum))

    results = {
        "default": held_out(PolicyAgent(pack, None)),
        "tuned": held_out(PolicyAgent(pack, tuned)),
        "oracle": held_out(OracleAgent()),
    }
    closest_weights = None
    if closest is not None:  # nothing qualified: show what the nearest miss would have done (not shipped)
        closest_weights = {**defaults, **{k: float(closest[f"w_{k}"]) for k in SEARCH_SPACE}}
        results["closest"] = held_out(PolicyAgent(pack, closest_weights))
    eval_s = time.perf_counter() - t0
    all_reports = {name: r.report() for name, r in results.items()}
    for name, rep in all_reports.items():
        rep[METRIC] = trial_metrics(results[name], results["default"])[METRIC]
    reports = {k: all_reports[k] for k in ("default", "tuned", "oracle")}
    held_out, paired = held_out_checks(results["default"], results["tuned"])
    target_met = all(held_out.values())
    comparison = {
        "target": "tuned success > default success at equal or fewer mean turns, and at-risk and out-of-scope "
                  f"success no lower and regret no higher than the defaults' beyond {TOLERANCE_SE} paired SE "
                  "(held-out users)",
        "target_met": target_met,
        "target_checks": held_out,
        "reports": reports,
        "paired_tuned_minus_default": paired,
        "weights": {"default": defaults, "tuned": tuned},
        "selected_trial": None if best is None else {k: plain(v) for k, v in best.items()},
        "closest_trial": None if closest is None else {
            **{k: plain(v) for k, v in closest.items()}, "weights": closest_weights,
            "held_out_report": all_reports["closest"],
            **dict(zip(("held_out_checks", "paired_minus_default"),
                       held_out_checks(results["default"], results["closest"]), strict=True))},
        "selection": "highest objective among completed trials that, on the tuning users, have higher success "
                     "than the default weights at equal or fewer mean turns, and neither lower at-risk or "
                     "out-of-scope success nor higher at-risk or out-of-scope regret beyond "
                     f"{TOLERANCE_SE} paired standard errors; otherwise the defaults",
        "tolerance_se": TOLERANCE_SE,
        "default_on_tuning_users": reference,
        "objective": {"formula": "success - a * mean_turns - b * needless_escalation_rate - d * max(0, turns diff) "
                                 "- sum_k c_k * (max(0, -k success diff) + max(0, k regret diff) / k oracle "
                                 "utility), diffs paired with the defaults on the same users",
                      "a": TURN_PENALTY, "b": ESCALATION_PENALTY, "c": SHORTFALL_PENALTY,
                      "d": TURN_EXCESS_PENALTY},
        "settings": {"num_samples": args.num_samples, "dialogues_per_trial": args.dialogues, "chunks": args.chunks,
                     "eval_dialogues": args.eval_dialogues, "risk_dialogues_per_trial": args.risk_dialogues,
                     "eval_risk_dialogues": args.eval_risk_dialogues, "search": args.search, "seed": args.seed, "max_turns": args.max_turns,
                     "domain": pack.name, "models_dir": str(models), "bank": bank.meta,
                     "tune_texts": len(bank_tune), "eval_texts": len(bank_eval), "smoke": args.smoke},
        "seconds": {"tune": round(tune_s, 1), "eval": round(eval_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    (out / "comparison.json").write_text(json.dumps(jsonable(comparison), indent=2, allow_nan=False) + "\n",
                                         encoding="utf-8")
    (out / "best_weights.json").write_text(json.dumps(
        {"weights": tuned, "trial": None if best is None else int(best["trial"]),
         "objective": reference[METRIC] if best is None else float(best[METRIC]),
         "tuned_on_dialogues": args.dialogues, "seed": args.seed}, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"held-out comparison ({args.eval_dialogues} fresh simulated users + {args.eval_risk_dialogues} at-risk "
          "ones, evaluation utilities = pack defaults; overall columns: the natural mix; success per goal kind on "
          "the right, at risk pooled with the stratum)")
    shown = [k for k in ("default", "tuned", "closest", "oracle") if k in all_reports]
    print(format_table({k: all_reports[k] for k in shown}))
    print()
    print(format_kinds({k: all_reports[k] for k in shown}))
    print()
    print(format_kinds({k: all_reports[k] for k in shown}, "by_user_kind"))
    for name in shown[1:-1]:
        checks, diffs = held_out_checks(results["default"], results[name])
        print()
        print(f"{name} - default (paired, same users)" + (f", trial {closest['trial']}, NOT selected:"
                                                          if name == "closest" else ":"))
        for key, pk in diffs.items():
            print(f"  {key:21s} {pk['mean']:+.4f} (se {pk['se']:.4f})")
        print(f"  bars on held-out users: {checks}")
    print(f"target met: {target_met}" + ("" if best is not None else " (no trial qualified: tuned = defaults)"))
    print()
    print(f"artefacts: {out}")
    for name in ("results.csv", "best_weights.json", "comparison.json", "tune/"):
        print(f"  {out / name}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
