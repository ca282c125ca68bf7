"""Message understanding shared by the Intent and Reasoner deployments (plain functions, no Ray)."""

from __future__ import annotations

import re

import numpy as np

from actors.schemas import IntentResult, Passage, ReasonerResult, ScoredLabel
from graphs.domain import DomainPack

_PUNCT = re.compile(r"[^\w\s']+")
CONTROL_SIMILARITY = 0.80  # cosine to the closest control example; MiniLM paraphrases sit above ~0.8
CONTROL_MAX_WORDS = 8  # longer messages carry content: let the domain classifier have them


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class ControlDetector:
    """Conversation-control intents (affirm, deny, greeting, thanks, goodbye).

    Exact lexicon match first (short replies like "yes" are unambiguous), then nearest
    example by embedding similarity for paraphrases ("yeah I think so").
    """

    def __init__(self, pack: DomainPack, example_embeddings: np.ndarray, example_labels: list[str]) -> None:
        self.lexicon = {normalise(w): name for name, ci in pack.control_intents.items() for w in ci.lexicon}
        self.embeddings = example_embeddings
        self.labels = example_labels

    @staticmethod
    def examples(pack: DomainPack) -> tuple[list[str], list[str]]:
        texts, labels = [], []
        for name, ci in pack.control_intents.items():
            texts.extend(ci.examples)
            labels.extend([name] * len(ci.examples))
        return texts, labels

    def detect(self, text: str, embedding: np.ndarray) -> tuple[str | None, float]:
        norm = normalise(text)
        if norm in self.lexicon:
            return self.lexicon[norm], 1.0
        if len(norm.split()) > CONTROL_MAX_WORDS or len(self.labels) == 0:
            return None, 0.0
        sims = self.embeddings @ embedding
        best = int(np.argmax(sims))
        score = float(sims[best])
        return (self.labels[best], score) if score >= CONTROL_SIMILARITY else (None, score)


def intent_results(
    texts: list[str],
    embeddings: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    class_prior: np.ndarray,
    control: ControlDetector,
    oos_label: str,
    model_version: str,
    top_k: int = 5,
) -> list[IntentResult]:
    results = []
    oos_index = labels.index(oos_label) if oos_label in labels else None
    for text, emb, p in zip(texts, embeddings, probs, strict=True):
        order = np.argsort(-p)[:top_k]
        name, score = control.detect(text, emb)
        results.append(
            IntentResult(
                top=[ScoredLabel(label=labels[i], p=round(float(p[i]), 6)) for i in order],
                probs=[float(x) for x in p],
                labels=labels,
                class_prior=[float(x) for x in class_prior],
                control=name,  # type: ignore[arg-type]
                control_score=round(score, 4),
                out_of_scope=oos_index is not None and int(order[0]) == oos_index,
                model_version=model_version,
            )
        )
    return results


def reasoner_results(
    embeddings: np.ndarray,
    finding_probs: np.ndarray,
    finding_names: list[str],
    finding_prior: list[float],
    passages: list[list[tuple[str, str, float]]],
    model_version: str,
    device: str,
) -> list[ReasonerResult]:
    prior = {n: float(p) for n, p in zip(finding_names, finding_prior, strict=True)}
    return [
        ReasonerResult(
            findings={n: round(float(x), 6) for n, x in zip(finding_names, row, strict=True)},
            finding_prior=prior,
            passages=[Passage(intent=i, text=t, score=round(float(s), 4)) for i, t, s in hits],
            model_version=model_version,
            batch_size=len(embeddings),
            device=device,
        )
        for row, hits in zip(finding_probs, passages, strict=True)
    ]
