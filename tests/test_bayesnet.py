"""Exactness of graphs.bayesnet: brute-force enumeration on random networks, pgmpy on bnlearn networks."""

from __future__ import annotations

import gzip
import warnings
from functools import cache

import numpy as np
import pytest

from coact.graphs.policy.bayesnet import BayesNet, SoftEvidence, from_pgmpy, sample
from tests.helpers.data import data_root, require, require_module
from tests.helpers.networks import random_network

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------- random networks (tests/helpers/networks.py)


def brute_joint(net: BayesNet) -> tuple[np.ndarray, list[str]]:
    """The full joint by explicit products over every axis (axes in `net.variables` order)."""
    order = net.variables
    letters = {v: chr(ord("a") + i) for i, v in enumerate(order)}
    joint = np.ones(tuple(len(net.states[v]) for v in order))
    for v in order:
        sub = "".join(letters[a] for a in (*net.parents[v], v))
        joint = np.einsum(f"{''.join(letters[a] for a in order)},{sub}->{''.join(letters[a] for a in order)}",
                          joint, net.cpts[v])
    return joint, order


def brute_posterior(net: BayesNet, query: list[str], hard: dict[str, str], soft: list[SoftEvidence]) -> np.ndarray:
    joint, order = brute_joint(net)
    weighted = joint.copy()
    for v, s in hard.items():
        mask = np.zeros(len(net.states[v]))
        mask[net.states[v].index(s)] = 1.0
        weighted = weighted * mask.reshape([-1 if a == v else 1 for a in order])
    for item in soft:
        weighted = weighted * np.asarray(item.likelihood).reshape([-1 if a == item.variable else 1 for a in order])
    summed = weighted.sum(axis=tuple(i for i, a in enumerate(order) if a not in query))
    kept = [a for a in order if a in query]
    table = np.transpose(summed, [kept.index(v) for v in query])
    return table / weighted.sum()


def brute_evidence_probability(net: BayesNet, hard: dict[str, str], soft: list[SoftEvidence]) -> float:
    joint, order = brute_joint(net)
    for item in soft:  # before slicing: soft evidence may sit on a hard-observed variable
        joint = joint * np.asarray(item.likelihood).reshape([-1 if a == item.variable else 1 for a in order])
    for v, s in hard.items():
        joint = np.take(joint, [net.states[v].index(s)], axis=order.index(v))
    return float(joint.sum())


def random_evidence(
    net: BayesNet, rng: np.random.Generator, n_hard: int, n_soft: int
) -> tuple[dict[str, str], list[SoftEvidence]]:
    chosen = list(rng.choice(net.variables, size=n_hard + n_soft, replace=True))
    hard = {v: str(rng.choice(net.states[v])) for v in chosen[:n_hard]}
    soft = [
        SoftEvidence(v, rng.uniform(0.05, 2.0, size=len(net.states[v])), label=f"soft {v}") for v in chosen[n_hard:]
    ]
    return hard, soft


@pytest.mark.parametrize("seed", range(12))
def test_random_networks_match_brute_force(seed: int) -> None:
    net = random_network(seed)
    rng = np.random.default_rng(1000 + seed)
    checked = 0
    for _ in range(8):
        # Some draws put several soft items on one variable (they multiply) or soft on a hard variable.
        hard, soft = random_evidence(net, rng, int(rng.integers(0, 3)), int(rng.integers(0, 4)))
        k = int(rng.integers(1, 4))
        query = [str(v) for v in rng.choice(net.variables, size=k, replace=False)]
        got = net.query(query, hard, soft)
        want = brute_posterior(net, query, hard, soft)
        assert got.shape == tuple(len(net.states[v]) for v in query)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert abs(got.sum() - 1.0) < 1e-12

        marg = net.marginals(net.variables, hard, soft)
        for v in net.variables:
            np.testing.assert_allclose(marg[v], brute_posterior(net, [v], hard, soft), rtol=0, atol=1e-12)

        pe = net.evidence_probability(hard, soft)
        assert pe == pytest.approx(brute_evidence_probability(net, hard, soft), rel=1e-12, abs=1e-15)
        checked += 1
    assert checked == 8


