"""What crosses the HTTP boundary: chat requests and responses, the trace, stream events, the Serve
application's config, and the OpenAI-compatible types."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from coact.actors.config import (
    ActionsConfig,
    ActorOptions,
    DecisionConfig,
    DeploymentOptions,
    IntentConfig,
    ReasonerConfig,
    ResponderConfig,
    SessionsConfig,
    StageConfig,
)
from coact.graphs.policy.messages import MAX_MESSAGE_CHARS, ActionKind, ActionRecord, SessionState

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
StageName = Literal["session", "intent", "reasoner", "decision", "action", "responder"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatRequest(_Wire):
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    stream: bool = Field(default=False, description="answer with server-sent events (decision, tokens, done)")
    max_new_tokens: int | None = Field(default=None, ge=1, le=512, description="cap on the tokens the LM "
                                       "generates (its acknowledgement); the decided content is always whole")


class ExplainRequest(_Wire):
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    target: str | None = Field(default=None, description="intent label to explain (default: the top intent)")
    steps: int = Field(default=50, ge=8, le=256, description="Integrated Gradients steps")


class ExplainResponse(_Wire):
    """Token attributions of the target intent's raw logit (docs/attributions.md): they sum to
    target_logit - baseline_logit up to delta."""

    model: str
    target: str
    probability: float
    tokens: list[str]
    attributions: list[float]
    words: list[str] = Field(default_factory=list)
    word_attributions: list[float] = Field(default_factory=list)
    delta: float
    target_logit: float
    baseline_logit: float


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
    executed: list[ActionRecord] = Field(default_factory=list, description="what the action step did this turn: "
                                         "each executed action's result (done / refused / failed)")


class ChatResponse(_Wire):
    session_id: str
    reply: str
    action: ActionOut
    trace: Trace


class StreamDone(_Wire):
    """Final event of a streamed turn: the full response plus the guard's verdict and the Responder's timing."""

    session_id: str
    reply: str
    action: ActionOut
    trace: Trace
    source: Literal["model", "template"]
    guard: str | None = Field(default=None, description="why the model text was rejected, if it was")
    replaced: bool = Field(default=False, description="streamed tokens were withdrawn: show `reply` instead")
    responder_ms: float = 0.0
    first_token_ms: float | None = Field(default=None, description="from the Responder call to its first token")


class StreamText(_Wire):
    text: str
    final: bool = Field(default=False, description="no later `replace` can withdraw this text (it is decided "
                        "content or passed the guard); otherwise it may be replaced")


class StreamReplace(_Wire):
    """The guard withdrew the streamed text: show `reply` (the decided content) instead."""

    reply: str
    guard: str | None = None


class StreamError(_Wire):
    error: str


class SessionView(_Wire):
    session: SessionState
    ttl_s: float
    version: int = Field(default=0, description="the stored version: every saved turn adds one (docs/sessions.md)")


class AuthConfig(_Wire):
    """API keys and per-key limits (graphs/serving/auth.py, docs/security.md). No keys (neither `keys_file`
    nor $COACT_API_KEYS): loopback clients only."""

    keys_file: str | None = Field(default=None, description="one '<name> sha256:<hex> [limits]' per line")
    rate_per_s: float = Field(default=10.0, gt=0, description="requests a second per key and ingress replica")
    burst: int = Field(default=40, ge=1, description="requests a key may send at once before the rate applies")
    max_sessions: int = Field(default=1000, ge=1, description="live sessions per key; a new one past it: 429")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed; empty: CORS off")


class IngressConfig(StageConfig):
    turn_timeout_s: float = Field(default=120.0, gt=0, description="past it a turn answers 503 + Retry-After")
    auth: AuthConfig = Field(default_factory=AuthConfig)
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        ray_actor_options=ActorOptions(num_cpus=0.1), max_ongoing_requests=64, max_queued_requests=128))


DEPLOYMENT_NAMES = {"ingress": "ChatIngress", "intent": "IntentActor", "reasoner": "ReasonerActor",
                    "decision": "DecisionActor", "actions": "ActionActor", "responder": "ResponderActor"}
def check_deployment(name: str, options: DeploymentOptions) -> None:
    """Serve's own validation of one deployment's options (what `serve deploy` would refuse), at config time."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    opts = options.serve_options()
    try:
        DeploymentSchema.model_validate({"name": name, **opts})
        if options.autoscaling_config is not None:
            unknown = sorted(set(options.autoscaling_config) - set(AutoscalingConfig.model_fields))
            if unknown:
                raise ValueError(f"autoscaling_config: unknown field {unknown[0]!r}")
            AutoscalingConfig.model_validate(options.autoscaling_config)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"deployment{'.' + where if where else ''}: {first['msg'].removeprefix('Value error, ')}") from None
    except ValueError as e:
        raise ValueError(f"deployment.{e}") from None


class AppConfig(_Wire):
    """`build_app`'s args: the domain, the models folder, and one section per stage (actors/config.py for the
    four stages), each with its deployment options (replicas or autoscaling, resources, request limits)."""

    domain: str = "banking"
    models: str | None = Field(default=None, description="models folder built by `coact prepare`")
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    intent: IntentConfig = Field(default_factory=IntentConfig)
    reasoner: ReasonerConfig = Field(default_factory=ReasonerConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    responder: ResponderConfig = Field(default_factory=ResponderConfig)

    @field_validator("ingress", "intent", "reasoner", "decision", "actions", "responder")
    @classmethod
    def _serve_accepts(cls, section: Any, info: ValidationInfo) -> Any:
        check_deployment(DEPLOYMENT_NAMES[info.field_name], section.deployment)
        return section


# Requests accept the fields OpenAI clients send; sampling fields are accepted and ignored (the domain
# pack sets generation), unknown fields are ignored as OpenAI-compatible servers commonly do.


class OpenAIContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients echo assistant messages back with tool_calls, refusal…
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[OpenAIContentPart] | None = None
    name: str | None = None


class OpenAIStreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None
    user: str | None = Field(default=None, description="kept as the session id when it is a valid one")
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class OpenAIUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class OpenAIAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class OpenAIChoice(BaseModel):
    index: int = 0
    message: OpenAIAssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"] = "stop"
    logprobs: None = None


class CoactExtension(BaseModel):
    """The decision and its trace, in an extension field (`coact`) that OpenAI clients ignore."""

    session_id: str
    action: ActionOut
    trace: Trace | None = None
    source: Literal["model", "template"] | None = None
    guard: str | None = None
    replaced: bool = False
    reply: str | None = Field(default=None, description="streaming: the authoritative full reply")


class OpenAIChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage
    system_fingerprint: str | None = None
    coact: CoactExtension


class OpenAIDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class OpenAIChunkChoice(BaseModel):
    index: int = 0
    delta: OpenAIDelta
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: None = None


class OpenAIChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[OpenAIChunkChoice]
    usage: OpenAIUsage | None = None
    coact: CoactExtension | None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coact"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
