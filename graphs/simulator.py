"""Dialogue simulator: simulated users drawn from a domain pack's Bayesian network talk to a policy.

Plain numpy logic, no Ray (``cluster/jobs/tune_policy.py`` runs it inside Ray Tune trials).

A **simulated user** is one forward sample of the pack's network (``graphs.bayesnet.sample``): the
hidden ``goal``, ``card_at_risk`` and ``upset``, the findings, and the question-answer variables ``q_*``.
The user then types a *held-out* utterance of their goal, drawn from the :class:`UtteranceBank` (the
BANKING77 **test** split for intents, CLINC150 ``oos_test`` for out of scope; the classifiers never saw
these texts), and answers every question the policy asks with their sampled value of that variable,
i.e. through the network's CPTs. The sampled findings ``f_*`` are not used: what the policy observes
about them is what the finding heads read from the utterance, exactly as in the live graph.

A **conversation** replays the live turn logic (``graphs.dialogue.plan_turn`` / ``Policy.decide`` /
``close_or_continue``): the first message gives soft evidence on the goal (intent classifier) and on the
findings (finding heads); a message the live graph would take for a control intent ("yes", "hello", ...)
is a chitchat turn without a decision, after which the user rephrases (another utterance of the same
goal); a question is answered "yes"/"no" and becomes hard evidence; the conversation ends at the first
terminal action (answer / action / escalate / decline) or after ``max_turns`` user messages.
Every classifier output is precomputed in the bank, so a conversation costs one to three exact
decisions (about a millisecond each) and no model call.

**Outcome measures** (all under the *evaluation* utilities, the pack's default weights, whatever weights
the policy under test decides with):

- ``U(a | h)``: the utility of terminal action ``a`` given the user's true hidden state ``h``.
- The **oracle** knows ``h``, never asks and takes ``argmax_a U(a | h)``; it scores ``U* = max_a U(a | h)``.
- **Task success**: the terminal action is optimal for the true state, ``U(a | h) >= U* - 1e-9``. With the
  banking pack the optimum is unique, so this is "the terminal action equals the oracle's action":
  freeze the card when it is at risk, decline when out of scope, otherwise answer the user's intent.
- **Achieved utility**: ``U(a | h) - question_cost_eval * questions_asked``.
- **Regret**: ``U* - achieved utility`` (>= 0; 0 exactly for the oracle). It counts both a wrong action
  and the questions it took to get there.
- **Turns**: user messages until the terminal action (first message, rephrases after chitchat, answers).
- **Escalation rate**: the fraction of conversations that end in the escalate action. A conversation that
  reaches ``max_turns`` without a terminal action ends with a hand-over: it is scored as escalate and also
  counted in ``timeout_rate``.
- **Goal kinds** for the breakdown: ``at_risk`` (``card_at_risk = yes``), ``out_of_scope`` (goal is the
  out-of-scope label and the card is not at risk), ``faq`` (everything else).

Everything random takes a seed (a ``numpy.random.Generator`` built from it), and the users are drawn
before any policy acts, so two policies run on the same seed meet exactly the same users (common random
numbers: differences between policies are paired, not sampling noise).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.schemas import IntentResult, ReasonerResult, ScoredLabel, SessionState
from graphs.bayesnet import SoftEvidence, sample
from graphs.dialogue import TERMINAL_KINDS, Policy, close_or_continue, plan_turn
from graphs.domain import DomainPack, build_actions, build_network
from graphs.policy import decide

BANK_FORMAT = "1"  # bump when the bank's content or layout changes
SUCCESS_ATOL = 1e-9
GOAL_KINDS = ("at_risk", "out_of_scope", "faq")
DEFAULT_MAX_TURNS = 6
TIMEOUT_ACTION = "escalate"  # a conversation that hits the turn cap is handed over to a human
_INTENT_TOP_K = 5  # as actors.nlu.intent_results


def seeded_rng(seed: int, *salt: int | str) -> np.random.Generator:
    """A Generator for ``seed`` and a stream name: independent streams for users, tuning chunks, folds."""
    words = [int(seed)] + [int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:4], "little") for s in salt]
    return np.random.default_rng(np.random.SeedSequence(words))


def likelihood_ratio(p: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Row-wise ``graphs.dialogue._likelihood_ratio``: (p / prior) / max, same float64 arithmetic."""
    lam = np.clip(p, 1e-9, None) / np.clip(prior, 1e-9, None)
    return lam / lam.max(axis=-1, keepdims=True)


