"""Exact inference, side by side: graphs.bayesnet against pgmpy's VariableElimination.

    python -m coact.cluster.experiments.bench_inference [--networks asia child insurance alarm banking] [--repeats 5]
    python -m coact.cluster.experiments.bench_inference --networks all --policy --json results/bench/inference.json
    python -m coact.cluster.experiments.bench_inference --quick        # asia + banking, few queries (tests)

For every network the same random queries (hard evidence drawn from a forward sample, so it is
possible, plus optionally one virtual-evidence item) run through both engines in one process; the
table shows per-query medians and the pgmpy/coact ratio, and the answers must agree to 1e-9.

- coact cold: the plan cache cleared before every call (so it includes pruning and ordering);
- coact warm: a repeated query shape, the case of a running dialogue;
- pgmpy with virtual evidence rewrites its engine's model in place, so those queries build a fresh
  `VariableElimination` each time (part of pgmpy's cost for such a query); hard-only queries reuse one.

`--policy`: the decision engine's time per dialogue turn on the banking network. Every inference query
the policy makes during a turn (posterior and expected utilities, one per answer of every askable
question for the value of information, the leave-one-out explanation) is recorded and replayed through
pgmpy; all answers must agree to 1e-9, and the table compares pgmpy's summed query time with the
policy's whole turn (inference + utilities + VOI + explanation).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from coact.graphs.policy.bayesnet import BayesNet, SoftEvidence, from_pgmpy, sample

BNLEARN = ("asia", "child", "insurance", "alarm", "hailfinder", "hepar2")
DEFAULT_NETWORKS = ("asia", "child", "insurance", "alarm", "banking")
QUICK_NETWORKS = ("asia", "banking")
AGREE_ATOL = 1e-9


@dataclass
class Query:
    variables: list[str]
    hard: dict[str, str]
    soft: list[SoftEvidence]


def to_pgmpy(net: BayesNet) -> Any:
    from pgmpy.factors.discrete import TabularCPD
    from pgmpy.models import DiscreteBayesianNetwork

    model = DiscreteBayesianNetwork()
    model.add_nodes_from(net.variables)
    model.add_edges_from((p, v) for v in net.variables for p in net.parents[v])
    for v in net.variables:
        ps = net.parents[v]
        values = np.moveaxis(net.cpts[v], -1, 0).reshape(len(net.states[v]), -1)
        model.add_cpds(TabularCPD(
            v, len(net.states[v]), values, evidence=ps or None,
            evidence_card=[len(net.states[p]) for p in ps] or None,
            state_names={u: net.states[u] for u in (v, *ps)},
        ))
    return model


def load_network(name: str) -> tuple[BayesNet, Any, list[str]]:
    """(engine net, pgmpy model, variables the queries ask about)."""
    if name == "banking":
        from coact.graphs.policy.domain import build_actions, build_network, load_pack

        pack = load_pack("banking")
        net = build_network(pack)
        utility_vars = list(dict.fromkeys(v for a in build_actions(pack, pack.utilities.weights) for v in a.on))
        return net, to_pgmpy(net), utility_vars
    from pgmpy.readwrite import BIFReader

    from coact.cluster.datasets import data_dir

    path = data_dir() / "bnlearn_bif" / f"{name}.bif.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        model = BIFReader(string=f.read()).get_model()
    net = from_pgmpy(model)
    return net, model, net.variables


def make_queries(
    net: BayesNet, targets: list[str], joint: bool, rng: np.random.Generator, n: int, n_hard: int, virtual: bool
) -> list[Query]:
    queries = []
    for _ in range(n):
        world = sample(net, rng, 1)[0]
        candidates = [v for v in net.variables if v not in targets] if joint else net.variables
        picked = [str(v) for v in rng.choice(candidates, size=min(n_hard + 1, len(candidates)), replace=False)]
        hard = {v: world[v] for v in picked[:n_hard]}
        soft = []
        if virtual:
            # The policy's case: a classifier's likelihood on the first target (the intent, for banking).
            v = targets[0] if joint else picked[-1]
            soft = [SoftEvidence(v, rng.uniform(0.05, 1.0, len(net.states[v])), label=f"virtual {v}")]
        if joint:
            variables = list(targets)
        else:
            free = [v for v in targets if v not in hard]
            variables = [str(rng.choice(free))]
        queries.append(Query(variables, hard, soft))
    return queries


def pgmpy_answer(model: Any, engine: Any, q: Query) -> tuple[np.ndarray, Callable[[], Any]]:
    from pgmpy.factors.discrete import TabularCPD
    from pgmpy.inference import VariableElimination

    virtual = [
        TabularCPD(s.variable, len(s.likelihood), np.asarray(s.likelihood).reshape(-1, 1),
                   state_names={s.variable: model.get_cpds(s.variable).state_names[s.variable]})
        for s in q.soft
    ]

    def run() -> Any:
        eng = VariableElimination(model) if virtual else engine
        return eng.query(q.variables, evidence=q.hard or None, virtual_evidence=virtual or None, show_progress=False)

    factor = run()
    values = np.transpose(np.asarray(factor.values), [factor.variables.index(v) for v in q.variables])
    return values, run


def median_seconds(fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_network(name: str, repeats: int, n_queries: int, seed: int) -> list[dict[str, Any]]:
    from pgmpy.inference import VariableElimination

    net, model, targets = load_network(name)
    engine = VariableElimination(model)
    rows = []
    joint = name == "banking"  # the policy asks for one joint over the utility variables
    n_hard = 2 if joint else max(2, len(net.variables) // 8)
    for virtual in (False, True):
        rng = np.random.default_rng(seed)
        queries = make_queries(net, targets, joint, rng, n_queries, n_hard, virtual)
        cold, warm, theirs, worst = [], [], [], 0.0
        for q in queries:
            ours = net.query(q.variables, q.hard, q.soft)
            ref, run = pgmpy_answer(model, engine, q)
            diff = float(np.max(np.abs(ours - ref)))
            assert diff < AGREE_ATOL, f"{name}: answers differ by {diff:.3g} on {q}"
            worst = max(worst, diff)

            def ask(q: Query = q) -> np.ndarray:
                return net.query(q.variables, q.hard, q.soft)

            cold.append(median_seconds(ask, repeats, before=net.clear_plan_cache))
            ask()
            warm.append(median_seconds(ask, repeats))
            theirs.append(median_seconds(run, repeats))
        rows.append({
            "network": name,
            "nodes": len(net.variables),
            "evidence": f"{n_hard} hard" + (" + 1 virtual" if virtual else ""),
            "query": "joint " + ",".join(targets) if joint else "1 marginal",
            "pgmpy_ms": statistics.median(theirs) * 1e3,
            "cold_ms": statistics.median(cold) * 1e3,
            "warm_ms": statistics.median(warm) * 1e3,
            "max_diff": worst,
        })
    return rows


def policy_turns(n_turns: int, seed: int) -> list[Any]:
    """Realistic decision inputs: an intent likelihood and finding likelihoods, plus 0-2 answered questions."""
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import SessionEvidence, SoftEvidenceItem
    from coact.graphs.policy.policy import Policy

    pack = load_pack("banking")
    policy = Policy(pack)
    rng = np.random.default_rng(seed)
    turns = []
    for i in range(n_turns):
        soft = []
        for var in [pack.intent_variable, *(f.name for f in pack.findings)]:
            states = policy.net.states[var]
            lam = rng.dirichlet(np.full(len(states), 0.3)) + 1e-3
            soft.append(SoftEvidenceItem(variable=var, likelihood=dict(zip(states, (lam / lam.max()).tolist(),
                                                                              strict=True)), label=f"turn {i}: {var}"))
        hard = {}
        for q in policy.questions[: int(rng.integers(0, 3))]:
            hard[q.variable] = str(rng.choice(policy.net.states[q.variable]))
        turns.append(SessionEvidence(soft=soft, hard=hard, asked=list(hard)))
    return [policy, turns]


def bench_policy(repeats: int, n_turns: int, seed: int) -> dict[str, Any]:
    """Time per turn of the whole policy vs pgmpy answering the same inference queries."""
    from pgmpy.inference import VariableElimination

    policy, turns = policy_turns(n_turns, seed)
    net = policy.net
    model = to_pgmpy(net)
    engine = VariableElimination(model)
    recorded: list[Query] = []
    original = net.query

    def recording(variables, hard=None, soft=None):  # the instance attribute shadows the method
        recorded.append(Query(list(variables), dict(hard or {}), list(soft or [])))
        return original(variables, hard, soft)

    ours_turn, ours_queries, theirs_turn, n_queries, worst = [], [], [], [], 0.0
    for evidence in turns:
        policy.decide(evidence)  # warm: the dialogue's repeated shapes hit the plan cache
        ours_turn.append(median_seconds(lambda e=evidence: policy.decide(e), repeats))
        recorded.clear()
        net.query = recording
        try:
            policy.decide(evidence)
        finally:
            del net.query
        queries = list(recorded)
        n_queries.append(len(queries))
        pg_total, our_total = 0.0, 0.0
        for q in queries:
            ref, run = pgmpy_answer(model, engine, q)
            ours = original(q.variables, q.hard, q.soft)
            worst = max(worst, float(np.max(np.abs(ours - ref))))
            assert worst < AGREE_ATOL, f"policy query answers differ by {worst:.3g} on {q}"
            pg_total += median_seconds(run, repeats)
            our_total += median_seconds(lambda q=q: original(q.variables, q.hard, q.soft), repeats)
        theirs_turn.append(pg_total)
        ours_queries.append(our_total)
    return {
        "network": "banking policy", "nodes": len(net.variables), "turns": n_turns,
        "queries_per_turn": statistics.median(n_queries),
        "coact_turn_ms": statistics.median(ours_turn) * 1e3,
        "coact_inference_ms": statistics.median(ours_queries) * 1e3,
        "pgmpy_inference_ms": statistics.median(theirs_turn) * 1e3,
        "max_diff": worst,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=None, choices=[*BNLEARN, "banking", "all"],
                        help=f"networks to run (default: {' '.join(DEFAULT_NETWORKS)}; all: every bnlearn one + banking)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per query; the median is kept")
    parser.add_argument("--queries", type=int, default=20, help="random queries per network and evidence kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", action="store_true", help="also time the policy per turn (banking)")
    parser.add_argument("--turns", type=int, default=10, help="--policy: decision inputs timed")
    parser.add_argument("--quick", action="store_true", help="asia + banking, 4 queries, 2 repeats, policy on 3 turns")
    parser.add_argument("--json", default=None, help="write the rows (and machine facts) to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.networks, args.queries, args.repeats, args.policy, args.turns = list(QUICK_NETWORKS), 4, 2, True, 3
    if args.networks is None:
        args.networks = list(DEFAULT_NETWORKS)
    elif "all" in args.networks:
        args.networks = [*BNLEARN, "banking"]

    warnings.filterwarnings("ignore")  # pgmpy's deprecation chatter
    rows = [row for name in args.networks for row in bench_network(name, args.repeats, args.queries, args.seed)]

    header = (f"{'network':<10} {'nodes':>5}  {'evidence':<20} {'query':<32} {'pgmpy ms':>9} "
              f"{'coact cold':>10} {'coact warm':>10} {'pgmpy/cold':>10} {'pgmpy/warm':>10} {'max |diff|':>10}")
    print(f"per-query medians over {args.queries} queries x {args.repeats} repeats (same queries for both engines)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['network']:<10} {r['nodes']:>5}  {r['evidence']:<20} {r['query'][:32]:<32} {r['pgmpy_ms']:>9.3f} "
              f"{r['cold_ms']:>10.3f} {r['warm_ms']:>10.3f} {r['pgmpy_ms'] / r['cold_ms']:>9.1f}x "
              f"{r['pgmpy_ms'] / r['warm_ms']:>9.1f}x {r['max_diff']:>10.1e}")
    print(f"all answers agree within {AGREE_ATOL:g}")
    policy = None
    if args.policy:
        policy = bench_policy(args.repeats, args.turns, args.seed)
        print(f"\ndecision engine per turn (banking, {policy['nodes']} nodes, {args.turns} turns, "
              f"{policy['queries_per_turn']:.0f} inference queries per turn, same answers within {AGREE_ATOL:g}):")
        print(f"  coact whole turn {policy['coact_turn_ms']:.2f} ms (its inference {policy['coact_inference_ms']:.2f} ms)"
              f"; pgmpy for the same queries {policy['pgmpy_inference_ms']:.1f} ms -> "
              f"{policy['pgmpy_inference_ms'] / policy['coact_turn_ms']:.1f}x (whole turn), "
              f"{policy['pgmpy_inference_ms'] / policy['coact_inference_ms']:.1f}x (inference only)")
    from coact.cluster.experiments.harness import write_result

    write_result(args.json, networks=rows, policy=policy)


if __name__ == "__main__":
    main()
