"""Dialogue simulator: simulated users drawn from a domain pack's Bayesian network talk to an agent.

Plain numpy logic, no Ray (``cluster/jobs/tune_policy.py`` runs it inside Ray Tune trials).

**One implementation.** The policy under test is the served one: every message goes through
``graphs.dialogue.plan_turn`` -> ``Policy.decide`` -> ``close_or_continue`` on a real ``SessionState``, with
the ``IntentResult`` / ``ReasonerResult`` wire objects built from the classifier outputs precomputed in the
:class:`UtteranceBank` (no likelihood ratio, soft evidence or intent result is re-implemented here). The
only shortcut is a cache of decisions keyed on the evidence the plan built (same evidence, same decision).

**A simulated user** is one forward sample of the pack's network (``graphs.bayesnet.sample``): the hidden
``goal``, ``card_at_risk``, ``upset`` and ``wants_human``, the findings, ``asked_for_human`` and the
question-answer variables ``q_*``. What the user types comes from the bank: *held-out* utterances of their
goal (the BANKING77 **test** split for intents, CLINC150 ``oos_test`` for out of scope; the classifiers never
saw these texts), read by the real intent model, finding heads and act classifier (``read_bank_acts``). The
sampled findings ``f_*`` are not used: what the policy observes about them is what the finding heads read.
Answers to questions come from the user's sampled ``q_*`` values, i.e. through the network's CPTs.

**User kinds** (``USER_KINDS``; a user with ``wants_human = yes`` in the sample is a ``wants_human`` user, the
others are drawn from ``DEFAULT_MIX``):

- ``plain``: one held-out utterance of their goal; every question is answered from the sampled value, half of
  the time as a "yes"/"no" act message, half of the time in words (one of the pack's per-state
  ``answer_examples``, read as ``AnswerReading(state=...)`` for the pending question). A disambiguation
  question ("is this about A, B or something else?") is answered with the option's ordinal or its title when
  the goal is offered, else "none of those" (half of the time with a rephrase of the goal).
- ``unsure``: like plain, but the first question is answered "not sure" (acts unsure=1, content 0).
- ``follow_up``: after the first case ends, asks a second goal of the same intent group (a held-out
  utterance of it; the second case's hidden state is the network sampled given that goal, with the same mood
  and wish for a person). Success needs both cases handled right.
- ``corrector``: the first message is an utterance the intent model confuses (a held-out text of the goal
  whose top intent is wrong, of the same group when there is one); after a wrong answer (or a decline of an
  in-scope question) the user sends a correction: acts correction=1, content=1, with another utterance of the
  true goal. Corrects once.
- ``wants_human``: ``wants_human = yes``; when the sample also has ``asked_for_human = yes`` the first message
  is a request for a person (acts request_human=1; half of the time without content, half with an utterance
  of the goal), else a plain utterance. The network's 2% ``asked_for_human`` false-read rate for other users
  is not scripted: the act classifier's own false readings on the bank's texts play that part.

Social acts the act classifier reads on a goal utterance ("hi, ...") can make a turn a template reply
(``chitchat``): the user then rephrases (another utterance of the same goal).

**Outcome measures** (all under the *evaluation* utilities, the pack's default weights, whatever weights the
policy under test decides with), per case ``c`` with true hidden state ``h_c``:

- ``U(a | h)``: the utility of terminal action ``a`` given the true hidden state.
- The **oracle** knows every ``h_c``, never asks and takes ``argmax_a U(a | h_c)`` per case.
- **Task success**: every case's final terminal action is optimal for its state (``>= U* - 1e-9``).
- **Achieved utility**: ``sum_c U(a_c | h_c)`` minus what the questions and corrections cost the user:
  ``question_cost`` each, plus the pack's ``utilities.mood_cost`` extra when the user truly is in that mood
  (an upset customer's time is dearer; exempt questions excepted). A correction is an extra exchange the
  user had to make, charged like a question.
- **Regret**: ``sum_c U*_c - achieved utility`` (>= 0; 0 exactly for the oracle).
- **Turns**: user messages in the conversation (first messages, answers, rephrases, corrections).
- **Escalation rate**: conversations in which a case ends in the escalate action. A hand-over ends the
  conversation (a follow-up case not reached is scored as handed over too); so does reaching ``max_turns``
  without a terminal action (scored as escalate, and counted in ``timeout_rate``).
- **Goal kinds** (of the first case): ``at_risk`` (``card_at_risk = yes``), ``out_of_scope`` (goal is the
  out-of-scope label and the card is not at risk), ``faq`` (everything else).

Everything random takes a seed (a ``numpy.random.Generator`` built from it), and users (their states, texts
and every random choice they will make) are drawn before any agent acts, so two agents run on the same seed
meet exactly the same users (common random numbers: differences between agents are paired, not noise).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, get_args

import numpy as np

from coact.graphs.policy.dialogue import (
    CONFIRM_PREFIX,
    GOAL_QUESTION,
    TERMINAL_KINDS,
    close_or_continue,
    plan_turn,
)
from coact.graphs.policy.domain import DomainPack, build_actions, build_network
from coact.graphs.policy.messages import (
    ActName,
    AnswerReading,
    DecisionResult,
    IntentResult,
    ReasonerResult,
    ScoredLabel,
    SessionEvidence,
    SessionState,
)
from coact.graphs.policy.policy import Policy

BANK_FORMAT = "2"  # bump when the bank's content or layout changes
SUCCESS_ATOL = 1e-9
GOAL_KINDS = ("at_risk", "out_of_scope", "faq")
USER_KINDS = ("plain", "unsure", "follow_up", "corrector", "wants_human")
# Shares of the users who do not want a person (wants_human users come from the network's own sample).
DEFAULT_MIX: dict[str, float] = {"plain": 0.5, "unsure": 0.15, "follow_up": 0.2, "corrector": 0.15}
DEFAULT_MAX_TURNS = 8
TIMEOUT_ACTION = "escalate"  # a conversation that hits the turn cap is handed over to a human
ACT_NAMES: tuple[str, ...] = tuple(get_args(ActName))
INTENT_TOP_K = 5  # as actors.nlu.intent_results
WORD_ANSWER_SHARE = 0.5  # answers given in words rather than as a yes/no act
ORDINALS = ("the first one", "the second one", "the third one", "the fourth one", "the fifth one")


def seeded_rng(seed: int, *salt: int | str) -> np.random.Generator:
    """A Generator for ``seed`` and a stream name: independent streams for users, tuning chunks, folds."""
    words = [int(seed)] + [int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:4], "little") for s in salt]
    return np.random.default_rng(np.random.SeedSequence(words))


# ============================================================================ utterance bank
@dataclass
class UtteranceBank:
    """Held-out texts per goal state with their precomputed classifier outputs.

    Row ``i`` is one text: ``goal[i]`` indexes ``goal_states`` (the pack's goal states in network order),
    ``intent_probs[i]`` the calibrated intent distribution over ``intent_labels``, ``finding_probs[i]`` the
    finding heads' probabilities over ``finding_names``, ``acts[i]`` / ``content[i]`` the act classifier's
    reading (columns ``ACT_NAMES``). ``part_*``: the parts of texts that ``graphs.dialogue.split_requests``
    splits ("I lost my card. What do I do?"), classified like the live ingress classifies them;
    ``title_probs``: the intent model on every intent's title (a user answering a disambiguation question by
    name). Priors are those the live actors put on the wire.
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
    acts: np.ndarray  # (n, len(ACT_NAMES)) float32
    content: np.ndarray  # (n,) float32
    part_texts: np.ndarray  # (m,) str
    part_of: np.ndarray  # (m,) int: the row each part belongs to
    part_probs: np.ndarray  # (m, C) float32
    title_names: list[str]  # intents, in pack order
    title_probs: np.ndarray  # (len(title_names), C) float32
    meta: dict[str, Any] = field(default_factory=dict)
    _by_goal: list[np.ndarray] = field(default_factory=list, repr=False)
    _parts: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    ROW_FIELDS = ("texts", "goal", "source", "intent_probs", "finding_probs", "acts", "content")

    def __post_init__(self) -> None:
        self.texts = np.asarray(self.texts, dtype=str)
        self.goal = np.asarray(self.goal, dtype=np.int64)
        self.source = np.asarray(self.source, dtype=str)
        self.intent_probs = np.asarray(self.intent_probs, dtype=np.float32)
        self.finding_probs = np.asarray(self.finding_probs, dtype=np.float32)
        self.class_prior = np.asarray(self.class_prior, dtype=np.float64)
        self.finding_prior = np.asarray(self.finding_prior, dtype=np.float64)
        self.acts = np.asarray(self.acts, dtype=np.float32).reshape(len(self.texts), len(ACT_NAMES))
        self.content = np.asarray(self.content, dtype=np.float32)
        self.part_texts = np.asarray(self.part_texts, dtype=str)
        self.part_of = np.asarray(self.part_of, dtype=np.int64)
        self.part_probs = np.asarray(self.part_probs, dtype=np.float32).reshape(len(self.part_texts), len(self.intent_labels))
        self.title_probs = np.asarray(self.title_probs, dtype=np.float32).reshape(len(self.title_names), len(self.intent_labels))
        n = len(self.texts)
        for name in self.ROW_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"UtteranceBank.{name}: {len(getattr(self, name))} rows for {n} texts")
        if len(self.part_of) != len(self.part_texts) or len(self.part_probs) != len(self.part_texts):
            raise ValueError("UtteranceBank: part_texts, part_of and part_probs differ in length")
        self._by_goal = [np.flatnonzero(self.goal == g) for g in range(len(self.goal_states))]
        self._parts = {}
        for j, i in enumerate(self.part_of):
            self._parts.setdefault(int(i), []).append(j)
        self._cache = {}

    def __len__(self) -> int:
        return len(self.texts)

    def indices_of(self, goal_index: int) -> np.ndarray:
        return self._by_goal[goal_index]

    def counts(self) -> dict[str, int]:
        return {s: int(len(ix)) for s, ix in zip(self.goal_states, self._by_goal, strict=True)}

    def top_intent(self) -> np.ndarray:
        """(n,) the intent model's top label per row."""
        return np.asarray(self.intent_labels, dtype=object)[self.intent_probs.argmax(axis=1)].astype(str)

    def subset(self, rows: np.ndarray) -> UtteranceBank:
        rows = np.asarray(rows, dtype=np.int64)
        new_index = {int(r): k for k, r in enumerate(rows)}
        keep = np.array([int(i) in new_index for i in self.part_of], dtype=bool)
        return UtteranceBank(
            goal_states=list(self.goal_states), texts=self.texts[rows], goal=self.goal[rows], source=self.source[rows],
            intent_labels=list(self.intent_labels), intent_probs=self.intent_probs[rows],
            class_prior=self.class_prior, finding_names=list(self.finding_names),
            finding_probs=self.finding_probs[rows], finding_prior=self.finding_prior, acts=self.acts[rows],
            content=self.content[rows], part_texts=self.part_texts[keep],
            part_of=np.array([new_index[int(i)] for i in self.part_of[keep]], dtype=np.int64),
            part_probs=self.part_probs[keep], title_names=list(self.title_names), title_probs=self.title_probs,
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

    def with_finding_prior(self, prior: Mapping[str, float] | np.ndarray) -> UtteranceBank:
        """The same bank with another finding prior on the wire (e.g. a baseline's raw positive rates)."""
        arr = np.asarray([prior[n] for n in self.finding_names] if isinstance(prior, Mapping) else prior)
        out = self.subset(np.arange(len(self)))
        out.finding_prior = np.asarray(arr, dtype=np.float64)
        out.meta = {**self.meta, "finding_prior": {n: float(p) for n, p in zip(self.finding_names, arr, strict=True)}}
        return out

    # ------------------------------------------------------------------ wire objects
    def _intent(self, probs: np.ndarray, acts: Mapping[str, float], content: float,
                answer: AnswerReading | None = None, version: str = "bank") -> IntentResult:
        p = np.asarray(probs, dtype=np.float64)
        order = np.argsort(-p, kind="stable")[:INTENT_TOP_K]
        oos = self.meta.get("out_of_scope_label")
        return IntentResult(
            top=[ScoredLabel(label=self.intent_labels[j], p=round(float(p[j]), 6)) for j in order],
            probs=[float(x) for x in p], labels=list(self.intent_labels),
            class_prior=[float(x) for x in self.class_prior],
            out_of_scope=oos is not None and self.intent_labels[int(order[0])] == oos, model_version=version,
            acts={a: round(float(acts.get(a, 0.0)), 6) for a in ACT_NAMES}, content=round(float(content), 6),
            answer=answer,
        )

    def intent_result(self, i: int, acts: Mapping[str, float] | None = None, content: float | None = None,
                      answer: AnswerReading | None = None) -> IntentResult:
        """The IntentResult the live IntentActor would send for text ``i``; ``acts``/``content`` override the act
        reading for scripted messages built on a text (a correction, a request for a person with a goal)."""
        key = ("intent", int(i), None if acts is None else tuple(sorted(acts.items())), content,
               None if answer is None else answer.model_dump_json())
        hit = self._cache.get(key)
        if hit is None:
            own = {a: float(x) for a, x in zip(ACT_NAMES, self.acts[i], strict=True)}
            hit = self._intent(self.intent_probs[i], own if acts is None else acts,
                               float(self.content[i]) if content is None else content, answer)
            self._cache[key] = hit
        return hit

    def part_results(self, i: int) -> list[IntentResult]:
        """The live ingress's parts of text ``i`` (``split_requests``), classified; [] when it is not split."""
        key = ("parts", int(i))
        hit = self._cache.get(key)
        if hit is None:
            hit = [self._intent(self.part_probs[j], {}, 1.0) for j in self._parts.get(int(i), [])]
            self._cache[key] = hit
        return hit

    def title_result(self, intent: str) -> IntentResult:
        """The intent model on an intent's title (a disambiguation answer given by name)."""
        key = ("title", intent)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._intent(self.title_probs[self.title_names.index(intent)], {}, 1.0)
            self._cache[key] = hit
        return hit

    def act_result(self, acts: Mapping[str, float], content: float = 0.0,
                   answer: AnswerReading | None = None) -> IntentResult:
        """A scripted act message ("yes", "not sure", "I want a person"): the given acts, and an intent
        distribution equal to the class prior (a likelihood ratio of 1: no evidence about the goal)."""
        key = ("act", tuple(sorted(acts.items())), content, None if answer is None else answer.model_dump_json())
        hit = self._cache.get(key)
        if hit is None:
            hit = self._intent(self.class_prior / self.class_prior.sum(), acts, content, answer)
            self._cache[key] = hit
        return hit

    def reasoner_result(self, i: int | None) -> ReasonerResult:
        """The ReasonerResult the live ReasonerActor would send for text ``i``; ``None``: a scripted act message,
        whose findings sit at the prior (a likelihood ratio of 1)."""
        key = ("reasoner", i)
        hit = self._cache.get(key)
        if hit is None:
            values = self.finding_prior if i is None else self.finding_probs[i]
            hit = ReasonerResult(
                findings={n: round(float(x), 6) for n, x in zip(self.finding_names, values, strict=True)},
                finding_prior={n: float(p) for n, p in zip(self.finding_names, self.finding_prior, strict=True)},
                passages=[], model_version="bank")
            self._cache[key] = hit
        return hit

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp, texts=self.texts, goal=self.goal, source=self.source, acts=self.acts, content=self.content,
            intent_probs=self.intent_probs, class_prior=self.class_prior,
            finding_probs=self.finding_probs, finding_prior=self.finding_prior,
            part_texts=self.part_texts, part_of=self.part_of, part_probs=self.part_probs,
            title_names=np.asarray(self.title_names, dtype=str), title_probs=self.title_probs,
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
                finding_probs=z["finding_probs"], finding_prior=z["finding_prior"], acts=z["acts"],
                content=z["content"], part_texts=z["part_texts"], part_of=z["part_of"], part_probs=z["part_probs"],
                title_names=[str(s) for s in z["title_names"]], title_probs=z["title_probs"],
                meta=json.loads(str(z["meta"])),
            )

