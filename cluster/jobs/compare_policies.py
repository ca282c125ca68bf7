"""Compare the VOI policy, a tuned policy, a Rasa-style baseline and the oracle on the same simulated users.

Every agent meets exactly the same users (common random numbers: same hidden states, texts and choices), who
type held-out texts from the *evaluation* half of the utterance bank (``UtteranceBank.split(0.5, seed)``, the
half ``tune_policy`` never tunes on):

- ``voi``: the served policy with the pack's hand-set utility weights;
- ``tuned``: the same policy with the weights of a ``best_weights.json`` (``--weights``), or of a fresh small
  ``tune_policy`` run when none is given;
- ``rasa``: ``graphs.baselines.RasaAgent`` (FallbackClassifier 0.3 / 0.1 + TwoStageFallback + rules);
- ``oracle``: knows the hidden state, never asks.

Prints (and writes with ``--output``) markdown tables: success, turns, escalations and regret overall, per user
kind and per goal kind, and the paired differences of each agent with the VOI policy.

    python -m coact.cluster.jobs.compare_policies --weights results/tune_policy/<run>/best_weights.json
    python -m coact.cluster.jobs.compare_policies --dialogues 3000 --risk-dialogues 1000 --output docs/compare.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AGENTS = ("voi", "tuned", "rasa", "oracle")
SMALL_TUNE = ["--num-samples", "8", "--dialogues", "600", "--chunks", "2", "--risk-dialogues", "200",
              "--eval-dialogues", "300", "--eval-risk-dialogues", "100", "--max-concurrent", "2"]


def log(msg: str) -> None:
    print(f"[compare_policies] {msg}", flush=True)


def run_agents(pack: Any, bank: Any, tuned: Mapping[str, float] | None, dialogues: int, risk_dialogues: int,
               seed: int = 0, stream: str = "compare", max_turns: int | None = None,
               agents: tuple[str, ...] = AGENTS) -> dict[str, Any]:
    """Each agent's ``Runs`` (natural mix + at-risk stratum) on the same users."""
    from coact.cluster.jobs.tune_policy import STRATUM_KIND, Runs
    from coact.graphs.policy.baselines import RasaAgent
    from coact.graphs.policy.simulator import DEFAULT_MAX_TURNS, OracleAgent, PolicyAgent, Simulator

    sim = Simulator(pack, bank, max_turns=max_turns or DEFAULT_MAX_TURNS)
    users = sim.users(dialogues, seed, stream=stream)
    stratum = sim.users(risk_dialogues, seed, stream=stream, kind=STRATUM_KIND) if risk_dialogues else None
    make = {"voi": lambda: PolicyAgent(pack), "tuned": lambda: PolicyAgent(pack, tuned),
            "rasa": lambda: RasaAgent(pack), "oracle": OracleAgent}
    out = {}
    for name in agents:
        t0 = time.perf_counter()
        agent = make[name]()
        out[name] = Runs(sim.run(agent, users=users), None if stratum is None else sim.run(agent, users=stratum))
        log(f"{name}: {len(users)} + {0 if stratum is None else len(stratum)} conversations in "
            f"{time.perf_counter() - t0:.1f}s")
    return out


def _cell(s: Mapping[str, float], key: str, fmt: str) -> str:
    return format(s[key], fmt) if s.get("n", 0) else "–"


