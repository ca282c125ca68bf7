"""Decision-theoretic policy on a BayesNet: expected utility, value of information, and why.

Every option is scored in utility units:
- an action `a` scores EU(a) = Σ_u P(u | e) U_a(u) over the hidden variables u it depends on;
- asking question q scores max_a EU(a) + VOI(q) - cost, where VOI is the myopic expected value
  of sample information: how much better the best action becomes, on average, once q is answered.
The chosen option is the argmax. The explanation replays the decision once per piece of evidence
with that piece left out, which says how far each piece moved the margin of the winning option.
All functions are pure; one joint posterior per evaluation, utilities applied with einsum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coact.graphs.policy.bayesnet import BayesNet, SoftEvidence

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VOI_RTOL = 1e-12  # VOI below this (relative to the utility scale) is floating-point noise, not information


@dataclass(frozen=True)
class ActionSpec:
    name: str  # e.g. "answer:card_arrival", "freeze_card", "escalate", "decline"
    kind: str  # "answer" | "action" | "escalate" | "decline"
    on: tuple[str, ...]  # hidden variables the utility depends on
    utility: np.ndarray  # shape (len(states[v]) for v in on)
    target: str | None = None  # the intent, for answer actions


@dataclass(frozen=True)
class QuestionSpec:
    variable: str  # an observable variable of the network the user can answer
    text: str


@dataclass(frozen=True)
class VirtualQuestion:
    """A question whose answer is not a network node: P(answer | variable) as an (answers, states) matrix.

    A disambiguation question ("do you mean A, B, or something else?") is one: its answer is a noisy
    reading of the goal. Its VOI is exact over the matrix, so it competes with the network's own questions.
    """

    name: str  # the option is scored as "ask:<name>"
    variable: str
    answers: tuple[str, ...]
    likelihood: np.ndarray  # shape (len(answers), len(states[variable])); every column sums to 1
    # Per answer, the actions that answer takes off the table (a declined confirmation: that action may not
    # follow); the VOI is then exact for the restricted choice.
    excludes: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Influence:
    """One piece of evidence and how much it moved the decision."""

    label: str  # the SoftEvidence label, or "answer: <variable>=<state>" for hard evidence
    variable: str
    margin_with: float  # EU(chosen) - EU(best other option), all evidence
    margin_without: float  # the same margin with this piece removed
    choice_without: str  # what would have been chosen without it

    @property
    def shift(self) -> float:
        return self.margin_with - self.margin_without


@dataclass
class PolicyResult:
    chosen: str  # an action name, or "ask:<variable>"
    kind: str  # action kind, or "ask"
    target: str | None  # intent for answer actions, variable for asks
    expected_utility: dict[str, float]  # every action, plus "ask:<variable>" per askable question
    value_of_information: dict[str, float]  # per askable question variable (myopic EVSI, >= 0)
    posterior: dict[str, dict[str, float]]  # marginals of the requested variables
    explanation: list[Influence] = field(default_factory=list)  # by |shift|, largest first


# --------------------------------------------------------------------------- utilities
@dataclass(frozen=True)
class _UtilityTables:
    """The actions' utilities stacked once per call: one (k, *shape) table per distinct `on`."""

    variables: list[str]  # union of the actions' `on`, first-seen order
    names: list[str]
    groups: list[tuple[tuple[str, ...], list[int], np.ndarray]]
    n_actions: int


def _tables(net: BayesNet, actions: Sequence[ActionSpec]) -> _UtilityTables:
    names = [a.name for a in actions]
    if len(set(names)) != len(names):
        raise ValueError("actions: duplicate action names")
    by_on: dict[tuple[str, ...], list[int]] = {}
    for i, a in enumerate(actions):
        for v in a.on:
            if v not in net.states:
                raise ValueError(f"action {a.name!r}: unknown variable {v!r}")
        if len(set(a.on)) != len(a.on):
            raise ValueError(f"action {a.name!r}: duplicate variables in on={a.on}")
        shape = tuple(len(net.states[v]) for v in a.on)
        if np.shape(a.utility) != shape:
            raise ValueError(f"action {a.name!r}: utility has shape {np.shape(a.utility)}, expected {shape}")
        by_on.setdefault(tuple(a.on), []).append(i)
    groups = [
        (on, idx, np.stack([np.asarray(actions[i].utility, dtype=float) for i in idx]))
        for on, idx in by_on.items()
    ]
    variables = list(dict.fromkeys(v for a in actions for v in a.on))
    return _UtilityTables(variables=variables, names=names, groups=groups, n_actions=len(actions))