# ============================================================================ messages and agents
@dataclass(frozen=True)
class Message:
    """One user message as the live graph sees it: the text and the stage outputs for it."""

    text: str
    intent: IntentResult
    reasoner: ReasonerResult
    parts: tuple[IntentResult, ...] = ()


@dataclass(frozen=True)
class Reply:
    """What an agent did with a message: an ask, a terminal action, or a template reply (``chitchat``)."""

    kind: str  # answer | ask | action | escalate | decline | chitchat
    action: str  # the action name ("ask:<target>" for asks, the template's name for chitchat)
    target: str | None = None  # the answered intent, or the asked question ("goal": disambiguation)
    options: tuple[str, ...] = ()  # goal states offered by a disambiguation / confirmation question


class Agent(Protocol):
    name: str

    def start(self) -> Any:
        """A fresh conversation state."""

    def turn(self, state: Any, message: Message) -> Reply:
        """Handle one message, updating ``state``."""


class PolicyAgent:
    """The served decision policy: ``plan_turn`` -> ``Policy.decide`` -> ``close_or_continue`` on a
    ``SessionState``, exactly like ``graphs.pipeline.prepare_turn`` / ``finish_turn``.

    Decisions are cached on the evidence they are made from (the soft items' likelihoods, the hard answers and
    the questions asked: all ``Policy.decide`` reads), so the same evidence is decided once per agent."""

    name = "policy"

    def __init__(self, pack: DomainPack, weights: Mapping[str, float] | None = None, cache: bool = True) -> None:
        self.pack = pack
        self.policy = Policy(pack, dict(weights or {}))
        self.weights = self.policy.weights
        self.cache = cache
        self._decisions: dict[tuple, DecisionResult] = {}
        self.decisions = 0  # Policy.decide calls made (cache misses)

    @staticmethod
    def evidence_key(evidence: SessionEvidence) -> tuple:
        return (tuple((s.variable, tuple(s.likelihood.items())) for s in evidence.soft),
                tuple(sorted(evidence.hard.items())), tuple(evidence.asked))

    def decide(self, evidence: SessionEvidence) -> DecisionResult:
        key = self.evidence_key(evidence) if self.cache else None
        hit = self._decisions.get(key) if key is not None else None
        if hit is None:
            hit = self.policy.decide(evidence, explain=False)
            self.decisions += 1
            if key is not None:
                self._decisions[key] = hit
        return hit

    def start(self) -> SessionState:
        return SessionState(session_id="sim")

    def plan(self, session: SessionState, message: Message):  # -> TurnPlan
        return plan_turn(session, message.text, message.intent, message.reasoner, self.pack, list(message.parts))

    def turn(self, session: SessionState, message: Message) -> Reply:
        plan = self.plan(session, message)
        decision = None if plan.reply is not None else self.decide(plan.evidence)
        close_or_continue(session, plan, decision, self.pack)
        session.turns += 1
        if decision is None:
            return Reply("chitchat", plan.reply_name or "chitchat")
        return Reply(decision.kind, decision.action, decision.target, tuple(decision.options))