def markdown_tables(runs: Mapping[str, Any]) -> str:
    """Overall, per user kind (natural mix) and per goal kind (natural mix + at-risk stratum), and paired
    differences with the VOI policy."""
    from coact.graphs.policy.simulator import GOAL_KINDS, USER_KINDS, paired_difference

    names = list(runs)
    lines = ["| agent | n | success | turns | escalations | questions / conv. | regret |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        s = runs[name].natural.summary()
        lines.append(f"| {name} | {s['n']} | {s['success']:.3f} | {s['mean_turns']:.2f} | "
                     f"{s['escalation_rate']:.3f} | {s['mean_questions']:.2f} | {s['regret']:.2f} |")
    def per_kind(title: str, column: str, kinds: Any, stats_of: Any, cols: tuple[tuple[str, str], ...]) -> None:
        lines.extend(["", title, "", f"| {column} | n | " + " | ".join(names) + " |",
                      "|---|---:|" + "---|" * len(names)])
        for kind in kinds:
            stats = {name: stats_of(runs[name])[kind] for name in names}
            n = stats[names[0]].get("n", 0)
            if n:
                cells = [" / ".join(_cell(s, key, fmt) for key, fmt in cols) for s in stats.values()]
                lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")

    per_kind("Per user kind (success / turns / escalations / regret):", "user kind", USER_KINDS,
             lambda r: r.natural.by_user_kind(),
             (("success", ".3f"), ("mean_turns", ".2f"), ("escalation_rate", ".2f"), ("regret", ".2f")))
    per_kind("Per goal kind, at-risk users pooled with the stratum (success / turns / regret):", "goal kind",
             GOAL_KINDS, lambda r: r.pooled.by_kind(), (("success", ".3f"), ("mean_turns", ".2f"), ("regret", ".2f")))
    if "voi" in runs:
        lines += ["", "Paired differences with `voi` on the same users (mean ± se; natural mix; at-risk pooled):", "",
                  "| agent | success | turns | escalations | regret | at-risk success |", "|---|---:|---:|---:|---:|---:|"]
        for name in names:
            if name == "voi":
                continue
            a, b = runs["voi"], runs[name]
            d = {m: paired_difference(a.natural, b.natural, m) for m in ("success", "turns", "escalated", "regret")}
            d["risk"] = paired_difference(a.pooled, b.pooled, "success", kind="at_risk")
            lines.append(f"| {name} | " + " | ".join(f"{d[m]['mean']:+.3f} ± {d[m]['se']:.3f}"
                                                     for m in ("success", "turns", "escalated", "regret", "risk")) + " |")
    return "\n".join(lines)


def finding_weight_table(pack: Any, bank: Any, weights: list[float], dialogues: int, risk_dialogues: int,
                         seed: int = 0, over_bank: Any = None) -> tuple[str, dict[str, Any]]:
    """The VOI policy at each ``dialogue.finding_weight``: success, at-risk success, turns, regret on the same
    users, and over-asking on ``over_bank`` (the whole bank's BANKING77 test rows)."""
    from coact.cluster.jobs.over_asking import over_asking
    from coact.graphs.policy.simulator import with_finding_weight

    rows, out = [], {}
    for w in weights:
        variant = with_finding_weight(pack, w)
        runs = run_agents(variant, bank, None, dialogues, risk_dialogues, seed=seed, agents=("voi",))["voi"]
        over = over_asking(variant, over_bank if over_bank is not None else bank)
        s, risk = runs.natural.summary(), runs.pooled.by_kind()["at_risk"]
        out[f"{w:g}"] = {"report": runs.report(), "over_asking": over}
        rows.append(f"| {w:g} | {s['success']:.3f} | {risk['success']:.3f} (n={risk['n']}) | {s['mean_turns']:.2f} | "
                    f"{s['escalation_rate']:.3f} | {s['regret']:.2f} | {100 * over['over_asking']:.2f}% "
                    f"({over['over_asked']}/{over['n']}) |")
    head = ["| finding_weight | success | at-risk success | turns | escalations | regret | over-asking |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(head + rows), out


def tuned_weights(args: argparse.Namespace, models: Path) -> tuple[dict[str, float], str]:
    if args.weights is not None:
        return dict(json.loads(args.weights.read_text())["weights"]), str(args.weights)
    from coact.cluster.jobs import tune_policy

    out = Path(tempfile.mkdtemp(prefix="compare-tune-"))
    log(f"no --weights: a small tune_policy run into {out}")
    argv = [*SMALL_TUNE, "--seed", str(args.seed), "--output", str(out), "--models-dir", str(models),
            "--verbose", "0"]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    tune_policy.main(argv)
    return dict(json.loads((out / "best_weights.json").read_text())["weights"]), str(out / "best_weights.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.compare_policies", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="best_weights.json of a tune_policy run "
                   "(default: run a small tune_policy first)")
    p.add_argument("--dialogues", type=int, default=3000, help="simulated users (natural mix)")
    p.add_argument("--risk-dialogues", type=int, default=1000, help="extra at-risk users (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=None)
    p.add_argument("--domain", default="banking")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray for the small tune run")
    p.add_argument("--finding-weights", type=float, nargs="+", default=None,
                   help="instead of the comparison: the VOI policy at these dialogue.finding_weight values")
    p.add_argument("--output", type=Path, default=None, help="write the markdown tables here (and a .json beside)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from coact.cluster.jobs.common import utterance_bank
    from coact.cluster.jobs.tune_policy import jsonable

    pack, bank, models = utterance_bank(args.domain, args.models_dir)
    _, bank_eval = bank.split(0.5, seed=args.seed)
    command = "python -m coact.cluster.jobs.compare_policies " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.finding_weights:
        table, result = finding_weight_table(pack, bank_eval, args.finding_weights, args.dialogues,
                                             args.risk_dialogues, seed=args.seed, over_bank=bank)
        header = (f"VOI policy (pack weights), {args.dialogues} simulated users (+{args.risk_dialogues} at risk), "
                  f"seed {args.seed}, evaluation half of the bank; over-asking on all BANKING77 test texts")
        print(header, "", table, sep="\n")
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(f"<!-- {command} -->\n{header}\n\n{table}\n", encoding="utf-8")
            args.output.with_suffix(".json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
        return 0
    tuned, source = tuned_weights(args, models)
    runs = run_agents(pack, bank_eval, tuned, args.dialogues, args.risk_dialogues, seed=args.seed,
                      max_turns=args.max_turns)
    table = markdown_tables(runs)
    header = (f"{args.dialogues} simulated users (+{args.risk_dialogues} at risk), seed {args.seed}, texts from the "
              f"evaluation half of the bank ({len(bank_eval)} texts; acts: {bank.meta.get('acts_version')}); "
              f"tuned weights: {source}")
    print(header)
    print()
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"<!-- {command} -->\n{header}\n\n{table}\n", encoding="utf-8")
        report = {name: r.report() for name, r in runs.items()}
        args.output.with_suffix(".json").write_text(json.dumps(jsonable(
            {"command": command, "header": header, "tuned_weights": tuned, "reports": report}), indent=1) + "\n")
        log(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