def test_hard_evidence_on_query_variable_is_one_hot() -> None:
    net = random_network(3)
    v, w = net.variables[0], net.variables[-1]
    state = net.states[v][-1]
    got = net.query([w, v], hard={v: state})
    assert got.shape == (len(net.states[w]), len(net.states[v]))
    assert np.all(got[:, :-1] == 0.0)
    np.testing.assert_allclose(got[:, -1], brute_posterior(net, [w], {v: state}, []), atol=1e-12)


def test_cached_plan_uses_current_evidence_values() -> None:
    # Same query shape, different observed states/likelihoods: the cached plan must not freeze the values.
    net = random_network(5)
    v, q = net.variables[-1], net.variables[0]
    for state in net.states[v]:
        for scale in ([1.0] * len(net.states[q]), list(range(1, len(net.states[q]) + 1))):
            soft = [SoftEvidence(q, np.array(scale, dtype=float))]
            np.testing.assert_allclose(
                net.query([q], {v: state}, soft), brute_posterior(net, [q], {v: state}, soft), atol=1e-12
            )


def test_empty_query_and_no_evidence() -> None:
    net = random_network(7)
    assert net.evidence_probability() == pytest.approx(1.0)
    assert float(net.query([])) == pytest.approx(1.0)
    joint, order = brute_joint(net)
    np.testing.assert_allclose(net.query(order), joint, atol=1e-12)


def test_forward_sampling_frequencies() -> None:
    net = random_network(11, n_vars=5)
    samples = sample(net, np.random.default_rng(0), 40_000)
    assert len(samples) == 40_000 and set(samples[0]) == set(net.variables)
    for v in net.variables:
        freq = np.array([sum(s[v] == st for s in samples) for st in net.states[v]]) / len(samples)
        # 40k draws: standard error <= 0.0025, so 0.015 is a > 5 sigma bound.
        np.testing.assert_allclose(freq, net.query([v]), atol=0.015)


def test_sampling_is_reproducible() -> None:
    net = random_network(2)
    a = sample(net, np.random.default_rng(42), 50)
    b = sample(net, np.random.default_rng(42), 50)
    assert a == b


# --------------------------------------------------------------------------- validation


def _two_node(cpt_b: np.ndarray | None = None) -> BayesNet:
    return BayesNet(
        states={"A": ["a0", "a1"], "B": ["b0", "b1"]},
        parents={"B": ["A"]},
        cpts={"A": np.array([0.4, 0.6]), "B": np.array([[1.0, 0.0], [0.3, 0.7]]) if cpt_b is None else cpt_b},
    )


def test_cycle_is_rejected() -> None:
    with pytest.raises(ValueError, match="cycle"):
        BayesNet(
            states={"A": ["0", "1"], "B": ["0", "1"]},
            parents={"A": ["B"], "B": ["A"]},
            cpts={"A": np.full((2, 2), 0.5), "B": np.full((2, 2), 0.5)},
        )


def test_bad_cpt_shape_names_the_variable() -> None:
    with pytest.raises(ValueError, match="'B'.*shape"):
        _two_node(np.full((2, 3), 1 / 3))


def test_unnormalised_cpt_names_the_variable() -> None:
    with pytest.raises(ValueError, match="'B'.*sum to 1"):
        _two_node(np.array([[0.5, 0.6], [0.3, 0.7]]))


def test_negative_cpt_is_rejected() -> None:
    with pytest.raises(ValueError, match="'B'.*non-negative"):
        _two_node(np.array([[1.5, -0.5], [0.3, 0.7]]))