class OracleAgent:
    """Knows the hidden state; takes the action with the highest *evaluation* utility per case; never asks."""

    name = "oracle"


# ============================================================================ users
@dataclass
class Users:
    """``n`` simulated users as arrays: their states, their texts and every random choice they will make."""

    codes: dict[str, np.ndarray]  # variable -> (n,) state index: the first case's hidden state
    codes2: dict[str, np.ndarray]  # the second case's (follow_up users; the network given the second goal)
    kind: np.ndarray  # (n,) str, one of GOAL_KINDS (of the first case)
    user_kind: np.ndarray  # (n,) str, one of USER_KINDS
    first: np.ndarray  # (n,) bank row of the first message (a confusable text for correctors)
    utterances: np.ndarray  # (n, R) bank rows of the first goal: rephrases, corrections
    utterances2: np.ndarray  # (n, R) bank rows of the second goal: its first message, then rephrases
    request: np.ndarray  # (n,) 0: no request for a person, 1: one without content, 2: with a goal utterance
    draws: np.ndarray  # (n, R, 3) uniforms for the answers: style, which example, rephrase or not

    def __len__(self) -> int:
        return len(self.kind)

    FIELDS = ("kind", "user_kind", "first", "utterances", "utterances2", "request", "draws")

    def take(self, rows: np.ndarray | slice) -> Users:
        return Users(codes={v: c[rows] for v, c in self.codes.items()},
                     codes2={v: c[rows] for v, c in self.codes2.items()},
                     **{f: getattr(self, f)[rows] for f in self.FIELDS})

    @staticmethod
    def concat(parts: list[Users]) -> Users:
        return Users(codes={v: np.concatenate([p.codes[v] for p in parts]) for v in parts[0].codes},
                     codes2={v: np.concatenate([p.codes2[v] for p in parts]) for v in parts[0].codes2},
                     **{f: np.concatenate([getattr(p, f) for p in parts]) for f in Users.FIELDS})


