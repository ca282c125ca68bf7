"""Exact inference on small discrete Bayesian networks: a networkx DAG plus numpy CPTs.

Queries run variable elimination with numpy einsum. The symbolic part of a query (which variables
matter, the elimination order, the einsum subscripts) depends only on *which* variables are
queried and observed, not on the observed values, so it is planned once and cached; a repeated
query shape then costs only the numeric contractions (tens of microseconds on the domain network).

Evidence comes in two kinds:
- hard: `{variable: state}`; the CPTs are sliced at the observed state;
- soft (virtual, Pearl): a likelihood vector λ(v) multiplied in as an extra factor. It is folded
  into v's own CPT along its last axis, which is the same product and saves a factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import networkx as nx
import numpy as np

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MAX_OPERANDS = 24  # numpy's einsum accepts at most 32 operands; stay well below
_PLAN_CACHE_SIZE = 4096
_NORMALISATION_ATOL = 1e-6  # bnlearn files carry rows that sum to 1 only within ~1e-7


@dataclass(frozen=True)
class SoftEvidence:
    """Virtual evidence: a likelihood λ(state) for one variable (need not sum to 1)."""

    variable: str
    likelihood: np.ndarray
    label: str = ""


@dataclass(frozen=True)
class _Step:
    operands: tuple[int, ...]  # ids into the running factor list
    subscripts: str  # einsum expression producing the new factor


@dataclass(frozen=True)
class _Plan:
    # One input factor per relevant variable: its CPT, with the hard-observed axes named.
    inputs: tuple[tuple[str, tuple[str | None, ...]], ...]
    steps: tuple[_Step, ...]  # the last step produces the table over `out_vars`
    out_vars: tuple[str, ...]


class BayesNet:
    """A discrete Bayesian network.

    `cpts[v]` has shape `(*[len(states[p]) for p in parents[v]], len(states[v]))`: one distribution
    over v's states (last axis) for every joint state of its parents (leading axes, in `parents[v]` order).
    """

    def __init__(
        self,
        states: Mapping[str, Sequence[str]],
        parents: Mapping[str, Sequence[str]],
        cpts: Mapping[str, np.ndarray],
    ) -> None:
        self.states: dict[str, list[str]] = {v: [str(s) for s in ss] for v, ss in states.items()}
        self.parents: dict[str, list[str]] = {v: list(parents.get(v, [])) for v in self.states}
        self._validate_names(parents, cpts)
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(self.states)
        self.graph.add_edges_from((p, v) for v, ps in self.parents.items() for p in ps)
        if not nx.is_directed_acyclic_graph(self.graph):
            cycle = nx.find_cycle(self.graph)
            raise ValueError(f"the network has a cycle: {' -> '.join(u for u, _ in cycle)} -> {cycle[0][0]}")
        self.variables: list[str] = list(nx.lexicographical_topological_sort(self.graph, key=self._order_key))
        self.cpts: dict[str, np.ndarray] = {v: self._checked_cpt(v, cpts[v]) for v in self.variables}
        self._index = {v: {s: i for i, s in enumerate(ss)} for v, ss in self.states.items()}
        self._ancestors = {v: frozenset(nx.ancestors(self.graph, v)) for v in self.variables}
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    # ----------------------------------------------------------------- validation
    def _order_key(self, v: str) -> str:
        # Topological order ties follow declaration order, so `variables` is stable and readable.
        return f"{self._declared[v]:08d}"

    def _validate_names(self, parents: Mapping[str, Sequence[str]], cpts: Mapping[str, np.ndarray]) -> None:
        self._declared = {v: i for i, v in enumerate(self.states)}
        for v, ss in self.states.items():
            if len(ss) == 0:
                raise ValueError(f"variable {v!r}: needs at least one state")
            if len(set(ss)) != len(ss):
                raise ValueError(f"variable {v!r}: duplicate state names {ss}")
        for v in parents:
            if v not in self.states:
                raise ValueError(f"parents given for unknown variable {v!r}")
        for v, ps in self.parents.items():
            for p in ps:
                if p not in self.states:
                    raise ValueError(f"variable {v!r}: unknown parent {p!r}")
            if len(set(ps)) != len(ps):
                raise ValueError(f"variable {v!r}: duplicate parents {ps}")
            if v in ps:
                raise ValueError(f"variable {v!r}: is its own parent")
        for v in cpts:
            if v not in self.states:
                raise ValueError(f"CPT given for unknown variable {v!r}")
        for v in self.states:
            if v not in cpts:
                raise ValueError(f"variable {v!r}: no CPT")

    def _checked_cpt(self, v: str, table: np.ndarray) -> np.ndarray:
        arr = np.array(table, dtype=float)
        shape = (*(len(self.states[p]) for p in self.parents[v]), len(self.states[v]))
        if arr.shape != shape:
            raise ValueError(
                f"variable {v!r}: CPT has shape {arr.shape}, expected {shape} (parents {self.parents[v]} then {v})"
            )
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"variable {v!r}: CPT entries must be finite and non-negative")
        sums = arr.sum(axis=-1)
        if not np.allclose(sums, 1.0, rtol=0.0, atol=_NORMALISATION_ATOL):
            worst = float(np.max(np.abs(sums - 1.0)))
            raise ValueError(f"variable {v!r}: CPT rows must sum to 1 over the last axis (worst deviation {worst:.3g})")
        arr.setflags(write=False)  # plans and callers share these arrays
        return arr

    def _check_variable(self, v: str, what: str) -> None:
        if v not in self.states:
            raise ValueError(f"{what}: unknown variable {v!r}")

    def _hard_indices(self, hard: Mapping[str, str] | None) -> dict[str, int]:
        out: dict[str, int] = {}
        for v, s in (hard or {}).items():
            self._check_variable(v, "hard evidence")
            idx = self._index[v].get(str(s))
            if idx is None:
                raise ValueError(f"hard evidence: {v!r} has no state {s!r} (states: {self.states[v]})")
            out[v] = idx
        return out

    def _soft_vectors(self, soft: Iterable[SoftEvidence] | None) -> dict[str, np.ndarray]:
        # Several items on one variable multiply into one likelihood.
        out: dict[str, np.ndarray] = {}
        for item in soft or ():
            self._check_variable(item.variable, "soft evidence")
            lam = np.asarray(item.likelihood, dtype=float)
            card = len(self.states[item.variable])
            if lam.shape != (card,):
                raise ValueError(
                    f"soft evidence on {item.variable!r}: likelihood has shape {lam.shape}, expected ({card},)"
                )
            if not np.all(np.isfinite(lam)) or np.any(lam < 0) or not np.any(lam > 0):
                raise ValueError(
                    f"soft evidence on {item.variable!r}: likelihood must be finite, non-negative and not all zero"
                )
            out[item.variable] = out[item.variable] * lam if item.variable in out else lam
        return out

    # ----------------------------------------------------------------- planning
    def _plan(self, query: tuple[str, ...], hard: frozenset[str], soft: frozenset[str]) -> _Plan:
        key = (query, hard, soft)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(query, hard, soft)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                try:  # evict the oldest; tolerate another thread evicting at the same time
                    self._plans.pop(next(iter(self._plans)), None)
                except (StopIteration, RuntimeError):
                    pass
            self._plans[key] = plan
        return plan

    def _make_plan(self, query: tuple[str, ...], hard: frozenset[str], soft: frozenset[str]) -> _Plan:
        # Barren nodes (no query/evidence below them) sum to one: only ancestors of query ∪ evidence matter.
        targets = set(query) | hard | soft
        relevant: set[str] = set(targets)
        for v in targets:
            relevant |= self._ancestors[v]
        ordered = [v for v in self.variables if v in relevant]

        inputs = []
        scopes: list[tuple[str, ...]] = []
        for v in ordered:
            axes = (*self.parents[v], v)
            inputs.append((v, tuple(a if a in hard else None for a in axes)))
            scopes.append(tuple(a for a in axes if a not in hard))

        order = self._elimination_order(ordered, hard, set(query))
        steps: list[_Step] = []
        live = list(range(len(scopes)))

        def add_step(ids: list[int], out: tuple[str, ...]) -> int:
            # Chunk very wide products: einsum takes a bounded number of operands.
            while len(ids) > _MAX_OPERANDS:
                head, ids = ids[:_MAX_OPERANDS], ids[_MAX_OPERANDS:]
                union = tuple(dict.fromkeys(a for i in head for a in scopes[i]))
                ids = [add_step(head, union), *ids]
            letters: dict[str, str] = {}
            for a in (*(a for i in ids for a in scopes[i]), *out):
                if a not in letters:
                    if len(letters) == len(_LETTERS):
                        raise ValueError("query too wide for einsum (more than 52 variables in one factor product)")
                    letters[a] = _LETTERS[len(letters)]
            lhs = ",".join("".join(letters[a] for a in scopes[i]) for i in ids)
            steps.append(_Step(tuple(ids), f"{lhs}->{''.join(letters[a] for a in out)}"))
            scopes.append(out)
            return len(scopes) - 1

        for var in order:
            ids = [i for i in live if var in scopes[i]]
            out = tuple(dict.fromkeys(a for i in ids for a in scopes[i] if a != var))
            new = add_step(ids, out)
            live = [i for i in live if i not in ids] + [new]
        if live:
            add_step(live, query)
        return _Plan(inputs=tuple(inputs), steps=tuple(steps), out_vars=query)

    def _elimination_order(self, relevant: list[str], hard: frozenset[str], keep: set[str]) -> list[str]:
        """Greedy min-fill on the moral graph (ties: smallest clique weight, then topological position).

        `relevant` is closed under ancestors, so every family lies inside it; the moral graph is built
        from the families directly (networkx's moral_graph on a subgraph view costs more than the query).
        """
        adj: dict[str, set[str]] = {v: set() for v in relevant if v not in hard}
        for v in relevant:
            family = [u for u in (*self.parents[v], v) if u not in hard]  # observed variables are sliced away
            for a, b in combinations(family, 2):
                adj[a].add(b)
                adj[b].add(a)
        card = {v: len(self.states[v]) for v in adj}
        position = {v: i for i, v in enumerate(relevant)}
        todo = [v for v in relevant if v in adj and v not in keep]
        order: list[str] = []
        while todo:
            def score(v: str) -> tuple[int, float, int]:
                nbrs = adj[v]
                fill = sum(1 for a, b in combinations(nbrs, 2) if b not in adj[a])
                weight = math.prod(card[u] for u in nbrs) * card[v]
                return fill, weight, position[v]

            best = min(todo, key=score)
            nbrs = adj.pop(best)
            for a, b in combinations(nbrs, 2):
                adj[a].add(b)
                adj[b].add(a)
            for u in nbrs:
                adj[u].discard(best)
            todo.remove(best)
            order.append(best)
        return order

    # ----------------------------------------------------------------- inference
    def _contract(
        self, query: Sequence[str], hard: Mapping[str, str] | None, soft: Sequence[SoftEvidence] | None
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Unnormalised P(query-minus-hard, evidence) over the non-hard query variables, in query order."""
        hidx = self._hard_indices(hard)
        lams = self._soft_vectors(soft)
        free = tuple(v for v in query if v not in hidx)
        plan = self._plan(free, frozenset(hidx), frozenset(lams))
        factors: list[np.ndarray] = []
        for v, axes in plan.inputs:
            table = self.cpts[v]
            if v in lams:
                table = table * lams[v]
            if any(a is not None for a in axes):
                table = table[tuple(slice(None) if a is None else hidx[a] for a in axes)]
            factors.append(table)
        if not plan.steps:  # nothing queried or observed: the empty product
            return np.ones(()), hidx
        for step in plan.steps:
            factors.append(np.einsum(step.subscripts, *(factors[i] for i in step.operands)))
        return np.asarray(factors[-1], dtype=float), hidx

    def query(
        self,
        variables: Sequence[str],
        hard: Mapping[str, str] | None = None,
        soft: Sequence[SoftEvidence] | None = None,
    ) -> np.ndarray:
        """Exact joint posterior P(variables | evidence), axes in the order given, normalised.

        A variable that is itself observed (hard) gets a one-hot axis.
        """
        if isinstance(variables, str):
            raise TypeError("query: pass a list of variable names, not a single string")
        variables = list(variables)
        for v in variables:
            self._check_variable(v, "query")
        if len(set(variables)) != len(variables):
            raise ValueError(f"query: duplicate variables in {variables}")
        table, hidx = self._contract(variables, hard, soft)
        total = float(table.sum())
        if not total > 0.0 or not math.isfinite(total):
            raise ValueError(f"the evidence is impossible under the network (P(evidence) = 0): {self._describe(hard, soft)}")
        table = table / total
        if len(variables) == table.ndim:
            return table
        full = np.zeros(tuple(len(self.states[v]) for v in variables))
        full[tuple(hidx[v] if v in hidx else slice(None) for v in variables)] = table
        return full

    def marginals(
        self,
        variables: Sequence[str] | None = None,
        hard: Mapping[str, str] | None = None,
        soft: Sequence[SoftEvidence] | None = None,
    ) -> dict[str, np.ndarray]:
        """P(v | evidence) for each v (all variables when None); one cached-plan query each."""
        names = self.variables if variables is None else list(variables)
        return {v: self.query([v], hard, soft) for v in names}

    def evidence_probability(
        self, hard: Mapping[str, str] | None = None, soft: Sequence[SoftEvidence] | None = None
    ) -> float:
        """P(hard evidence) weighted by the soft likelihoods: Σ_x P(x) [x agrees with hard] Π λ_i(x_i)."""
        table, _ = self._contract((), hard, soft)
        return float(table)

    @staticmethod
    def _describe(hard: Mapping[str, str] | None, soft: Sequence[SoftEvidence] | None) -> str:
        parts = [f"{v}={s}" for v, s in (hard or {}).items()]
        parts += [f"soft({item.label or item.variable})" for item in soft or ()]
        return ", ".join(parts) or "no evidence"

    def clear_plan_cache(self) -> None:
        """Forget the cached query plans (benchmarks use it to time planning too)."""
        self._plans.clear()

    def state_index(self, variable: str, state: str) -> int:
        self._check_variable(variable, "state_index")
        try:
            return self._index[variable][state]
        except KeyError:
            raise ValueError(f"{variable!r} has no state {state!r} (states: {self.states[variable]})") from None

    def __repr__(self) -> str:
        return f"BayesNet({len(self.states)} variables, {self.graph.number_of_edges()} edges)"


def sample(net: BayesNet, rng: np.random.Generator, n: int) -> list[dict[str, str]]:
    """Forward (ancestral) sampling of `n` full joint states, vectorised per variable."""
    codes: dict[str, np.ndarray] = {}
    for v in net.variables:
        rows = net.cpts[v][tuple(codes[p] for p in net.parents[v])] if net.parents[v] else np.broadcast_to(
            net.cpts[v], (n, len(net.states[v]))
        )
        cum = np.cumsum(rows, axis=-1)
        # Scale by the row total so rows summing to 1 - 1e-7 never yield an out-of-range index.
        u = rng.random(n) * cum[:, -1]
        codes[v] = np.minimum((cum <= u[:, None]).sum(axis=-1), len(net.states[v]) - 1)
    names = {v: net.states[v] for v in net.variables}
    return [{v: names[v][int(codes[v][i])] for v in net.variables} for i in range(n)]


def from_pgmpy(model: Any) -> BayesNet:
    """Convert a pgmpy DiscreteBayesianNetwork (TabularCPDs) into a BayesNet.

    pgmpy stores values as (card, *evidence_cards) with `cpd.variables[1:]` the parents; ours put the
    variable last. Each CPD carries its own state-name order for the parents, which is mapped onto
    the parent's own order when the two differ.
    """
    # Duck-typed on the model's TabularCPDs, so pgmpy (a test-only dependency) is never imported here.
    cpds = {cpd.variable: cpd for cpd in model.get_cpds()}
    missing = set(model.nodes()) - set(cpds)
    if missing:
        raise ValueError(f"pgmpy model has no CPD for {sorted(missing)}")
    states = {str(v): [str(s) for s in cpd.state_names[v]] for v, cpd in cpds.items()}
    parents: dict[str, list[str]] = {}
    cpts: dict[str, np.ndarray] = {}
    for v, cpd in cpds.items():
        ps = [str(p) for p in cpd.variables[1:]]
        values = np.asarray(cpd.values, dtype=float).reshape(tuple(int(c) for c in cpd.cardinality))
        table = np.moveaxis(values, 0, -1)
        for axis, p in enumerate(cpd.variables[1:]):
            local = [str(s) for s in cpd.state_names[p]]
            if local != states[str(p)]:
                table = np.take(table, [local.index(s) for s in states[str(p)]], axis=axis)
        parents[str(v)] = ps
        cpts[str(v)] = table
    return BayesNet(states=states, parents=parents, cpts=cpts)
