"""Conversation acts and answers in words: the runtime side of ``coact prepare``'s ``acts`` part (no Ray).

- ``ActClassifier`` loads ``<models>/acts`` (``meta.json`` + ``heads.safetensors``): one logistic head per act
  (``actors.schemas.ActName``) plus a ``content`` head ("the message carries domain content beyond the act"),
  on the MiniLM sentence embedding and a "question pending" feature, each Platt-calibrated on a validation split.
  ``predict(embeddings, pending)`` gives P(act) per message (multi-label) and P(content).
- ``read_acts`` is the same as a plain function over a batch, for offline use (the dialogue simulator).
- ``AnswerReader`` reads a message as an answer in words to the pending question ("it was declined" ->
  q_payment_pending=no): a small logistic model per question over its states, fitted at start on the pack's
  ``answer_examples``. Its settings (C and two thresholds) are chosen by ``coact prepare`` on the pack's
  examples (leave one out) and on non-answers, and kept in the acts folder's ``meta.json`` (``answer_reader``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np

from coact.actors.models import _as_2d, _load_tensors, _sigmoid, models_dir, read_meta
from coact.graphs.policy.messages import ActName, AnswerReading

ACT_NAMES: tuple[str, ...] = tuple(get_args(ActName))
CONTENT = "content"
HEADS: tuple[str, ...] = (*ACT_NAMES, CONTENT)

FEATURE_KINDS = ("emb", "emb+pending", "emb+pending+interaction")
DEFAULT_ANSWER_READER = {"C": 100.0, "min_support": 0.4, "min_prob": 0.6}


def acts_path(root: Path | None = None) -> Path:
    return (root or models_dir()) / "acts"


def pending_vector(pending: bool | Sequence[bool] | np.ndarray, n: int) -> np.ndarray:
    """``pending`` as a float (n,) 0/1 vector; a single bool applies to every row."""
    arr = np.asarray(pending, dtype=np.float32)
    if arr.ndim == 0:
        return np.full(n, float(arr), dtype=np.float32)
    arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"pending has {arr.shape[0]} entries for {n} embeddings")
    return (arr != 0).astype(np.float32)


def act_features(emb: np.ndarray, pending: bool | Sequence[bool] | np.ndarray, kind: str) -> np.ndarray:
    """The classifier's input: ``emb`` | ``[emb, pending]`` | ``[emb, pending, emb * pending]``."""
    emb = _as_2d(emb)
    p = pending_vector(pending, len(emb))[:, None]
    if kind == "emb":
        return emb
    if kind == "emb+pending":
        return np.concatenate([emb, p], axis=1)
    if kind == "emb+pending+interaction":
        return np.concatenate([emb, p, emb * p], axis=1)
    raise ValueError(f"unknown act feature kind {kind!r}; known: {FEATURE_KINDS}")