# ============================================================================ results
@dataclass
class SimulationResult:
    """Per-conversation outcomes of one agent on one set of users, and their summaries."""

    kind: np.ndarray  # (n,) goal kind
    user_kind: np.ndarray  # (n,) user kind
    goal: np.ndarray  # (n,) goal state name (first case)
    action: np.ndarray  # (n,) final terminal action of the first case
    action_kind: np.ndarray  # (n,) its kind
    oracle_action: np.ndarray  # (n,)
    action2: np.ndarray  # (n,) final action of the second case ("" for one-case users)
    oracle_action2: np.ndarray  # (n,)
    turns: np.ndarray  # (n,) int
    questions: np.ndarray  # (n,) int
    corrections: np.ndarray  # (n,) int
    success: np.ndarray  # (n,) bool
    escalated: np.ndarray  # (n,) bool
    timed_out: np.ndarray  # (n,) bool
    utility: np.ndarray  # (n,) achieved utility (evaluation weights, minus question and correction costs)
    oracle_utility: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def regret(self) -> np.ndarray:
        return self.oracle_utility - self.utility

    @property
    def oracle_escalates(self) -> np.ndarray:
        """(n,) the oracle hands a case of this conversation over (a user who wants a person)."""
        return (self.oracle_action == TIMEOUT_ACTION) | (self.oracle_action2 == TIMEOUT_ACTION)

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
            "needless_escalation_rate": float((r.escalated & ~r.oracle_escalates)[mask].mean()),
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

    def by_user_kind(self) -> dict[str, dict[str, float]]:
        return {k: self._stats(self.user_kind == k, self) for k in USER_KINDS}

    def report(self) -> dict[str, Any]:
        return {**self.summary(), "by_kind": self.by_kind(), "by_user_kind": self.by_user_kind()}

    def take(self, rows: np.ndarray | slice) -> SimulationResult:
        """The conversations ``rows`` (an index array, a boolean mask or a slice), e.g. a prefix of chunks."""
        return SimulationResult(**{f: getattr(self, f)[rows] for f in SimulationResult.__dataclass_fields__})

    @staticmethod
    def concat(parts: Iterable[SimulationResult]) -> SimulationResult:
        parts = list(parts)
        return SimulationResult(**{f: np.concatenate([getattr(p, f) for p in parts])
                                   for f in SimulationResult.__dataclass_fields__})


