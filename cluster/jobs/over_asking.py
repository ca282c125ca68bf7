"""Over-asking on the BANKING77 test split: confident, correct messages that still get a question.

For every BANKING77 test message whose top intent is the right one with ``p >= --min-p`` (0.8), the first
turn of a fresh session goes through the served turn logic (``plan_turn`` -> ``Policy.decide``, via
``graphs.simulator.PolicyAgent`` on the utterance bank's precomputed classifier outputs). Such a message
needs no clarification: the share whose decision is a question or a hand-over is *over-asking*. Printed
overall, by decision (which question, escalate), and by the intents that get asked; written as JSON.

    python -m coact.cluster.jobs.over_asking [--models-dir models] [--output over_asking.json]
        [--finding-weight 0.5] [--weights best_weights.json] [--min-p 0.8]

At-risk goals (lost card, unrecognised payment, ...) are among them: a question there may be worth its
cost (the card might be at risk), so the figure is broken down by intent rather than read as pure waste.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OVER_KINDS = ("ask", "escalate")
SOURCE = "banking77/test"


def confident_rows(bank: Any, min_p: float = 0.8, source: str = SOURCE) -> list[int]:
    """Bank rows of ``source`` whose top intent is the true goal with probability at least ``min_p``."""
    import numpy as np

    top = bank.intent_probs.argmax(axis=1)
    labels = np.asarray(bank.intent_labels, dtype=object)
    goals = np.asarray(bank.goal_states, dtype=object)[bank.goal]
    ok = (bank.source == source) & (labels[top] == goals) & (bank.intent_probs.max(axis=1) >= min_p)
    return [int(i) for i in np.flatnonzero(ok)]


def over_asking(pack: Any, bank: Any, weights: Mapping[str, float] | None = None, min_p: float = 0.8,
                rows: list[int] | None = None, top: int = 15) -> dict[str, Any]:
    """The share of confident, correct first messages (``confident_rows``) whose first decision on a fresh
    session is a question or a hand-over, with its breakdowns."""
    from coact.graphs.policy.simulator import PolicyAgent, Simulator

    sim = Simulator(pack, bank)
    agent = PolicyAgent(pack, weights)
    rows = confident_rows(bank, min_p) if rows is None else rows
    kinds: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    intents: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for i in rows:
        reply = agent.turn(agent.start(), sim.goal_message(i))
        kinds[reply.kind] += 1
        if reply.kind in OVER_KINDS:
            goal = bank.goal_states[int(bank.goal[i])]
            actions[reply.action] += 1
            intents[goal] += 1
            examples.setdefault(goal, []).append(str(bank.texts[i]))
    n = len(rows)
    over = sum(kinds[k] for k in OVER_KINDS)
    return {
        "n": n, "over_asking": over / n if n else float("nan"), "over_asked": over, "min_p": min_p,
        "finding_weight": pack.dialogue.finding_weight,
        "finding_prior": {k: float(v) for k, v in zip(bank.finding_names, bank.finding_prior, strict=True)},
        "by_kind": {k: v / n for k, v in sorted(kinds.items())},
        "by_action": dict(actions.most_common()),
        "top_intents": {g: {"count": c, "examples": examples[g][:3]} for g, c in intents.most_common(top)},
        "decisions": agent.decisions,
    }


def format_report(result: Mapping[str, Any], title: str = "") -> str:
    lines = [f"over-asking{f' ({title})' if title else ''}: {result['over_asked']} / {result['n']} confident, "
             f"correct BANKING77 test messages (p >= {result['min_p']}) get a question or a hand-over: "
             f"{100 * result['over_asking']:.2f}%  (finding_weight {result['finding_weight']})",
             "  first decision: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["by_kind"].items())]
    if result["by_action"]:
        lines.append("  asked / handed over: " + ", ".join(f"{k} {v}" for k, v in result["by_action"].items()))
    for goal, info in result["top_intents"].items():
        lines.append(f"    {goal:40s} {info['count']:4d}  e.g. {info['examples'][0]!r}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.over_asking", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models folder (default: $COACT_MODELS_DIR or <repo>/models, built if missing)")
    p.add_argument("--domain", default="banking")
    p.add_argument("--min-p", type=float, default=0.8)
    p.add_argument("--finding-weight", type=float, nargs="+", default=None,
                   help="dialogue.finding_weight values to measure (default: the pack's)")
    p.add_argument("--weights", type=Path, default=None, help="a best_weights.json to decide with")
    p.add_argument("--output", type=Path, default=None, help="write the result(s) as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from coact.cluster.jobs.common import utterance_bank
    from coact.graphs.policy.simulator import with_finding_weight

    pack, bank, models = utterance_bank(args.domain, args.models_dir)
    weights = json.loads(args.weights.read_text())["weights"] if args.weights else None
    results = {}
    for w in args.finding_weight or [pack.dialogue.finding_weight]:
        variant = with_finding_weight(pack, w)
        results[f"finding_weight={w:g}"] = r = over_asking(variant, bank, weights, args.min_p)
        print(format_report(r))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = next(iter(results.values())) if len(results) == 1 else results
        args.output.write_text(json.dumps({**({"models_dir": str(models), "bank": bank.meta} if len(results) == 1
                                              else {}), **payload}, indent=1) + "\n", encoding="utf-8")
        print(f"written: {args.output}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
