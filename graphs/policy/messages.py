"""The messages the stages exchange, and the session state: every value that crosses a deployment boundary.

The HTTP and OpenAI wire types are the serving layer's (``coact.graphs.serving.http``).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 2000

# Conversation acts the IntentActor reads from a message (multi-label, besides its domain content).
ActName = Literal["affirm", "deny", "unsure", "greeting", "thanks", "goodbye", "request_human", "correction"]
ActionKind = Literal["answer", "ask", "action", "escalate", "decline", "chitchat"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredLabel(_Wire):
    label: str
    p: float


class IntentRequest(_Wire):
    message: str
    pending: str | None = Field(default=None, description="the pending question's variable, or None")


class AnswerReading(_Wire):
    state: str | None = Field(description="the state the message answers; None if it doesn't clearly answer")
    scores: dict[str, float] = Field(description="per state of the pending question's variable")


class IntentResult(_Wire):
    top: list[ScoredLabel]
    probs: list[float] = Field(description="calibrated probability of every label, in `labels` order")
    labels: list[str]
    class_prior: list[float]
    out_of_scope: bool = False
    model_version: str
    acts: dict[str, float] = Field(description="P(act) per ActName (multi-label, calibrated sigmoid)")
    content: float = Field(description="P(the message carries domain content beyond the act)")
    answer: AnswerReading | None = Field(default=None, description="only when the request's pending names a "
                                         "pack question: the message read as an answer to it")


class Passage(_Wire):
    intent: str
    text: str
    score: float


class ReasonerResult(_Wire):
    findings: dict[str, float]
    finding_prior: dict[str, float]
    passages: list[Passage]
    model_version: str
    batch_size: int = 1
    device: str = "cpu"


class SoftEvidenceItem(_Wire):
    variable: str
    likelihood: dict[str, float]
    label: str
    turn: int = Field(default=0, description="the turn whose message gave it (a correction retracts by turn)")


class SessionEvidence(_Wire):
    """The evidence of one case: what the customer said about one goal, turn by turn."""

    soft: list[SoftEvidenceItem] = Field(default_factory=list)
    hard: dict[str, str] = Field(default_factory=dict)
    hard_turn: dict[str, int] = Field(default_factory=dict, description="turn of each hard answer")
    asked: list[str] = Field(default_factory=list)
    unsure: list[str] = Field(default_factory=list, description="questions answered 'not sure' (no evidence)")
    options: list[str] = Field(default_factory=list, description="goal states offered by the disambiguation question")


class DecisionRequest(_Wire):
    evidence: SessionEvidence


class InfluenceOut(_Wire):
    label: str
    variable: str
    shift: float
    choice_without: str


class DecisionResult(_Wire):
    action: str
    kind: ActionKind
    target: str | None = None
    question: str | None = None
    options: list[str] = Field(default_factory=list, description="goal states a disambiguation question offers")
    expected_utility: dict[str, float]
    value_of_information: dict[str, float]
    posterior: dict[str, dict[str, float]]
    explanation: list[InfluenceOut]
    reason: str
    domain_version: str


class HistoryTurn(_Wire):
    role: Literal["user", "assistant"]
    text: str


class ResponderRequest(_Wire):
    message: str
    decision: DecisionResult
    template: str = Field(description="the content the reply must carry: question, FAQ answer or action text")
    forbidden: list[str] = Field(default_factory=list, description="texts that must not appear (other intents' answers)")
    history: list[HistoryTurn] = Field(default_factory=list)


class ResponderResult(_Wire):
    reply: str
    source: Literal["model", "template"]
    guard: str | None = Field(default=None, description="why the model text was rejected, if it was")
    generated: str = ""
    tokens: int = 0
    model_version: str


class ResponderChunk(_Wire):
    """One item of the Responder's stream: reply text as generated, a guard replacement, then the result."""

    kind: Literal["token", "replace", "result"]
    text: str = ""
    guard: str | None = None
    result: ResponderResult | None = None


class ResponderStats(_Wire):
    backend: str
    streams_started: int = 0
    streams_finished: int = 0
    streams_cancelled: int = 0
    streams_active: int = 0
    engine_unfinished_requests: int | None = Field(
        default=None, description="generations still running: vLLM requests in the engine, or transformers threads")


class SessionState(_Wire):
    session_id: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    turns: int = 0
    history: list[HistoryTurn] = Field(default_factory=list)
    evidence: SessionEvidence = Field(default_factory=SessionEvidence)
    pending_question: str | None = None
    last_action: str | None = None
    last_kind: str | None = None
    last_target: str | None = None
    goal_belief: dict[str, float] = Field(
        default_factory=dict, description="top of the goal posterior after the last decision (the case's topic)")
    previous: SessionEvidence | None = Field(default=None, description="the last closed case, for corrections")
    done_actions: list[str] = Field(default_factory=list, description="actions taken; never repeated")
    deferred: list[str] = Field(default_factory=list, description="goals asked about in passing, offered later")
