"""Every value that crosses a deployment or HTTP boundary, as pydantic models."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 2000
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

ControlIntentName = Literal["affirm", "deny", "greeting", "thanks", "goodbye"]
ActionKind = Literal["answer", "ask", "action", "escalate", "decline", "chitchat"]
StageName = Literal["session", "intent", "reasoner", "decision", "responder"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- HTTP -----------------------------------------------------------------------------------


class ChatRequest(_Wire):
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ErrorBody(_Wire):
    error: str
    detail: list[dict] | str | None = None


# --- stage outputs --------------------------------------------------------------------------


class ScoredLabel(_Wire):
    label: str
    p: float


class IntentResult(_Wire):
    top: list[ScoredLabel]
    probs: list[float] = Field(description="calibrated probability of every label, in `labels` order")
    labels: list[str]
    class_prior: list[float]
    control: ControlIntentName | None = None
    control_score: float = 0.0
    out_of_scope: bool = False
    model_version: str


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


class SessionEvidence(_Wire):
    soft: list[SoftEvidenceItem] = Field(default_factory=list)
    hard: dict[str, str] = Field(default_factory=dict)
    asked: list[str] = Field(default_factory=list)


class DecisionRequest(_Wire):
    evidence: SessionEvidence
    turn: int


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


# --- session --------------------------------------------------------------------------------


class SessionState(_Wire):
    session_id: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    turns: int = 0
    history: list[HistoryTurn] = Field(default_factory=list)
    evidence: SessionEvidence = Field(default_factory=SessionEvidence)
    pending_question: str | None = None
    last_action: str | None = None


# --- response -------------------------------------------------------------------------------


class StageTrace(_Wire):
    stage: StageName
    ms: float
    output: dict


class Trace(_Wire):
    stages: list[StageTrace]
    total_ms: float
    model_versions: dict[str, str] = Field(default_factory=dict)


class ActionOut(_Wire):
    kind: ActionKind
    name: str
    target: str | None = None


class ChatResponse(_Wire):
    session_id: str
    reply: str
    action: ActionOut
    trace: Trace


class SessionView(_Wire):
    session: SessionState
    ttl_s: float


# --- application config (Serve config `args`) -------------------------------------------------


class AppConfig(_Wire):
    domain: str = "banking"
    models: str | None = Field(default=None, description="models folder built by `coact prepare`")
    generate: bool = Field(default=True, description="phrase replies with the LM (False: templates only)")
    max_new_tokens: int = Field(default=24, ge=1, le=512)
    generation_timeout_s: float = Field(default=20.0, gt=0)
    session_ttl_s: float = Field(default=1800.0, gt=0)
    quantize_encoders: bool = False
    intent_model: str | None = Field(default=None, description="intent model folder (default: <models>/intent)")
    findings_model: str | None = Field(default=None, description="finding heads folder (default: <models>/findings)")
    reasoner_num_gpus: float = Field(default=0.0, ge=0)
    responder_num_gpus: float = Field(default=0.0, ge=0)
    reasoner_replicas: int | None = Field(default=None, ge=1, description="fixed count; None: deployment default")
    responder_replicas: int | None = Field(default=None, ge=1)
    # Load shedding: a full queue answers 503 + Retry-After instead of letting turns time out.
    responder_max_ongoing_requests: int = Field(default=32, ge=1)
    responder_max_queued_requests: int = Field(default=256, ge=-1, description="-1: unbounded")
    # Dynamic batching (@serve.batch) per stage; max_batch_size 1 turns batching off.
    intent_max_batch_size: int = Field(default=16, ge=1, le=256)
    intent_batch_wait_s: float = Field(default=0.005, ge=0, le=1)
    reasoner_max_batch_size: int = Field(default=32, ge=1, le=256)
    reasoner_batch_wait_s: float = Field(default=0.01, ge=0, le=1)
    responder_max_batch_size: int = Field(default=8, ge=1, le=256)
    responder_batch_wait_s: float = Field(default=0.02, ge=0, le=1)
    # torch intra-op threads per replica (None: torch's default for the encoders).
    encoder_threads: int | None = Field(default=None, ge=1, le=64)
    responder_threads: int = Field(default=1, ge=1, le=64)