def _action_values(
    joint: np.ndarray, joint_vars: Sequence[str], tables: _UtilityTables, keep: str | None = None
) -> np.ndarray:
    """Σ joint · U_a for every action: per group of actions sharing `on`, one matrix product.

    With `keep`, that variable's axis is not summed: the result has shape (len(states[keep]), n_actions).
    """
    letters = {v: _LETTERS[i] for i, v in enumerate(joint_vars)}
    joint_sub = "".join(letters[v] for v in joint_vars)
    kept = letters[keep] if keep else ""
    n_keep = joint.shape[list(joint_vars).index(keep)] if keep else 1
    values = np.zeros((n_keep, tables.n_actions))
    for on, idx, table in tables.groups:
        on_sub = "".join(letters[v] for v in on)
        if keep in on:
            # The kept variable is also a utility argument: contract directly (rare; einsum handles the diagonal).
            act = _LETTERS[len(joint_vars)]
            values[:, idx] = np.einsum(f"{joint_sub},{act}{on_sub}->{kept}{act}", joint, table)
            continue
        # Marginalise to (keep, *on) first, then a BLAS matmul against the (k, prod(on)) utility matrix.
        marginal = np.einsum(f"{joint_sub}->{kept}{on_sub}", joint).reshape(n_keep, -1)
        values[:, idx] = marginal @ table.reshape(len(idx), -1).T
    return values if keep else values[0]


def _expected_utilities(
    net: BayesNet, tables: _UtilityTables, hard: Mapping[str, str] | None, soft: Sequence[SoftEvidence] | None
) -> np.ndarray:
    return _action_values(net.query(tables.variables, hard, soft), tables.variables, tables)


def _per_state_values(
    net: BayesNet,
    tables: _UtilityTables,
    variable: str,
    hard: Mapping[str, str] | None,
    soft: Sequence[SoftEvidence] | None,
) -> np.ndarray:
    """W[s, a] = Σ_u P(variable=s, u | e) U_a(u): one joint posterior, the variable's axis kept."""
    variables = list(dict.fromkeys([variable, *tables.variables]))
    return _action_values(net.query(variables, hard, soft), variables, tables, keep=variable)


def _vois(
    net: BayesNet,
    tables: _UtilityTables,
    asks: Sequence[str],
    virtual: Sequence[VirtualQuestion],
    hard: Mapping[str, str] | None,
    soft: Sequence[SoftEvidence] | None,
) -> dict[str, float]:
    """The myopic EVSI of every question: a network question's answer is its variable (worth 0 once
    answered); a virtual question's answer depends on u only through its variable, so its values are
    V = L @ W for its likelihood matrix L: one contraction and a matrix product, however many answers."""
    out: dict[str, float] = {}
    for name, variable, likelihood, excludes in [*((q, q, None, ()) for q in asks),
                                                 *((v.name, v.variable, v.likelihood, v.excludes) for v in virtual)]:
        if likelihood is None and hard and name in hard:
            out[name] = 0.0
            continue
        per_state = _per_state_values(net, tables, variable, hard, soft)
        values = per_state if likelihood is None else np.asarray(likelihood, dtype=float) @ per_state
        allowed = np.ones_like(values, dtype=bool)
        for row, names in enumerate(excludes):
            allowed[row, [tables.names.index(n) for n in names if n in tables.names]] = False
        out[name] = _evsi(values, allowed)
    return out


def _evsi(per_answer: np.ndarray, allowed: np.ndarray | None = None) -> float:
    """Σ_s max_a V[s, a] - max_a Σ_s V[s, a] for V[s, a] = Σ_u P(answer s, u | e) U_a(u); after answer s only
    the actions `allowed[s]` may be chosen (a declined confirmation), so the informed choice is restricted."""
    informed_values = per_answer if allowed is None else np.where(allowed, per_answer, -np.inf)
    informed = float(informed_values.max(axis=1).sum())
    uninformed = float(per_answer.sum(axis=0).max())
    voi = informed - uninformed
    scale = float(np.abs(per_answer).sum()) + 1.0
    # max of sums <= sum of maxes (unrestricted), so a negative is rounding; so is a positive at the rounding
    # level. A restricted answer can make asking worth less than acting now: still no information, so 0.
    return voi if voi > _VOI_RTOL * scale else 0.0


def expected_utilities(
    net: BayesNet,
    actions: Sequence[ActionSpec],
    hard: Mapping[str, str] | None = None,
    soft: Sequence[SoftEvidence] | None = None,
) -> dict[str, float]:
    """EU of every action from ONE joint posterior over the union of the actions' utility variables."""
    values = _expected_utilities(net, _tables(net, actions), hard, soft)
    return {a.name: float(v) for a, v in zip(actions, values, strict=True)}


def value_of_information(
    net: BayesNet,
    actions: Sequence[ActionSpec],
    question_variable: str,
    hard: Mapping[str, str] | None = None,
    soft: Sequence[SoftEvidence] | None = None,
) -> float:
    """Myopic EVSI: Σ_s P(q=s | e) max_a EU(a | e, q=s) - max_a EU(a | e)  (>= 0; 0 if q is observed).

    From one joint P(q, u | e): Σ_s max_a Σ_u P(q=s, u | e) U_a(u) - max_a Σ_s Σ_u P(q=s, u | e) U_a(u);
    the P(q=s | e) weights cancel against the conditioning, so no division is needed.
    """
    if question_variable not in net.states:
        raise ValueError(f"value_of_information: unknown variable {question_variable!r}")
    return _vois(net, _tables(net, actions), [question_variable], (), hard, soft)[question_variable]


