"""Message understanding shared by the Intent and Reasoner deployments (plain functions, no Ray)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from coact.graphs.policy.messages import (
    AnswerReading,
    IntentRequest,
    IntentResult,
    Passage,
    ReasonerResult,
    ScoredLabel,
)

if TYPE_CHECKING:
    from coact.actors.acts import ActClassifier, ActReading, AnswerReader
    from coact.actors.models import FindingHeads, PassageIndex

_PUNCT = re.compile(r"[^\w\s']+")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def intent_results(
    probs: np.ndarray,
    labels: list[str],
    class_prior: np.ndarray,
    oos_label: str,
    model_version: str,
    acts: ActReading,
    answers: Sequence[AnswerReading | None],
    top_k: int = 5,
) -> list[IntentResult]:
    """One IntentResult per message: the intent distribution, the acts and content, the answer reading."""
    results = []
    oos_index = labels.index(oos_label) if oos_label in labels else None
    prior = [float(x) for x in class_prior]
    for i, (p, answer) in enumerate(zip(probs, answers, strict=True)):
        order = np.argsort(-p)[:top_k]
        results.append(
            IntentResult(
                top=[ScoredLabel(label=labels[j], p=round(float(p[j]), 6)) for j in order],
                probs=[float(x) for x in p],
                labels=labels,
                class_prior=prior,
                out_of_scope=oos_index is not None and int(order[0]) == oos_index,
                model_version=model_version,
                acts={n: round(v, 6) for n, v in acts.probs(i).items()},
                content=round(float(acts.content[i]), 6),
                answer=answer,
            )
        )
    return results


def understand(
    requests: Sequence[IntentRequest],
    embeddings: np.ndarray,
    classifier: Any,
    acts: ActClassifier,
    answers: AnswerReader,
    oos_label: str,
) -> list[IntentResult]:
    """The IntentActor's work on a batch, given the base encoder's embeddings of the messages: the intent
    model (``actors.intent_models``: any kind), the acts read with each request's pending flag, and the answer
    reading for requests whose ``pending`` names a pack question with answer examples."""
    from coact.actors.acts import read_acts

    messages = [r.message for r in requests]
    probs = classifier.predict_proba_texts(messages, embeddings)
    reading = read_acts(acts, embeddings, [r.pending is not None for r in requests])
    answer = [answers.read(r.pending, row) for r, row in zip(requests, embeddings, strict=True)]
    return intent_results(probs, classifier.labels, classifier.priors, oos_label, classifier.version, reading, answer)


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


def reason(embeddings: np.ndarray, findings: FindingHeads, passages: PassageIndex, top_k: int,
           device: str) -> list[ReasonerResult]:
    """The ReasonerActor's work on a batch: finding probabilities, sent with the prior the heads assume
    (``FindingHeads.effective_prior``: the likelihood ratio of an output p is odds(p) / odds(prior)), and the
    top-k FAQ passages."""
    probs = findings.predict(embeddings)
    hits = [passages.top_k(row, top_k) for row in embeddings]
    return reasoner_results(embeddings, probs, findings.names, findings.effective_prior.tolist(), hits,
                            f"{findings.version}+{passages.version}", device)