class ActClassifier:
    """Multi-label conversation acts + content, from sentence embeddings and whether a question is pending."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else acts_path()
        self.meta: dict[str, Any] = read_meta(self.path)
        tensors = _load_tensors(self.path / "heads.safetensors")
        self.W = tensors["weight"].astype(np.float32)  # (H, F)
        self.b = tensors["bias"].astype(np.float32)  # (H,)
        self.scale = tensors["platt_scale"].astype(np.float32)  # (H,)
        self.shift = tensors["platt_shift"].astype(np.float32)  # (H,)
        self.heads: list[str] = list(self.meta["heads"])
        self.features: str = self.meta["features"]
        self.version: str = self.meta["version"]
        self.thresholds: dict[str, float] = {k: float(v) for k, v in self.meta["thresholds"].items()}
        self.answer_reader: dict[str, float] = dict(self.meta.get("answer_reader") or DEFAULT_ANSWER_READER)
        if self.heads[:-1] != list(ACT_NAMES) or self.heads[-1] != CONTENT:
            raise ValueError(f"{self.path}: heads {self.heads} do not match the act names {ACT_NAMES} + content "
                             "(rebuild with `coact prepare`)")
        if self.W.shape[0] != len(self.heads):
            raise ValueError(f"{self.path}: {self.W.shape[0]} head rows for {len(self.heads)} heads")

    @property
    def names(self) -> list[str]:
        """The act names, in column order of ``predict``'s act matrix."""
        return self.heads[:-1]

    def predict_heads(self, emb: np.ndarray, pending: bool | Sequence[bool] | np.ndarray) -> np.ndarray:
        """(n, H) calibrated probabilities, columns in ``heads`` order (the acts, then content)."""
        z = act_features(emb, pending, self.features) @ self.W.T + self.b
        return _sigmoid(self.scale * z + self.shift).astype(np.float32)

    def predict(self, emb: np.ndarray, pending: bool | Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(acts (n, n_acts) in ``names`` order, content (n,)): calibrated P(act) and P(content)."""
        p = self.predict_heads(emb, pending)
        return p[:, :-1], p[:, -1]


@dataclass(frozen=True)
class ActReading:
    """The act classifier's reading of a batch of messages."""

    names: list[str]  # act names, the columns of ``acts``
    acts: np.ndarray  # (n, n_acts) P(act)
    content: np.ndarray  # (n,) P(content)
    thresholds: dict[str, float]  # per act and "content": the decision threshold chosen on validation

    def __len__(self) -> int:
        return len(self.content)

    def probs(self, i: int) -> dict[str, float]:
        """P(act) of message ``i``, per act name."""
        return {n: float(p) for n, p in zip(self.names, self.acts[i], strict=True)}

    def detected(self, i: int) -> list[str]:
        """The acts of message ``i`` at or above their thresholds, most probable first."""
        hits = [(float(p), n) for n, p in zip(self.names, self.acts[i], strict=True) if p >= self.thresholds[n]]
        return [n for _, n in sorted(hits, reverse=True)]

    def has_content(self, i: int) -> bool:
        return bool(self.content[i] >= self.thresholds[CONTENT])


def read_acts(classifier: ActClassifier, embeddings: np.ndarray,
              pending: bool | Sequence[bool] | np.ndarray = False) -> ActReading:
    """Acts and content of a batch of messages from their MiniLM embeddings (``actors.models.TextEncoder``,
    the base encoder, max_length 64) and, per message, whether a question was pending."""
    acts, content = classifier.predict(embeddings, pending)
    return ActReading(names=classifier.names, acts=acts, content=content, thresholds=dict(classifier.thresholds))


# ---------------------------------------------------------------- answers in words


def _unit(x: np.ndarray) -> np.ndarray:
    x = _as_2d(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class AnswerReader:
    """Reads a message as an answer to the pending question, from the question's per-state answer examples.

    Per question, a logistic model over its states is fitted on the examples' embeddings (at start: a few dozen
    examples, milliseconds). A linear model rather than nearest-example similarity because the states of a
    question often differ by one word or a negation ("it's in my wallet" / "it's not in my wallet"), which whole-
    sentence cosine similarity barely separates; ``coact prepare`` compares both on the pack's examples (leave one
    out) and on held-out wordings. ``scores`` are the model's per-state probabilities; the reading is the most
    probable state when it has at least ``min_prob`` and the message is near the question's examples at all
    (``support``: cosine to the closest example, at least ``min_support``), otherwise None.
    """

    def __init__(self, examples: dict[str, dict[str, np.ndarray]], C: float = 100.0, min_support: float = 0.4,
                 min_prob: float = 0.6) -> None:
        self.C = float(C)
        self.min_support = float(min_support)
        self.min_prob = float(min_prob)
        self.states: dict[str, list[str]] = {}
        self._examples: dict[str, np.ndarray] = {}
        self._heads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for var, by_state in examples.items():
            states = [s for s, e in by_state.items() if len(e)]
            if not states:
                continue
            X = np.concatenate([_unit(by_state[s]) for s in states])
            y = np.concatenate([np.full(len(by_state[s]), i) for i, s in enumerate(states)])
            self.states[var] = states
            self._examples[var] = X
            self._heads[var] = _fit_softmax(X, y, len(states), self.C)

    @classmethod
    def from_pack(cls, pack: Any, embed: Callable[[list[str]], np.ndarray], **settings: float) -> AnswerReader:
        """Embed every question's ``answer_examples`` (one ``embed`` call) and build the reader."""
        return cls(embed_answer_examples(pack, embed), **settings)

    @property
    def variables(self) -> list[str]:
        return list(self.states)

    def support(self, variable: str, emb: np.ndarray) -> np.ndarray:
        """(n,) cosine similarity of each message to the closest answer example of ``variable``."""
        return (_unit(emb) @ self._examples[variable].T).max(axis=1)

    def probs(self, variable: str, emb: np.ndarray) -> np.ndarray:
        """(n, n_states) P(state | message), columns in ``states[variable]`` order."""
        W, b = self._heads[variable]
        z = _unit(emb) @ W.T + b
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def read(self, variable: str | None, emb_row: np.ndarray) -> AnswerReading | None:
        """The reading of one message for the pending question ``variable``; None when nothing is pending or the
        question has no answer examples."""
        if variable is None or variable not in self.states:
            return None
        emb = _as_2d(np.asarray(emb_row, dtype=np.float32).reshape(1, -1))
        p = self.probs(variable, emb)[0]
        support = float(self.support(variable, emb)[0])
        states = self.states[variable]
        best = int(np.argmax(p))
        state = states[best] if p[best] >= self.min_prob and support >= self.min_support else None
        return AnswerReading(state=state, scores={s: round(float(x), 4) for s, x in zip(states, p, strict=True)})


def embed_answer_examples(pack: Any, embed: Callable[[list[str]], np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """variable -> state -> (k, D) embeddings of the pack's answer examples, embedded in one call."""
    texts, keys = [], []
    for q in pack.questions:
        for state, examples in q.answer_examples.items():
            texts.extend(examples)
            keys.extend([(q.variable, state)] * len(examples))
    if not texts:
        return {}
    emb = np.asarray(embed(texts), dtype=np.float32)
    grouped: dict[str, dict[str, list[np.ndarray]]] = {}
    for (var, state), row in zip(keys, emb, strict=True):
        grouped.setdefault(var, {}).setdefault(state, []).append(row)
    return {v: {s: np.stack(rows) for s, rows in st.items()} for v, st in grouped.items()}


def _fit_softmax(X: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty 1/(2C)·||W||² on the summed log loss (sklearn's
    convention), fitted with L-BFGS: (W (K, D), b (K,)). Deterministic; one class gives a constant model."""
    from scipy.optimize import minimize

    n, d = X.shape
    if n_classes < 2:
        return np.zeros((1, d), np.float32), np.zeros(1, np.float32)
    Y = np.eye(n_classes)[y]
    X64 = X.astype(np.float64)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:n_classes * d].reshape(n_classes, d)
        b = theta[n_classes * d:]
        z = X64 @ W.T + b
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        P = np.exp(logp)
        G = P - Y
        value = -(Y * logp).sum() + 0.5 / C * (W * W).sum()
        grad = np.concatenate([(G.T @ X64 + W / C).ravel(), G.sum(axis=0)])
        return float(value), grad

    res = minimize(loss, np.zeros(n_classes * d + n_classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000})
    W = res.x[:n_classes * d].reshape(n_classes, d).astype(np.float32)
    b = res.x[n_classes * d:].astype(np.float32)
    return W, b