def paired_difference(a: SimulationResult, b: SimulationResult, measure: str = "success",
                      kind: str | None = None, user_kind: str | None = None) -> dict[str, float]:
    """Mean of ``b - a`` per conversation (same users) and its standard error; ``kind`` / ``user_kind`` restrict
    it to the users of one goal kind / user kind (``n``: how many). With no such user, mean and se are nan."""
    if len(a) != len(b):
        raise ValueError("paired_difference: results over different user sets")
    get = {"success": lambda r: r.success.astype(float), "turns": lambda r: r.turns.astype(float),
           "escalated": lambda r: r.escalated.astype(float), "regret": lambda r: r.regret}[measure]
    d = get(b) - get(a)
    for field_name, value in (("kind", kind), ("user_kind", user_kind)):
        if value is not None:
            if not np.array_equal(getattr(a, field_name), getattr(b, field_name)):
                raise ValueError("paired_difference: results over different user sets")
            d = d[getattr(a, field_name) == value]
    if len(d) == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": int(len(d))}


# ============================================================================ simulator
@dataclass
class _Outcome:
    actions: list[str]  # final terminal action per case
    turns: int
    questions: int
    corrections: int
    timed_out: bool
    cost: float = 0.0  # what the questions and corrections cost this user (evaluation weights, true mood)