# ============================================================================ utterance bank
@dataclass
class UtteranceBank:
    """Held-out texts per goal state with their precomputed classifier outputs.

    Row ``i`` is one text: ``goal[i]`` indexes ``goal_states`` (the pack's goal states in network order),
    ``intent_probs[i]`` is the calibrated intent distribution over ``intent_labels``, ``finding_probs[i]``
    the finding heads' probabilities over ``finding_names``, ``control[i]`` the control intent the live
    IntentActor would detect ("" for none). Priors are those the live actors put on the wire.
    """

    goal_states: list[str]
    texts: np.ndarray  # (n,) str
    goal: np.ndarray  # (n,) int
    source: np.ndarray  # (n,) str: "banking77/test" | "clinc150/oos_test"
    intent_labels: list[str]
    intent_probs: np.ndarray  # (n, C) float32
    class_prior: np.ndarray  # (C,)
    finding_names: list[str]
    finding_probs: np.ndarray  # (n, F) float32
    finding_prior: np.ndarray  # (F,)
    control: np.ndarray  # (n,) str, "" when no control intent
    meta: dict[str, Any] = field(default_factory=dict)
    _by_goal: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.texts = np.asarray(self.texts, dtype=str)
        self.goal = np.asarray(self.goal, dtype=np.int64)
        self.source = np.asarray(self.source, dtype=str)
        self.control = np.asarray(self.control, dtype=str)
        self.intent_probs = np.asarray(self.intent_probs, dtype=np.float32)
        self.finding_probs = np.asarray(self.finding_probs, dtype=np.float32)
        n = len(self.texts)
        for name, arr in (("goal", self.goal), ("source", self.source), ("control", self.control),
                          ("intent_probs", self.intent_probs), ("finding_probs", self.finding_probs)):
            if len(arr) != n:
                raise ValueError(f"UtteranceBank.{name}: {len(arr)} rows for {n} texts")
        self._by_goal = [np.flatnonzero(self.goal == g) for g in range(len(self.goal_states))]

    def __len__(self) -> int:
        return len(self.texts)

    def indices_of(self, goal_index: int) -> np.ndarray:
        return self._by_goal[goal_index]

    def counts(self) -> dict[str, int]:
        return {s: int(len(ix)) for s, ix in zip(self.goal_states, self._by_goal, strict=True)}

    def subset(self, rows: np.ndarray) -> UtteranceBank:
        rows = np.asarray(rows, dtype=np.int64)
        return UtteranceBank(
            goal_states=list(self.goal_states), texts=self.texts[rows], goal=self.goal[rows], source=self.source[rows],
            intent_labels=list(self.intent_labels), intent_probs=self.intent_probs[rows],
            class_prior=self.class_prior, finding_names=list(self.finding_names),
            finding_probs=self.finding_probs[rows], finding_prior=self.finding_prior, control=self.control[rows],
            meta={**self.meta, "subset_of": self.meta.get("key"), "rows": int(len(rows))},
        )

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple[UtteranceBank, UtteranceBank]:
        """Two disjoint banks, stratified by goal: (``fraction`` of each goal's texts, the rest).

        Used to tune on one half of the held-out texts and evaluate on texts no trial ever saw.
        Every goal keeps at least one text on each side when it has two or more.
        """
        rng = seeded_rng(seed, "bank-split")
        first, second = [], []
        for ix in self._by_goal:
            ix = rng.permutation(ix)
            k = int(round(fraction * len(ix)))
            if len(ix) >= 2:
                k = min(max(k, 1), len(ix) - 1)
            first.append(ix[:k])
            second.append(ix[k:])
        return self.subset(np.sort(np.concatenate(first))), self.subset(np.sort(np.concatenate(second)))

    # ------------------------------------------------------------------ wire objects (exact path)
    def intent_result(self, i: int, version: str = "bank") -> IntentResult:
        """The IntentResult the live IntentActor would send for text ``i`` (as ``actors.nlu.intent_results``)."""
        p = self.intent_probs[i]
        order = np.argsort(-p)[:_INTENT_TOP_K]
        control = str(self.control[i]) or None
        oos = self.meta.get("out_of_scope_label")
        return IntentResult(
            top=[ScoredLabel(label=self.intent_labels[j], p=round(float(p[j]), 6)) for j in order],
            probs=[float(x) for x in p], labels=list(self.intent_labels),
            class_prior=[float(x) for x in self.class_prior], control=control,  # type: ignore[arg-type]
            out_of_scope=oos is not None and self.intent_labels[int(order[0])] == oos, model_version=version,
        )

    def reasoner_result(self, i: int, version: str = "bank") -> ReasonerResult:
        """The ReasonerResult the live ReasonerActor would send (as ``actors.nlu.reasoner_results``)."""
        return ReasonerResult(
            findings={n: round(float(x), 6) for n, x in zip(self.finding_names, self.finding_probs[i], strict=True)},
            finding_prior={n: float(p) for n, p in zip(self.finding_names, self.finding_prior, strict=True)},
            passages=[], model_version=version,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp, texts=self.texts, goal=self.goal, source=self.source, control=self.control,
            intent_probs=self.intent_probs, class_prior=np.asarray(self.class_prior),
            finding_probs=self.finding_probs, finding_prior=np.asarray(self.finding_prior),
            goal_states=np.asarray(self.goal_states, dtype=str), intent_labels=np.asarray(self.intent_labels, dtype=str),
            finding_names=np.asarray(self.finding_names, dtype=str), meta=np.asarray(json.dumps(self.meta)),
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> UtteranceBank:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(
                goal_states=[str(s) for s in z["goal_states"]], texts=z["texts"], goal=z["goal"], source=z["source"],
                intent_labels=[str(s) for s in z["intent_labels"]], intent_probs=z["intent_probs"],
                class_prior=z["class_prior"], finding_names=[str(s) for s in z["finding_names"]],
                finding_probs=z["finding_probs"], finding_prior=z["finding_prior"], control=z["control"],
                meta=json.loads(str(z["meta"])),
            )

    @staticmethod
    def cache_key(models_dir: str | Path, pack: DomainPack) -> str:
        """Content key: bank format, the intent and finding model versions, the pack's goal states and control
        intents. Reading it needs only the two meta.json files and the pack (no data, no model)."""
        from actors.models import read_meta

        root = Path(models_dir)
        intent_meta, findings_meta = read_meta(root / "intent"), read_meta(root / "findings")
        goal = next(v for v in pack.variables if v.name == pack.intent_variable)
        blob = json.dumps({
            "format": BANK_FORMAT,
            "intent": intent_meta.get("version"),
            "findings": findings_meta.get("version"),
            "goal_states": pack.states_of(goal),
            "out_of_scope": pack.out_of_scope_label,
            "control": {k: [c.lexicon, c.examples] for k, c in sorted(pack.control_intents.items())},
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def cache_path(cls, models_dir: str | Path, pack: DomainPack) -> Path:
        return Path(models_dir) / "cache" / f"utterance-bank-{pack.name}-{cls.cache_key(models_dir, pack)}.npz"

    @classmethod
    def build(cls, models_dir: str | Path, pack: DomainPack, refresh: bool = False, log: Any = None) -> UtteranceBank:
        """Load the cached bank for this models folder and pack, or embed and classify the held-out texts once
        (about half a minute on two cores) and cache them under ``<models_dir>/cache/``."""
        path = cls.cache_path(models_dir, pack)
        if path.is_file() and not refresh:
            try:
                return cls.load(path)
            except (OSError, ValueError, KeyError):
                pass  # a torn or stale file: rebuild it
        bank = cls._compute(Path(models_dir), pack, log=log)
        bank.meta["key"] = path.stem.rsplit("-", 1)[-1]
        bank.save(path)
        for stale in path.parent.glob(f"utterance-bank-{pack.name}-*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
        return bank

    @classmethod
    def _compute(cls, root: Path, pack: DomainPack, log: Any = None) -> UtteranceBank:
        from actors import models as M
        from actors.nlu import ControlDetector
        from cluster import datasets as D

        say = log or (lambda _m: None)
        goal_var = next(v for v in pack.variables if v.name == pack.intent_variable)
        goal_states = pack.states_of(goal_var)
        index = {s: i for i, s in enumerate(goal_states)}
        oos = pack.out_of_scope_label

        pairs = [(t, y, "banking77/test") for t, y in D.load_banking77("test") if y in index]
        pairs += [(t, oos, "clinc150/oos_test") for t, _ in D.load_clinc150("oos_test")]
        missing = [s for s in goal_states if not any(y == s for _, y, _ in pairs)]
        if missing:
            raise ValueError(f"no held-out texts for goal states {missing[:5]} (pack {pack.name})")
        texts = [t for t, _, _ in pairs]

        clf = M.IntentClassifier(root / "intent")
        heads = M.FindingHeads(root / "findings")
        enc_meta = clf.meta.get("encoder", {})
        enc_path = enc_meta.get("path") or str(M.minilm_path())
        max_length = int(clf.meta.get("max_length", 64))
        import torch

        torch.set_num_threads(int(os.environ.get("COACT_TORCH_THREADS", "2")))
        say(f"utterance bank: {len(texts)} held-out texts, encoder {enc_path}")
        encoder = M.TextEncoder(enc_path, max_length=max_length)
        emb = np.concatenate([
            _embed_reusing_cache(encoder, root / "cache", "banking77-test", [t for t, _, s in pairs if s == "banking77/test"], say),
            _embed_reusing_cache(encoder, root / "cache", "clinc-oos-test", [t for t, _, s in pairs if s != "banking77/test"], say),
        ])
        f_meta = heads.meta.get("encoder", {})
        if (f_meta.get("path") or enc_path) != enc_path or int(heads.meta.get("max_length", max_length)) != max_length:
            f_encoder = M.TextEncoder(f_meta.get("path") or enc_path, max_length=int(heads.meta.get("max_length", 64)))
            f_emb = f_encoder.embed(texts, batch_size=32)
        else:
            f_emb = emb
        ctexts, clabels = ControlDetector.examples(pack)
        detector = ControlDetector(pack, encoder.embed(ctexts), clabels)
        control = [detector.detect(t, e)[0] or "" for t, e in zip(texts, emb, strict=True)]

        # The priors the live actors put on the wire (names differ between versions of actors.models).
        class_prior = getattr(clf, "class_prior", None)
        if class_prior is None:
            class_prior = clf.priors
        finding_prior = getattr(heads, "prior", None)
        if finding_prior is None:
            finding_prior = heads.positive_rates
        return cls(
            goal_states=goal_states, texts=np.asarray(texts, dtype=str),
            goal=np.array([index[y] for _, y, _ in pairs]), source=np.array([s for _, _, s in pairs], dtype=str),
            intent_labels=list(clf.labels), intent_probs=clf.predict_proba(emb).astype(np.float32),
            class_prior=np.asarray(class_prior), finding_names=list(heads.names),
            finding_probs=heads.predict(f_emb).astype(np.float32), finding_prior=np.asarray(finding_prior),
            control=np.asarray(control, dtype=str),
            meta={"format": BANK_FORMAT, "pack": pack.name, "out_of_scope_label": oos,
                  "intent_version": clf.version, "findings_version": heads.version, "encoder": enc_path,
                  "models_dir": str(root), "n": len(texts)},
        )


def _embed_reusing_cache(encoder: Any, cache: Path, name: str, texts: list[str], say: Any,
                         spot_checks: int = 12, atol: float = 1e-3) -> np.ndarray:
    """Embeddings of ``texts``; reuses ``cluster.prepare``'s cached ``emb-<name>-*.npy`` when one has the right
    shape and a seeded spot check of a few rows re-embedded here agrees (so its cache key need not be known)."""
    dim = int(getattr(encoder, "dim", 384))
    rng = np.random.default_rng(0)
    for path in sorted(cache.glob(f"emb-{name}-*.npy")):
        try:
            cached = np.load(path)
        except (OSError, ValueError):
            continue
        if cached.shape != (len(texts), dim):
            continue
        rows = np.sort(rng.choice(len(texts), size=min(spot_checks, len(texts)), replace=False))
        fresh = encoder.embed([texts[i] for i in rows], batch_size=len(rows))
        if np.abs(fresh - cached[rows]).max() <= atol:
            say(f"utterance bank: reusing {path.name} ({len(texts)} embeddings, spot-checked {len(rows)} rows)")
            return cached.astype(np.float32)
    say(f"utterance bank: embedding {len(texts)} texts ({name})")
    return encoder.embed(texts, batch_size=32)


# ============================================================================ users
@dataclass
class Users:
    """``n`` simulated users as arrays: the network state codes and the utterances they will type."""

    codes: dict[str, np.ndarray]  # variable -> (n,) state index
    utterances: np.ndarray  # (n, max_turns) bank rows: first message, then rephrases
    kind: np.ndarray  # (n,) str, one of GOAL_KINDS

    def __len__(self) -> int:
        return len(self.kind)


# ============================================================================ agents
@dataclass(frozen=True)
class Decision:
    action: str
    kind: str
    target: str | None


class PolicyAgent:
    """The decision policy (``graphs.dialogue.Policy``) with arrays in, same choices out.

    ``exact=False`` (default) builds the SoftEvidence vectors straight from the bank's arrays with the same
    float64 arithmetic as ``intent_evidence``/``finding_evidence`` and calls ``graphs.policy.decide`` without
    the explanation replay; ``exact=True`` goes through pydantic ``IntentResult``/``ReasonerResult``,
    ``plan_turn``, ``Policy.decide`` and ``close_or_continue`` like the live graph (about 5x slower). The tests
    check that both give the same conversations.
    """

    def __init__(self, pack: DomainPack, weights: Mapping[str, float] | None = None, exact: bool = False) -> None:
        self.pack = pack
        self.policy = Policy(pack, dict(weights or {}))
        self.weights = self.policy.weights
        self.exact = exact
        self._cache: dict[tuple, Decision] = {}
        self._evidence: dict[int, list[SoftEvidence]] = {}
        self._bank: UtteranceBank | None = None  # the caches below hold this bank's rows

    @property
    def name(self) -> str:
        return "policy"

    def _soft(self, bank: UtteranceBank, row: int) -> list[SoftEvidence]:
        items = self._evidence.get(row)
        if items is not None:
            return items
        net = self.policy.net
        pack = self.pack
        goal_states = net.states[pack.intent_variable]
        pos = {label: j for j, label in enumerate(bank.intent_labels)}
        missing = [s for s in goal_states if s not in pos]
        if missing:
            raise ValueError(f"intent model does not cover goal states {missing[:5]}")
        cols = [pos[s] for s in goal_states]
        p = np.array([float(x) for x in bank.intent_probs[row, cols]])
        prior = np.array([float(x) for x in np.asarray(bank.class_prior)[cols]])
        items = [SoftEvidence(pack.intent_variable, likelihood_ratio(p, prior), "intent")]
        known = {f.name for f in pack.findings}
        for j, name in enumerate(bank.finding_names):
            if name not in known:
                continue
            pf = round(float(bank.finding_probs[row, j]), 6)
            pr = float(bank.finding_prior[j])
            lam = likelihood_ratio(np.array([pf, 1 - pf]), np.array([pr, 1 - pr]))
            by_state = {"yes": float(lam[0]), "no": float(lam[1])}
            items.append(SoftEvidence(name, np.array([by_state[s] for s in net.states[name]]), name))
        self._evidence[row] = items
        return items

    def decide(self, bank: UtteranceBank, rows: Sequence[int], hard: Mapping[str, str],
               asked: Sequence[str]) -> Decision:
        """The policy's choice after content messages ``rows`` (bank rows), answers ``hard`` and questions ``asked``."""
        if self._bank is not bank:
            self._evidence, self._cache, self._bank = {}, {}, bank
        key = (tuple(rows), tuple(sorted(hard.items())), tuple(asked))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pol = self.policy
        askable: list[str] = []
        if len(asked) < self.pack.utilities.max_questions:
            askable = [q.variable for q in pol.questions if q.variable not in hard and q.variable not in asked]
        soft = [item for r in rows for item in self._soft(bank, r)]
        r = decide(pol.net, pol.actions, pol.questions, hard, soft, question_cost=pol.weights["question_cost"],
                   askable=askable, posterior_vars=(), explain=False)
        out = Decision(r.chosen, r.kind, r.target)
        self._cache[key] = out
        return out


class OracleAgent:
    """Knows the hidden state; takes the action with the highest *evaluation* utility; never asks."""

    name = "oracle"


# ============================================================================ results
@dataclass
class SimulationResult:
    """Per-conversation outcomes of one agent on one set of users, and their summaries."""

    kind: np.ndarray  # (n,) goal kind
    goal: np.ndarray  # (n,) goal state name
    action: np.ndarray  # (n,) terminal action name
    action_kind: np.ndarray  # (n,) terminal action kind
    oracle_action: np.ndarray  # (n,)
    turns: np.ndarray  # (n,) int
    questions: np.ndarray  # (n,) int
    success: np.ndarray  # (n,) bool
    escalated: np.ndarray  # (n,) bool
    timed_out: np.ndarray  # (n,) bool
    utility: np.ndarray  # (n,) achieved utility (evaluation weights, minus question costs)
    oracle_utility: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def regret(self) -> np.ndarray:
        return self.oracle_utility - self.utility

    @staticmethod
    def _stats(mask: np.ndarray, r: SimulationResult) -> dict[str, float]:
        n = int(mask.sum())
        if n == 0:
            return {"n": 0}
        return {
            "n": n,
            "success": float(r.success[mask].mean()),
            "mean_turns": float(r.turns[mask].mean()),
            "escalation_rate": float(r.escalated[mask].mean()),
            "question_rate": float((r.questions[mask] > 0).mean()),
            "mean_questions": float(r.questions[mask].mean()),
            "timeout_rate": float(r.timed_out[mask].mean()),
            "regret": float(r.regret[mask].mean()),
            "utility": float(r.utility[mask].mean()),
            "oracle_utility": float(r.oracle_utility[mask].mean()),
        }

    def summary(self) -> dict[str, float]:
        return self._stats(np.ones(len(self), dtype=bool), self)

    def by_kind(self) -> dict[str, dict[str, float]]:
        return {k: self._stats(self.kind == k, self) for k in GOAL_KINDS}

    def report(self) -> dict[str, Any]:
        return {**self.summary(), "by_kind": self.by_kind()}

    def take(self, rows: np.ndarray | slice) -> SimulationResult:
        """The conversations ``rows`` (an index array, a boolean mask or a slice), e.g. a prefix of chunks."""
        return SimulationResult(**{f: getattr(self, f)[rows] for f in SimulationResult.__dataclass_fields__})

    @staticmethod
    def concat(parts: Iterable[SimulationResult]) -> SimulationResult:
        parts = list(parts)
        return SimulationResult(**{f: np.concatenate([getattr(p, f) for p in parts])
                                   for f in SimulationResult.__dataclass_fields__})


def paired_difference(a: SimulationResult, b: SimulationResult, measure: str = "success",
                      kind: str | None = None) -> dict[str, float]:
    """Mean of ``b - a`` per conversation (same users) and its standard error; ``kind`` restricts it to the
    users of one goal kind (``n``: how many). With no such user, mean and se are nan."""
    if len(a) != len(b):
        raise ValueError("paired_difference: results over different user sets")
    get = {"success": lambda r: r.success.astype(float), "turns": lambda r: r.turns.astype(float),
           "escalated": lambda r: r.escalated.astype(float), "regret": lambda r: r.regret}[measure]
    d = get(b) - get(a)
    if kind is not None:
        if not np.array_equal(a.kind, b.kind):
            raise ValueError("paired_difference: results over different user sets")
        d = d[a.kind == kind]
    if len(d) == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": int(len(d))}


# ============================================================================ simulator
class Simulator:
    """Simulated users for one pack and utterance bank; runs agents through whole conversations."""

    def __init__(self, pack: DomainPack, bank: UtteranceBank, max_turns: int = DEFAULT_MAX_TURNS) -> None:
        self.pack = pack
        self.bank = bank
        self.max_turns = int(max_turns)
        self.net = build_network(pack)
        self.eval_weights = dict(pack.utilities.weights)
        self.eval_actions = build_actions(pack, self.eval_weights)
        self.eval_question_cost = float(self.eval_weights.get("question_cost", 0.0))
        self.action_index = {a.name: i for i, a in enumerate(self.eval_actions)}
        self.action_kind = {a.name: a.kind for a in self.eval_actions}
        if TIMEOUT_ACTION not in self.action_index:
            raise ValueError(f"pack {pack.name} has no {TIMEOUT_ACTION!r} action for conversations that time out")
        goal_states = self.net.states[pack.intent_variable]
        if list(goal_states) != list(bank.goal_states):
            raise ValueError("the utterance bank was built for other goal states than this pack's")
        empty = [s for g, s in enumerate(goal_states) if len(bank.indices_of(g)) == 0]
        if empty:
            raise ValueError(f"the utterance bank has no texts for goal states {empty[:5]}")
        self.answer_control: dict[str, dict[str, str]] = {}
        for q in pack.questions:
            inverse = {state: control for control, state in q.answers.items()}
            unanswerable = [s for s in self.net.states[q.variable] if s not in inverse]
            if unanswerable:
                raise ValueError(f"question {q.variable}: no yes/no answer maps to states {unanswerable}")
            self.answer_control[q.variable] = inverse
        self.oos_index = goal_states.index(pack.out_of_scope_label)
        self.risk_var = "card_at_risk" if "card_at_risk" in self.net.states else None

    # ------------------------------------------------------------------ users
    def users(self, n: int, seed: int, stream: str = "", kind: str | None = None) -> Users:
        """``n`` users for ``seed`` (and a named ``stream``, e.g. one per tuning chunk): forward samples of the
        network, then utterances of their goals. Deterministic in (seed, stream, n, kind, pack, bank).

        ``kind`` (one of GOAL_KINDS) draws a stratum: users of that goal kind only, by rejection sampling, so
        exactly the network's conditional distribution given the kind (at-risk users are ~5% of the natural
        mix: a stratum of them certifies a policy change on that kind with far fewer conversations)."""
        if kind is not None and kind not in GOAL_KINDS:
            raise ValueError(f"unknown goal kind {kind!r}; expected one of {GOAL_KINDS}")
        rng = seeded_rng(seed, "users", stream, *(() if kind is None else ("kind", kind)))
        codes = self._draw(rng, n)
        if kind is not None:
            parts, have = [], 0
            for _ in range(10_000):
                keep = self._kinds(codes) == kind
                parts.append({v: c[keep] for v, c in codes.items()})
                have += int(keep.sum())
                if have >= n:
                    break
                codes = self._draw(rng, max(n, 1024))
            else:
                raise ValueError(f"goal kind {kind!r} is (almost) impossible under the network")
            codes = {v: np.concatenate([p[v] for p in parts])[:n] for v in self.net.variables}
        goal = codes[self.pack.intent_variable]
        utter = np.empty((n, self.max_turns), dtype=np.int64)
        for g in np.unique(goal):
            rows = np.flatnonzero(goal == g)
            pool = self.bank.indices_of(int(g))
            utter[rows] = pool[rng.integers(0, len(pool), size=(len(rows), self.max_turns))]
        return Users(codes=codes, utterances=utter, kind=self._kinds(codes))

    def _draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        joint = sample(self.net, rng, n)
        return {v: np.array([self.net.state_index(v, row[v]) for row in joint], dtype=np.int64)
                for v in self.net.variables}

    def _kinds(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        goal = codes[self.pack.intent_variable]
        kind = np.full(len(goal), "faq", dtype=object)
        kind[goal == self.oos_index] = "out_of_scope"
        if self.risk_var is not None:
            kind[codes[self.risk_var] == self.net.state_index(self.risk_var, "yes")] = "at_risk"
        return kind.astype(str)

    def utility_matrix(self, users: Users) -> np.ndarray:
        """(n, n_actions) utility of every terminal action under each user's true state (evaluation weights)."""
        cols = [np.asarray(a.utility)[tuple(users.codes[v] for v in a.on)] for a in self.eval_actions]
        return np.stack(cols, axis=1)

    # ------------------------------------------------------------------ conversations
    def _state(self, users: Users, u: int, variable: str) -> str:
        return self.net.states[variable][int(users.codes[variable][u])]

    def converse(self, agent: PolicyAgent, users: Users, u: int) -> tuple[str, int, int, bool]:
        """One conversation: (terminal action, user turns, questions asked, timed out)."""
        if agent.exact:
            return self._converse_exact(agent, users, u)
        rows: list[int] = []
        hard: dict[str, str] = {}
        asked: list[str] = []
        pending: str | None = None
        next_utterance = 0
        for turn in range(1, self.max_turns + 1):
            if pending is not None:
                # The user answers from their own sampled value of the question's variable.
                hard[pending] = self._state(users, u, pending)
                pending = None
            else:
                row = int(users.utterances[u, next_utterance])
                next_utterance += 1
                if self.bank.control[row]:
                    continue  # taken for greeting/thanks/...: a chitchat turn, the user rephrases
                rows.append(row)
            d = agent.decide(self.bank, rows, hard, asked)
            if d.kind == "ask":
                asked.append(d.target or "")
                pending = d.target
                continue
            return d.action, turn, len(asked), False
        return TIMEOUT_ACTION, self.max_turns, len(asked), True

    def _converse_exact(self, agent: PolicyAgent, users: Users, u: int) -> tuple[str, int, int, bool]:
        """The same conversation through the live turn functions and pydantic wire objects."""
        pack, bank = self.pack, self.bank
        session = SessionState(session_id="sim")
        answer_reasoner = ReasonerResult(findings={}, finding_prior={}, passages=[], model_version="sim")
        next_utterance = 0
        asked = 0
        for turn in range(1, self.max_turns + 1):
            if session.pending_question is not None:
                state = self._state(users, u, session.pending_question)
                control = self.answer_control[session.pending_question][state]
                intent = IntentResult(top=[ScoredLabel(label=control, p=1.0)], probs=[1.0], labels=[control],
                                      class_prior=[1.0], control=control, control_score=1.0,  # type: ignore[arg-type]
                                      model_version="sim")
                reasoner = answer_reasoner
            else:
                row = int(users.utterances[u, next_utterance])
                next_utterance += 1
                intent, reasoner = bank.intent_result(row), bank.reasoner_result(row)
            plan = plan_turn(session, intent, reasoner, pack)
            decision = None if plan.chitchat is not None else agent.policy.decide(plan.evidence)
            close_or_continue(session, plan.evidence, decision)
            session.turns += 1
            if decision is None:
                continue
            if decision.kind == "ask":
                asked += 1
                continue
            if decision.kind in TERMINAL_KINDS:
                return decision.action, turn, asked, False
        return TIMEOUT_ACTION, self.max_turns, asked, True

    def run(self, agent: PolicyAgent | OracleAgent, n: int | None = None, seed: int = 0,
            users: Users | None = None, stream: str = "", kind: str | None = None) -> SimulationResult:
        """Run ``agent`` on ``users`` (or on ``n`` fresh users drawn with ``seed``, of goal ``kind`` only when
        given) and score every conversation."""
        if users is None:
            if n is None:
                raise ValueError("run: give n (and seed) or users")
            users = self.users(n, seed, stream, kind=kind)
        n = len(users)
        U = self.utility_matrix(users)
        best = U.max(axis=1)
        oracle_idx = U.argmax(axis=1)  # first maximum, in action order
        names = np.array([a.name for a in self.eval_actions], dtype=object)
        if isinstance(agent, OracleAgent):
            act_idx = oracle_idx
            turns = np.ones(n, dtype=np.int64)
            questions = np.zeros(n, dtype=np.int64)
            timed_out = np.zeros(n, dtype=bool)
        else:
            act_idx = np.empty(n, dtype=np.int64)
            turns = np.empty(n, dtype=np.int64)
            questions = np.empty(n, dtype=np.int64)
            timed_out = np.empty(n, dtype=bool)
            for u in range(n):
                action, t, q, to = self.converse(agent, users, u)
                act_idx[u], turns[u], questions[u], timed_out[u] = self.action_index[action], t, q, to
        achieved = U[np.arange(n), act_idx]
        kinds = np.array([self.action_kind[a] for a in names[act_idx]], dtype=str)
        goal_states = self.net.states[self.pack.intent_variable]
        return SimulationResult(
            kind=users.kind,
            goal=np.array([goal_states[g] for g in users.codes[self.pack.intent_variable]], dtype=str),
            action=names[act_idx].astype(str),
            action_kind=kinds,
            oracle_action=names[oracle_idx].astype(str),
            turns=turns,
            questions=questions,
            success=achieved >= best - SUCCESS_ATOL,
            escalated=kinds == "escalate",
            timed_out=timed_out,
            utility=achieved - self.eval_question_cost * questions,
            oracle_utility=best,
        )


def evaluate(pack: DomainPack, bank: UtteranceBank, weights: Mapping[str, float] | None, n: int, seed: int,
             stream: str = "", max_turns: int = DEFAULT_MAX_TURNS) -> SimulationResult:
    """Convenience: the policy with ``weights`` (None: the pack's defaults) on ``n`` users drawn with ``seed``."""
    sim = Simulator(pack, bank, max_turns=max_turns)
    return sim.run(PolicyAgent(pack, weights), n=n, seed=seed, stream=stream)