# --------------------------------------------------------------------------- deciding
def _option_values(
    net: BayesNet,
    tables: _UtilityTables,
    asks: Sequence[str],
    hard: Mapping[str, str],
    soft: Sequence[SoftEvidence],
    question_cost: float | Mapping[str, float],
    virtual: Sequence[VirtualQuestion] = (),
) -> tuple[np.ndarray, dict[str, float]]:
    """EU of every action followed by every ask (in order, virtual questions last), and the VOI per ask."""
    eu = _expected_utilities(net, tables, hard, soft)
    best = float(eu.max())
    voi = _vois(net, tables, asks, virtual, hard, soft)
    ask_values = np.array([best + voi[q] - _cost(question_cost, q) for q in [*asks, *(v.name for v in virtual)]],
                          dtype=float)
    return np.concatenate([eu, ask_values]), voi


def _cost(question_cost: float | Mapping[str, float], question: str) -> float:
    return float(question_cost) if isinstance(question_cost, (int, float)) else float(question_cost[question])


def _margin(values: np.ndarray, chosen: int) -> float:
    others = np.delete(values, chosen)
    # A lone option wins by nothing: no alternative to compare against.
    return float(values[chosen] - others.max()) if len(others) else 0.0


def _evidence_items(
    hard: Mapping[str, str], soft: Sequence[SoftEvidence]
) -> list[tuple[str, str, dict[str, str], list[SoftEvidence]]]:
    """(label, variable, hard without it, soft without it) for every single piece of evidence."""
    items = []
    for v, s in hard.items():
        items.append((f"answer: {v}={s}", v, {k: x for k, x in hard.items() if k != v}, list(soft)))
    for i, item in enumerate(soft):
        label = item.label or f"soft: {item.variable}"
        items.append((label, item.variable, dict(hard), [x for j, x in enumerate(soft) if j != i]))
    return items


def decide(
    net: BayesNet,
    actions: Sequence[ActionSpec],
    questions: Sequence[QuestionSpec],
    hard: Mapping[str, str] | None = None,
    soft: Sequence[SoftEvidence] | None = None,
    question_cost: float | Mapping[str, float] = 1.0,
    askable: Sequence[str] = (),
    posterior_vars: Sequence[str] = (),
    explain: bool = True,
    virtual: Sequence[VirtualQuestion] = (),
) -> PolicyResult:
    """Pick the option with the highest expected utility among the actions and the askable questions.

    Ties go to the earliest option: actions before asks, each in the order given, virtual questions last.
    `question_cost` is one cost for every question, or a cost per question name.
    A question is askable only if it is in `askable`, among `questions` and not already answered (in `hard`).
    """
    if not actions:
        raise ValueError("decide: no actions")
    tables = _tables(net, actions)
    hard = dict(hard or {})
    soft = list(soft or [])
    known_questions = {q.variable for q in questions}
    for q in askable:
        if q not in known_questions:
            raise ValueError(f"decide: askable {q!r} is not one of the questions {sorted(known_questions)}")
    asks = [q for q in dict.fromkeys(askable) if q not in hard]

    for v in virtual:
        if v.likelihood.shape != (len(v.answers), len(net.states[v.variable])):
            raise ValueError(f"decide: virtual question {v.name!r} has likelihood shape {v.likelihood.shape}")
        if v.name in asks:
            raise ValueError(f"decide: virtual question {v.name!r} shadows a network question")
        if v.excludes and len(v.excludes) != len(v.answers):
            raise ValueError(f"decide: virtual question {v.name!r} has {len(v.excludes)} excludes for "
                             f"{len(v.answers)} answers")
    values, voi = _option_values(net, tables, asks, hard, soft, question_cost, virtual)
    ask_names = [*asks, *(v.name for v in virtual)]
    names = [a.name for a in actions] + [f"ask:{q}" for q in ask_names]
    chosen = int(np.argmax(values))  # first maximum: the documented tie-break

    explanation: list[Influence] = []
    if explain:
        margin_with = _margin(values, chosen)
        for label, variable, hard_wo, soft_wo in _evidence_items(hard, soft):
            without, _ = _option_values(net, tables, asks, hard_wo, soft_wo, question_cost, virtual)
            explanation.append(
                Influence(
                    label=label,
                    variable=variable,
                    margin_with=margin_with,
                    margin_without=_margin(without, chosen),
                    choice_without=names[int(np.argmax(without))],
                )
            )
        explanation.sort(key=lambda inf: -abs(inf.shift))  # stable: equal shifts keep evidence order

    if chosen < len(actions):
        action = actions[chosen]
        kind, target = action.kind, action.target
    else:
        kind, target = "ask", ask_names[chosen - len(actions)]

    marginals = net.marginals(list(posterior_vars), hard, soft) if posterior_vars else {}
    posterior = {
        v: {s: float(p) for s, p in zip(net.states[v], dist, strict=True)} for v, dist in marginals.items()
    }
    return PolicyResult(
        chosen=names[chosen],
        kind=kind,
        target=target,
        expected_utility={n: float(x) for n, x in zip(names, values, strict=True)},
        value_of_information=voi,
        posterior=posterior,
        explanation=explanation,
    )
