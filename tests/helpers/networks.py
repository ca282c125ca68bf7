"""Random Bayesian networks for the exactness and policy property tests."""

from __future__ import annotations

import numpy as np

from coact.graphs.policy.bayesnet import BayesNet


def random_network(seed: int, n_vars: int | None = None, zero_frac: float = 0.0) -> BayesNet:
    """A random DAG (each variable takes up to 3 earlier parents) with random Dirichlet CPTs.

    Variables are declared in shuffled order so the engine's own topological sort is exercised.
    """
    rng = np.random.default_rng(seed)
    n = int(n_vars or rng.integers(5, 8))
    names = [f"X{i}" for i in range(n)]
    states = {v: [f"{v}s{k}" for k in range(int(rng.integers(2, 5)))] for v in names}
    parents: dict[str, list[str]] = {}
    cpts: dict[str, np.ndarray] = {}
    for i, v in enumerate(names):
        k = int(rng.integers(0, min(i, 3) + 1))
        parents[v] = [names[j] for j in rng.choice(i, size=k, replace=False)] if k else []
        shape = (*(len(states[p]) for p in parents[v]), len(states[v]))
        table = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]) if parents[v] else rng.dirichlet(np.ones(shape[-1]))
        if zero_frac:
            # Knock out some entries (never a whole row) to make some evidence impossible.
            mask = rng.random(table.shape) < zero_frac
            mask[..., 0] = False
            table = np.where(mask, 0.0, table)
            table = table / table.sum(axis=-1, keepdims=True)
        cpts[v] = table
    order = list(rng.permutation(names))
    return BayesNet(
        states={v: states[v] for v in order}, parents={v: parents[v] for v in order}, cpts={v: cpts[v] for v in order}
    )