@pytest.mark.parametrize(
    ("states", "parents", "cpts", "message"),
    [
        ({"A": ["0", "1"]}, {"A": ["Z"]}, {"A": np.full((2, 2), 0.5)}, "'A'.*unknown parent 'Z'"),
        ({"A": ["0", "1"]}, {"Q": []}, {"A": np.full(2, 0.5)}, "unknown variable 'Q'"),
        ({"A": ["0", "1"]}, {}, {"A": np.full(2, 0.5), "Q": np.ones(1)}, "unknown variable 'Q'"),
        ({"A": ["0", "1"], "B": ["0"]}, {}, {"A": np.full(2, 0.5)}, "'B'.*no CPT"),
        ({"A": ["0", "0"]}, {}, {"A": np.full(2, 0.5)}, "'A'.*duplicate state"),
    ],
)
def test_bad_names_are_rejected(states: dict, parents: dict, cpts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BayesNet(states=states, parents=parents, cpts=cpts)


def test_bad_evidence_is_rejected() -> None:
    net = _two_node()
    with pytest.raises(ValueError, match="unknown variable 'C'"):
        net.query(["A"], hard={"C": "c0"})
    with pytest.raises(ValueError, match="'B' has no state 'b9'"):
        net.query(["A"], hard={"B": "b9"})
    with pytest.raises(ValueError, match="unknown variable 'Z'"):
        net.query(["Z"])
    with pytest.raises(ValueError, match="duplicate"):
        net.query(["A", "A"])
    with pytest.raises(ValueError, match="soft evidence on 'A'.*shape"):
        net.query(["B"], soft=[SoftEvidence("A", np.ones(3))])
    with pytest.raises(ValueError, match="soft evidence on 'A'.*non-negative"):
        net.query(["B"], soft=[SoftEvidence("A", np.array([1.0, -1.0]))])
    with pytest.raises(ValueError, match="soft evidence on 'A'.*not all zero"):
        net.query(["B"], soft=[SoftEvidence("A", np.zeros(2))])


def test_impossible_evidence_is_rejected() -> None:
    net = _two_node()  # P(B=b1 | A=a0) = 0
    with pytest.raises(ValueError, match="impossible"):
        net.query(["B"], hard={"A": "a0", "B": "b1"})
    # Soft evidence can also rule everything out: λ(B) = [1, 0] together with B=b1 observed.
    with pytest.raises(ValueError, match="impossible"):
        net.query(["A"], hard={"B": "b1"}, soft=[SoftEvidence("B", np.array([1.0, 0.0]))])
    assert net.evidence_probability(hard={"A": "a0", "B": "b1"}) == 0.0
    # Possible evidence: P(A=a0 | B=b0) = 0.4 / (0.4 + 0.18)
    np.testing.assert_allclose(net.query(["A"], hard={"B": "b0"}), [0.4 / 0.58, 0.18 / 0.58], atol=1e-15)


def test_zero_entries_match_brute_force_when_possible() -> None:
    net = random_network(21, zero_frac=0.3)
    rng = np.random.default_rng(0)
    tried = possible = 0
    while possible < 10 and tried < 200:
        tried += 1
        hard, soft = random_evidence(net, rng, 2, 1)
        want_pe = brute_evidence_probability(net, hard, soft)
        if want_pe == 0.0:
            with pytest.raises(ValueError, match="impossible"):
                net.query([net.variables[0]], hard, soft)
            continue
        possible += 1
        v = net.variables[0]
        np.testing.assert_allclose(net.query([v], hard, soft), brute_posterior(net, [v], hard, soft), atol=1e-12)
    assert possible == 10


# --------------------------------------------------------------------------- bnlearn networks vs pgmpy


BIF_DIR = data_root() / "bnlearn_bif"
# (network, hard-evidence variables per draw, draws); hepar2 (70 nodes) is the largest we check.
BNLEARN_CASES = [("asia", 2, 4), ("child", 3, 3), ("insurance", 4, 3), ("alarm", 5, 3), ("hepar2", 6, 2)]


@cache
def load_bif(name: str):  # -> (pgmpy model, BayesNet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgmpy's own deprecation chatter on import
        require_module("pgmpy")
        from pgmpy.readwrite import BIFReader

        # Absent data: skipped here, a failure in CI (CI=true).
        path = require(BIF_DIR / f"{name}.bif.gz", f"the bnlearn network {name} ({BIF_DIR})")
        text = gzip.open(path, "rt", encoding="utf-8").read()
        model = BIFReader(string=text).get_model()
    return model, from_pgmpy(model)


def pgmpy_marginal(model, variable: str, hard: dict[str, str], soft: list[SoftEvidence]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgmpy's own deprecation chatter on import
        from pgmpy.factors.discrete import TabularCPD
        from pgmpy.inference import VariableElimination

    virtual = [
        TabularCPD(s.variable, len(s.likelihood), np.asarray(s.likelihood).reshape(-1, 1),
                   state_names={s.variable: model.get_cpds(s.variable).state_names[s.variable]})
        for s in soft
    ]
    # A fresh engine per query: pgmpy's virtual evidence rewrites the engine's model in place.
    engine = VariableElimination(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factor = engine.query([variable], evidence=hard or None, virtual_evidence=virtual or None,
                              show_progress=False)
    return np.asarray(factor.values, dtype=float)


@pytest.mark.parametrize(("name", "n_hard", "draws"), BNLEARN_CASES)
def test_bnlearn_marginals_match_pgmpy(name: str, n_hard: int, draws: int) -> None:
    model, net = load_bif(name)
    assert set(net.variables) == {str(v) for v in model.nodes()}
    rng = np.random.default_rng([ord(c) for c in name])  # fixed per network, independent of hash seeds
    for draw in range(draws):
        # Hard evidence taken from one forward sample, so it is always possible.
        world = sample(net, rng, 1)[0]
        picked = [str(v) for v in rng.choice(net.variables, size=n_hard + 2, replace=False)]
        hard = {v: world[v] for v in picked[:n_hard]}
        # pgmpy takes at most one virtual item per variable, with likelihoods in [0, 1].
        soft = [
            SoftEvidence(v, rng.uniform(0.05, 1.0, size=len(net.states[v])), label=f"virtual {v}")
            for v in picked[n_hard:]
        ]
        ours = net.marginals([v for v in net.variables if v not in hard], hard, soft)
        for v, dist in ours.items():
            theirs = pgmpy_marginal(model, v, hard, soft)
            np.testing.assert_allclose(dist, theirs, rtol=0, atol=1e-9, err_msg=f"{name} draw {draw}: {v}")


def test_asia_evidence_probability_and_conversion() -> None:
    model, net = load_bif("asia")
    # Conversion: the CPT of `either` (parents lung, tub) read back through pgmpy's own accessor.
    cpd = model.get_cpds("either")
    assert net.parents["either"] == list(cpd.variables[1:])
    for idx in np.ndindex(*net.cpts["either"].shape[:-1]):
        parent_states = {p: net.states[p][i] for p, i in zip(net.parents["either"], idx, strict=True)}
        for k, s in enumerate(net.states["either"]):
            assert net.cpts["either"][idx + (k,)] == cpd.get_value(either=s, **parent_states)
    # P(evidence) on 8 binary nodes by enumeration.
    hard = {"xray": "yes", "smoke": "no"}
    soft = [SoftEvidence("dysp", np.array([0.9, 0.2]))]
    assert net.evidence_probability(hard, soft) == pytest.approx(brute_evidence_probability(net, hard, soft), rel=1e-12)


def test_many_factors_in_one_product() -> None:
    # A root with 40 observed children leaves 41 factors over the root alone: more than one einsum call
    # accepts, so the engine must chunk. Naive Bayes gives the answer in closed form.
    rng = np.random.default_rng(3)
    children = [f"C{i}" for i in range(40)]
    cpts = {"R": np.array([0.2, 0.5, 0.3])} | {c: rng.dirichlet(np.ones(2), size=3) for c in children}
    net = BayesNet(
        states={"R": ["r0", "r1", "r2"]} | {c: ["n", "y"] for c in children},
        parents={c: ["R"] for c in children},
        cpts=cpts,
    )
    hard = {c: str(rng.choice(["n", "y"])) for c in children}
    want = cpts["R"].copy()
    for c, s in hard.items():
        want = want * cpts[c][:, ["n", "y"].index(s)]
    np.testing.assert_allclose(net.query(["R"], hard), want / want.sum(), rtol=1e-12, atol=0)
    assert net.evidence_probability(hard) == pytest.approx(want.sum(), rel=1e-12)