class Simulator:
    """Simulated users for one pack and utterance bank; runs agents through whole conversations."""

    def __init__(self, pack: DomainPack, bank: UtteranceBank, max_turns: int = DEFAULT_MAX_TURNS,
                 mix: Mapping[str, float] | None = None) -> None:
        self.pack = pack
        self.bank = bank
        self.max_turns = int(max_turns)
        self.mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(self.mix) - set(USER_KINDS) | ({"wants_human"} & set(self.mix))
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix: shares of {sorted(set(USER_KINDS) - {'wants_human'})} (wants_human users "
                             f"come from the network), got {self.mix}")
        self.net = build_network(pack)
        self.eval_weights = dict(pack.utilities.weights)
        self.eval_actions = build_actions(pack, self.eval_weights)
        self.eval_question_cost = float(self.eval_weights.get("question_cost", 0.0))
        mood = pack.utilities.mood_cost
        self.mood_cost = None if mood is None else (
            mood.variable, self.net.state_index(mood.variable, mood.state),
            float(self.eval_weights[mood.weight] if isinstance(mood.weight, str) else mood.weight), set(mood.exempt))
        self.action_index = {a.name: i for i, a in enumerate(self.eval_actions)}
        self.action_kind = {a.name: a.kind for a in self.eval_actions}
        if TIMEOUT_ACTION not in self.action_index:
            raise ValueError(f"pack {pack.name} has no {TIMEOUT_ACTION!r} action for conversations that time out")
        goal_states = self.net.states[pack.intent_variable]
        self.goal_states = list(goal_states)
        if self.goal_states != list(bank.goal_states):
            raise ValueError("the utterance bank was built for other goal states than this pack's")
        empty = [s for g, s in enumerate(goal_states) if len(bank.indices_of(g)) == 0]
        if empty:
            raise ValueError(f"the utterance bank has no texts for goal states {empty[:5]}")
        self.answer_act: dict[str, dict[str, str]] = {}
        for q in pack.questions:
            inverse = {state: act for act, state in q.answers.items()}
            unanswerable = [s for s in self.net.states[q.variable] if s not in inverse]
            if unanswerable:
                raise ValueError(f"question {q.variable}: no yes/no answer maps to states {unanswerable}")
            self.answer_act[q.variable] = inverse
        self.oos_index = goal_states.index(pack.out_of_scope_label)
        self.risk_var = "card_at_risk" if "card_at_risk" in self.net.states else None
        self.person_vars = [v for v in ("upset", "wants_human", "asked_for_human") if v in self.net.states]
        group = {i.name: i.group for i in pack.intents}
        self.group_members = [
            np.array([j for j, t in enumerate(goal_states) if t != s and t in group and group[t] == group.get(s)],
                     dtype=np.int64) if s in group else np.zeros(0, np.int64)
            for s in goal_states]
        self.confusable = self._confusable_rows()

    def _confusable_rows(self) -> list[np.ndarray]:
        """Per goal: its bank texts the intent model gets wrong, within the goal's group when it can (else any
        wrong top intent, else the text with the least probability on the goal)."""
        bank = self.bank
        group = {i.name: i.group for i in self.pack.intents}
        top = bank.top_intent()
        label_index = {s: j for j, s in enumerate(bank.intent_labels)}
        out = []
        for g, s in enumerate(self.goal_states):
            rows = bank.indices_of(g)
            wrong = rows[top[rows] != s]
            same = wrong[[group.get(t, "?") == group.get(s, "!") for t in top[wrong]]] if len(wrong) else wrong
            if len(same):
                out.append(same)
            elif len(wrong):
                out.append(wrong)
            else:
                out.append(rows[[int(np.argmin(bank.intent_probs[rows, label_index[s]]))]])
        return out

    # ------------------------------------------------------------------ users
    def users(self, n: int, seed: int, stream: str = "", kind: str | None = None) -> Users:
        """``n`` users for ``seed`` (and a named ``stream``, e.g. one per tuning chunk): forward samples of the
        network, their user kinds, texts and choices. Deterministic in (seed, stream, n, kind, pack, bank).

        ``kind`` (one of GOAL_KINDS) draws a stratum: users of that goal kind only, by rejection sampling, so
        exactly the network's conditional distribution given the kind (at-risk users are ~5% of the natural
        mix: a stratum of them certifies a policy change on that kind with far fewer conversations)."""
        if kind is not None and kind not in GOAL_KINDS:
            raise ValueError(f"unknown goal kind {kind!r}; expected one of {GOAL_KINDS}")
        rng = seeded_rng(seed, "users", stream, *(() if kind is None else ("kind", kind)))
        codes = self.sample_codes(rng, n)
        if kind is not None:
            parts, have = [], 0
            for _ in range(10_000):
                keep = self._kinds(codes) == kind
                parts.append({v: c[keep] for v, c in codes.items()})
                have += int(keep.sum())
                if have >= n:
                    break
                codes = self.sample_codes(rng, max(n, 1024))
            else:
                raise ValueError(f"goal kind {kind!r} is (almost) impossible under the network")
            codes = {v: np.concatenate([p[v] for p in parts])[:n] for v in self.net.variables}
        g_var, R = self.pack.intent_variable, self.max_turns
        goal = codes[g_var]
        # The second case: another goal of the same group, then the network given it (same person).
        goal2 = goal.copy()
        for g in np.unique(goal):
            rows = np.flatnonzero(goal == g)
            members = self.group_members[int(g)]
            if len(members):
                goal2[rows] = members[rng.integers(0, len(members), size=len(rows))]
        clamp = {g_var: goal2, **{v: codes[v] for v in self.person_vars}}
        codes2 = self.sample_codes(rng, n, clamp=clamp)
        utter, utter2 = self._texts(rng, goal, R), self._texts(rng, goal2, R)
        # User kinds: wants_human from the sample, the others from the mix.
        names = list(self.mix)
        shares = np.array([self.mix[k] for k in names], dtype=float)
        drawn = np.array(names, dtype=object)[rng.choice(len(names), size=n, p=shares / shares.sum())]
        no_group = np.array([len(self.group_members[int(g)]) == 0 for g in goal], dtype=bool)
        drawn[(drawn == "follow_up") & no_group] = "plain"
        if "wants_human" in codes:
            drawn[codes["wants_human"] == self.net.state_index("wants_human", "yes")] = "wants_human"
        user_kind = drawn.astype(str)
        first = utter[:, 0].copy()
        for g in np.unique(goal):
            rows = np.flatnonzero((goal == g) & (user_kind == "corrector"))
            pool = self.confusable[int(g)]
            first[rows] = pool[rng.integers(0, len(pool), size=len(rows))]
        request = np.zeros(n, dtype=np.int64)
        if "asked_for_human" in codes:
            asks = (user_kind == "wants_human") & (codes["asked_for_human"] == self.net.state_index("asked_for_human", "yes"))
            request[asks] = 1 + (rng.random(int(asks.sum())) < 0.5)
        draws = rng.random((n, R, 3))
        return Users(codes=codes, codes2=codes2, kind=self._kinds(codes), user_kind=user_kind, first=first,
                     utterances=utter, utterances2=utter2, request=request, draws=draws)

    def _texts(self, rng: np.random.Generator, goal: np.ndarray, R: int) -> np.ndarray:
        out = np.empty((len(goal), R), dtype=np.int64)
        for g in np.unique(goal):
            rows = np.flatnonzero(goal == g)
            pool = self.bank.indices_of(int(g))
            out[rows] = pool[rng.integers(0, len(pool), size=(len(rows), R))]
        return out

    def sample_codes(self, rng: np.random.Generator, n: int,
                     clamp: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Forward (ancestral) samples as state codes, as ``graphs.bayesnet.sample`` draws them (same uniforms,
        same codes); ``clamp`` fixes some variables per row and samples the rest given them."""
        net, clamp = self.net, dict(clamp or {})
        codes: dict[str, np.ndarray] = {}
        for v in net.variables:
            k = len(net.states[v])
            rows = net.cpts[v][tuple(codes[p] for p in net.parents[v])] if net.parents[v] else np.broadcast_to(
                net.cpts[v], (n, k))
            cum = np.cumsum(rows, axis=-1)
            u = rng.random(n) * cum[:, -1]
            drawn = np.minimum((cum <= u[:, None]).sum(axis=-1), k - 1).astype(np.int64)
            codes[v] = np.asarray(clamp[v], dtype=np.int64) if v in clamp else drawn
        return codes

    def _kinds(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        goal = codes[self.pack.intent_variable]
        kind = np.full(len(goal), "faq", dtype=object)
        kind[goal == self.oos_index] = "out_of_scope"
        if self.risk_var is not None:
            kind[codes[self.risk_var] == self.net.state_index(self.risk_var, "yes")] = "at_risk"
        return kind.astype(str)

    def utility_matrix(self, users: Users | dict[str, np.ndarray]) -> np.ndarray:
        """(n, n_actions) utility of every terminal action under each user's true state (evaluation weights)."""
        codes = users.codes if isinstance(users, Users) else users
        cols = [np.asarray(a.utility)[tuple(codes[v] for v in a.on)] for a in self.eval_actions]
        return np.stack(cols, axis=1)

    # ------------------------------------------------------------------ messages
    def goal_message(self, row: int, acts: Mapping[str, float] | None = None, content: float | None = None,
                     prefix: str = "") -> Message:
        bank = self.bank
        text = str(bank.texts[row])
        return Message(f"{prefix}{text}", bank.intent_result(row, acts, content), bank.reasoner_result(row),
                       tuple(bank.part_results(row)))

    def act_message(self, text: str, acts: Mapping[str, float], content: float = 0.0,
                    answer: AnswerReading | None = None) -> Message:
        return Message(text, self.bank.act_result(acts, content, answer), self.bank.reasoner_result(None))

    def answer_message(self, users: Users, u: int, case: int, reply: Reply, j: int, unsure: bool,
                       rephrase: Callable[[], int]) -> Message:
        """The user's answer to ``reply`` (an ask): the ``j``-th answer of the conversation."""
        codes = users.codes if case == 0 else users.codes2
        goal = self.goal_states[int(codes[self.pack.intent_variable][u])]
        style, pick, extra = users.draws[u, min(j, users.draws.shape[1] - 1)]
        target = reply.target or ""
        variable = target if target in self.answer_act else None
        if unsure and target != "rephrase":
            scores = None if variable is None else {s: 0.0 for s in self.net.states[variable]}
            return self.act_message("I'm not sure", {"unsure": 1.0}, 0.0,
                                    None if scores is None else AnswerReading(state=None, scores=scores))
        if variable is not None:
            state = self.net.states[variable][int(codes[variable][u])]
            examples = self.pack.question(variable).answer_examples.get(state, [])
            scores = {s: float(s == state) for s in self.net.states[variable]}
            if examples and style < WORD_ANSWER_SHARE:
                return self.act_message(examples[int(pick * len(examples))], {}, 0.0,
                                        AnswerReading(state=state, scores=scores))
            act = self.answer_act[variable][state]
            return self.act_message("yes" if act == "affirm" else "no", {act: 1.0}, 0.0,
                                    AnswerReading(state=None, scores={s: 0.0 for s in scores}))
        if target.startswith(CONFIRM_PREFIX):  # "Shall I freeze your card now?": agrees as the pack says users do
            spec = self.pack.actions[target.removeprefix(CONFIRM_PREFIX)].confirm
            assert spec is not None
            state = self.net.states[spec.variable][int(codes[spec.variable][u])]
            agree = extra < spec.affirm[state]
            return self.act_message("yes" if agree else "no", {"affirm" if agree else "deny": 1.0})
        if target == GOAL_QUESTION or target == "confirm":
            options = list(reply.options)
            if target == "confirm":  # "did you mean X?": a yes/no question about one intent
                yes = goal in options
                return self.act_message("yes" if yes else "no", {"affirm" if yes else "deny": 1.0})
            if goal in options:
                k = options.index(goal)
                if style < 0.5 and k < len(ORDINALS):
                    return self.act_message(ORDINALS[k], {})
                title = self.pack.intent(goal).title
                return Message(title, self.bank.title_result(goal), self.bank.reasoner_result(None))
            if extra < 0.5:
                return self.act_message("none of those", {})
            return self.goal_message(rephrase(), prefix="something else: ")
        # "could you rephrase that?" or a question the user has no variable for: say it again in other words.
        return self.goal_message(rephrase())

    # ------------------------------------------------------------------ conversations
    def converse(self, agent: Agent, users: Users, u: int) -> _Outcome:
        """One conversation of ``agent`` with user ``u``."""
        g_var = self.pack.intent_variable
        kind = str(users.user_kind[u])
        n_cases = 2 if kind == "follow_up" else 1
        state = agent.start()
        case, turns, questions, corrections, answers = 0, 0, 0, 0, 0
        next_text = [1, 0]  # next unused column of utterances / utterances2
        unsure_left = kind == "unsure"
        corrected = False
        actions: list[str] = []

        def rephrase_row(c: int) -> int:
            table = users.utterances if c == 0 else users.utterances2
            col = min(next_text[c], table.shape[1] - 1)
            next_text[c] += 1
            return int(table[u, col])

        cost = 0.0
        if users.request[u] == 1:
            message = self.act_message("I want to speak to a real person", {"request_human": 1.0})
        elif users.request[u] == 2:
            message = self.goal_message(int(users.first[u]), acts={"request_human": 1.0}, content=1.0,
                                        prefix="I want to speak to a person: ")
        else:
            message = self.goal_message(int(users.first[u]))
        while turns < self.max_turns:
            turns += 1
            reply = agent.turn(state, message)
            if reply.kind == "ask":
                questions += 1
                cost += self.question_cost(users, u, case, reply.target)
                message = self.answer_message(users, u, case, reply, answers, unsure_left, partial(rephrase_row, case))
                unsure_left = unsure_left and reply.target == "rephrase"
                answers += 1
                continue
            if reply.kind not in TERMINAL_KINDS:  # a template reply: the user says it again in other words
                message = self.goal_message(rephrase_row(case))
                continue
            goal = self.goal_states[int((users.codes if case == 0 else users.codes2)[g_var][u])]
            missed = (reply.kind == "answer" and reply.target != goal) or (
                reply.kind == "decline" and goal != self.pack.out_of_scope_label)
            if kind == "corrector" and not corrected and missed:
                corrected, corrections = True, corrections + 1
                cost += self.question_cost(users, u, case, None)
                message = self.goal_message(rephrase_row(case), acts={"correction": 1.0}, content=1.0,
                                            prefix="no, that's not what I meant: ")
                continue
            actions.append(reply.action)
            if reply.kind == "escalate" or len(actions) == n_cases:
                break
            case = 1
            message = self.goal_message(rephrase_row(1))
        timed_out = len(actions) < n_cases and (not actions or self.action_kind[actions[-1]] != "escalate")
        while len(actions) < n_cases:  # handed over: the human takes the rest
            actions.append(TIMEOUT_ACTION)
        return _Outcome(actions, turns, questions, corrections, bool(timed_out), cost)

    def question_cost(self, users: Users, u: int, case: int, target: str | None) -> float:
        """What one question (or a correction, ``target`` None) costs user ``u`` under the evaluation weights:
        ``question_cost``, plus the pack's ``mood_cost`` when the user is truly in that mood (unless exempt)."""
        if self.mood_cost is None:
            return self.eval_question_cost
        variable, state, extra, exempt = self.mood_cost
        codes = users.codes if case == 0 else users.codes2
        mood = int(codes[variable][u]) == state and target not in exempt
        return self.eval_question_cost + (extra if mood else 0.0)

    def run(self, agent: Agent, n: int | None = None, seed: int = 0, users: Users | None = None,
            stream: str = "", kind: str | None = None) -> SimulationResult:
        """Run ``agent`` on ``users`` (or on ``n`` fresh users drawn with ``seed``, of goal ``kind`` only when
        given) and score every conversation."""
        if users is None:
            if n is None:
                raise ValueError("run: give n (and seed) or users")
            users = self.users(n, seed, stream, kind=kind)
        n = len(users)
        two = users.user_kind == "follow_up"
        U1, U2 = self.utility_matrix(users.codes), self.utility_matrix(users.codes2)
        best1, best2 = U1.max(axis=1), np.where(two, U2.max(axis=1), 0.0)
        oracle1, oracle2 = U1.argmax(axis=1), U2.argmax(axis=1)  # first maximum, in action order
        names = np.array([a.name for a in self.eval_actions], dtype=object)
        idx1 = np.empty(n, dtype=np.int64)
        idx2 = np.full(n, -1, dtype=np.int64)
        if isinstance(agent, OracleAgent):
            idx1[:] = oracle1
            idx2[two] = oracle2[two]
            turns = np.where(two, 2, 1).astype(np.int64)
            questions = np.zeros(n, dtype=np.int64)
            corrections = np.zeros(n, dtype=np.int64)
            timed_out = np.zeros(n, dtype=bool)
            cost = np.zeros(n)
        else:
            cost = np.empty(n)
            turns = np.empty(n, dtype=np.int64)
            questions = np.empty(n, dtype=np.int64)
            corrections = np.empty(n, dtype=np.int64)
            timed_out = np.empty(n, dtype=bool)
            for u in range(n):
                out = self.converse(agent, users, u)
                idx1[u] = self.action_index[out.actions[0]]
                if len(out.actions) > 1:
                    idx2[u] = self.action_index[out.actions[1]]
                turns[u], questions[u], corrections[u], timed_out[u] = (out.turns, out.questions, out.corrections,
                                                                        out.timed_out)
                cost[u] = out.cost
        rows = np.arange(n)
        got1 = U1[rows, idx1]
        got2 = np.where(two, U2[rows, np.maximum(idx2, 0)], 0.0)
        ok = (got1 >= best1 - SUCCESS_ATOL) & (~two | (got2 >= best2 - SUCCESS_ATOL))
        kinds = np.array([self.action_kind[a] for a in names[idx1]], dtype=str)
        kinds2 = np.array([self.action_kind[names[i]] if i >= 0 else "" for i in idx2], dtype=str)
        return SimulationResult(
            kind=users.kind, user_kind=users.user_kind,
            goal=np.array([self.goal_states[g] for g in users.codes[self.pack.intent_variable]], dtype=str),
            action=names[idx1].astype(str), action_kind=kinds, oracle_action=names[oracle1].astype(str),
            action2=np.array([names[i] if i >= 0 else "" for i in idx2], dtype=str),
            oracle_action2=np.where(two, names[oracle2], "").astype(str),
            turns=turns, questions=questions, corrections=corrections, success=ok,
            escalated=(kinds == "escalate") | (kinds2 == "escalate"), timed_out=timed_out,
            utility=got1 + got2 - cost, oracle_utility=best1 + best2,
        )


def evaluate(pack: DomainPack, bank: UtteranceBank, weights: Mapping[str, float] | None, n: int, seed: int,
             stream: str = "", max_turns: int = DEFAULT_MAX_TURNS) -> SimulationResult:
    """Convenience: the policy with ``weights`` (None: the pack's defaults) on ``n`` users drawn with ``seed``."""
    sim = Simulator(pack, bank, max_turns=max_turns)
    return sim.run(PolicyAgent(pack, weights), n=n, seed=seed, stream=stream)


def with_finding_weight(pack: DomainPack, weight: float) -> DomainPack:
    """The pack with another ``dialogue.finding_weight`` (for the double-counting study; the pack is frozen)."""
    return pack.model_copy(update={"dialogue": pack.dialogue.model_copy(update={"finding_weight": float(weight)})})
