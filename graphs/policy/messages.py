"""The messages the stages exchange, and the session state: every value that crosses a deployment boundary.

The HTTP and OpenAI wire types are the serving layer's (``coact.graphs.serving.http``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

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
    unavailable: list[str] = Field(default_factory=list, description="actions not to choose in this case: "
                                   "declined at confirmation, refused or failed by their executor")
    agreed: list[str] = Field(default_factory=list, description="actions the customer agreed to at confirmation: "
                              "carried out unless unavailable")


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
    confirmed: list[str] | None = Field(default=None, description="actions the reply may say happened (the "
                                        "executor confirmed them); None: the decided action")
    reason: str | None = Field(default=None, description="the reason clause the reply must carry (in the template)")
    max_new_tokens: int | None = Field(default=None, ge=1, description="the caller's cap on generated tokens "
                                       "(OpenAI max_tokens); the Responder's own cap still applies")


class ResponderResult(_Wire):
    reply: str
    source: Literal["model", "template"]
    guard: str | None = Field(default=None, description="why the model text was rejected, if it was")
    generated: str = ""
    tokens: int = 0
    prompt_tokens: int = Field(default=0, description="tokens of the prompt the LM read (0: nothing generated)")
    model_version: str


class ResponderChunk(_Wire):
    """One item of the Responder's stream: reply text as generated, a guard replacement, then the result."""

    kind: Literal["token", "replace", "result"]
    text: str = ""
    final: bool = Field(default=False, description="token text nothing can withdraw (decided, or guard-passed)")
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


ActionStatus = Literal["done", "refused", "failed"]
ACTION_CONTRACT = "coact.action/v1"


class EvidenceLine(_Wire):
    """One piece of the case's evidence, as the decision's explanation names it."""

    label: str
    variable: str
    shift: float | None = Field(default=None, description="how far it moved the decision's margin, if known")


class ActionCall(_Wire):
    """What an executor receives (the webhook's JSON body, a Python entry point's argument): the action and the
    decision that justified it. See docs/actions.md for the contract."""

    contract: Literal["coact.action/v1"] = ACTION_CONTRACT
    idempotency_key: str = Field(description="the same for every retry of this action in this turn")
    session_id: str
    turn: int
    action: str
    target: str | None = None
    evidence: list[EvidenceLine] = Field(default_factory=list)
    posterior: dict[str, dict[str, float]] = Field(default_factory=dict)
    expected_utility: dict[str, float] = Field(default_factory=dict)
    reason: str = ""
    summary: str = Field(default="", description="one paragraph on the case, for a person taking it over")
    conversation: list[HistoryTurn] = Field(default_factory=list, description="the whole conversation, this "
                                            "message last")


class ActionOutcome(_Wire):
    """What an executor answers. Only `done` lets a reply say the action happened."""

    model_config = ConfigDict(extra="ignore")  # a user's server may send more; it is kept in `data`
    status: ActionStatus
    reason: str = ""
    reference: str | None = Field(default=None, max_length=200, description="e.g. a ticket number, shown to "
                                  "the customer")
    data: dict[str, Any] = Field(default_factory=dict)


class ActionRecord(_Wire):
    """An executed action, as the session remembers it."""

    action: str
    status: ActionStatus
    turn: int
    reference: str | None = None
    reason: str = ""
    idempotency_key: str
    attempts: int = 1
    ms: float = 0.0


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
    done_actions: list[str] = Field(default_factory=list, description="actions the executor confirmed; never "
                                    "repeated")
    actions: list[ActionRecord] = Field(default_factory=list, description="every executed action and its result")
    deferred: list[str] = Field(default_factory=list, description="goals asked about in passing, offered later")
