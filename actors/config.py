"""One typed config per stage: what its engine needs, its batching and its Serve deployment options.

The serving layer composes these into `coact.graphs.serving.http.AppConfig` (the `args` of a Serve config
file) and applies each section's `deployment` with `.options(...)` at bind time, so a stage's resources,
batching and autoscaling are set here and nowhere else. Plain pydantic (this layer imports no Ray): the
deployment options are checked against Serve's own `DeploymentSchema` by `AppConfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails where it is written, named


def _merged(default: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(default)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class BatchingConfig(_Section):
    """@serve.batch of the stage's batched method (`ray.serve.batch`'s names); max_batch_size 1 turns it off."""

    max_batch_size: int = Field(ge=1, le=256)
    batch_wait_timeout_s: float = Field(ge=0, le=1)


class ActorOptions(_Section):
    """A replica's resources (Serve's `ray_actor_options`): spelt out whole, as Serve replaces them whole."""

    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory: int | None = Field(default=None, ge=0, description="bytes of host memory reserved per replica")
    resources: dict[str, float] | None = Field(default=None, description="custom resources, e.g. a node label")
    accelerator_type: str | None = None


class DeploymentOptions(_Section):
    """The Serve options of one deployment (`serve.deployment(...).options(...)`'s names).

    `num_replicas` and `autoscaling_config` exclude each other, as in Serve: leave `num_replicas` unset
    when autoscaling.
    """

    num_replicas: int | None = Field(default=None, ge=1, description="fixed count; None: 1, or autoscaled")
    autoscaling_config: dict[str, Any] | None = Field(default=None, description="Serve's AutoscalingConfig")
    max_ongoing_requests: int = Field(default=64, ge=1, description="per replica")
    max_queued_requests: int = Field(default=-1, ge=-1, description="per caller; full: 503 + Retry-After; -1: no bound")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_replicas_per_node: int | None = Field(default=None, ge=1)

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of `Deployment.options`: unset optional fields are left to Serve."""
        return self.model_dump(exclude_none=True)


def _deployment(num_cpus: float, max_ongoing_requests: int, max_queued_requests: int = -1) -> Any:
    return Field(default_factory=lambda: DeploymentOptions(
        ray_actor_options=ActorOptions(num_cpus=num_cpus), max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests))


def _batching(max_batch_size: int, batch_wait_timeout_s: float) -> Any:
    return Field(default_factory=lambda: BatchingConfig(max_batch_size=max_batch_size,
                                                        batch_wait_timeout_s=batch_wait_timeout_s))


class StageConfig(_Section):
    """A stage's section: what is given of `batching` / `deployment` is laid over the stage's own defaults, so
    `deployment: {ray_actor_options: {num_gpus: 1}}` keeps the stage's CPUs and request limits."""

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name in ("batching", "deployment"):
            field = cls.model_fields.get(name)
            if field is not None and field.default_factory is not None and isinstance(data.get(name), dict):
                out[name] = _merged(field.default_factory().model_dump(exclude_none=True), data[name])
        return out


class SessionsConfig(_Section):
    """Where sessions live (docs/sessions.md): the embedded head-node actor, or Redis (survives a Ray restart)."""

    ttl_s: float = Field(default=1800.0, gt=0, description="a session unused this long is dropped")
    backend: Literal["embedded", "redis"] = Field(default="embedded", description="embedded: the head-node "
                                                  "actor with its journal; redis: a Redis server at redis_url")
    redis_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://\S+$",
                                  description="e.g. redis://127.0.0.1:6379/0 (backend redis)")
    redis_prefix: str = Field(default="coact:session:", min_length=1, max_length=64, pattern=r"^\S+$",
                              description="key prefix of the sessions in Redis")
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="per store call; past it the request "
                                                                   "answers 503 + Retry-After")

    @model_validator(mode="after")
    def _redis_needs_a_url(self) -> SessionsConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("sessions.backend 'redis' needs sessions.redis_url (e.g. redis://127.0.0.1:6379/0)")
        return self


class IntentConfig(StageConfig):
    model: str | None = Field(default=None, description="intent model folder (default: <models>/intent); reaches "
                                                        "the replicas as user_config, so a new one is hot-swapped")
    quantize: bool = Field(default=False, description="dynamic int8 encoder on CPU")
    threads: int | None = Field(default=None, ge=1, le=64, description="torch threads; None: torch's default")
    batching: BatchingConfig = _batching(16, 0.005)
    deployment: DeploymentOptions = _deployment(0.25, 64)


class ReasonerConfig(StageConfig):
    findings_model: str | None = Field(default=None, description="finding heads folder (default: "
                                                                 "<models>/findings); user_config, hot-swapped")
    top_k: int = Field(default=3, ge=0, le=50, description="FAQ passages returned")
    quantize: bool = False
    threads: int | None = Field(default=None, ge=1, le=64)
    batching: BatchingConfig = _batching(32, 0.01)
    deployment: DeploymentOptions = _deployment(0.25, 64)


class DecisionConfig(StageConfig):
    weights: dict[str, float] | None = Field(default=None, description="utility weights (None: the pack's)")
    deployment: DeploymentOptions = _deployment(0.1, 64)


class VllmConfig(_Section):
    """vLLM engine settings (`backend: vllm`); see docs/streaming-and-openai.md."""

    dtype: str = Field(default="auto", description="auto: float32 on CPU, the model's dtype on GPU")
    max_model_len: int = Field(default=2048, ge=128, description="prompt + reply tokens; sizes the KV cache")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="GPU share for weights + KV")
    enforce_eager: bool | None = Field(default=None, description="None: eager on CPU (compiling is minutes per "
                                                                 "start there), CUDA graphs on GPU")
    cpu_kvcache_gib: float = Field(default=1.0, gt=0, le=64, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    max_num_seqs: int = Field(default=32, ge=1, le=1024, description="sequences batched per engine step")


class ResponderConfig(StageConfig):
    generate: bool = Field(default=True, description="phrase replies with the LM (False: templates only)")
    max_new_tokens: int = Field(default=24, ge=1, le=512)
    timeout_s: float = Field(default=20.0, gt=0, description="generation deadline; past it the template is sent")
    # One thread per replica: several replicas share the cores, and an oversubscribed torch thread pool was
    # measured 4x slower than a single thread here.
    threads: int = Field(default=1, ge=1, le=64)
    backend: Literal["transformers", "vllm", "scripted"] = Field(
        default="transformers", description="transformers (@serve.batch) or vLLM (continuous batching); "
                                            "scripted: an adversarial stand-in that says what the attacker asks")
    script: str | None = Field(default=None, description="scripted backend: JSONL file or folder of "
                                                         "{message, output} attacks (actors/scripted_backend.py)")
    # content_first: the decided content (with its reason) is sent at once and the LM's acknowledgement follows,
    # sent only whole and after the guard passed it, so nothing shown is ever taken back (docs/streaming-and-openai.md).
    # opener_first: the LM's opener streams before the content, withdrawn by a `replace` when the guard trips.
    layout: Literal["content_first", "opener_first"] = Field(
        default="content_first", description="where the LM's sentence goes and when it is sent")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    batching: BatchingConfig = _batching(8, 0.02)
    # Load shedding: a full queue answers 503 + Retry-After instead of letting turns time out.
    deployment: DeploymentOptions = _deployment(0.5, 32, 256)


DEFAULT_ACTION_SERVER = "http://127.0.0.1:8100"  # the reference action server `coact serve` starts


class WebhookConfig(_Section):
    """An HTTP executor: `POST {url}/v1/actions/{action}` with the ActionCall (docs/actions.md)."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    timeout_s: float = Field(default=2.0, gt=0, le=60, description="per attempt")
    attempts: int = Field(default=3, ge=1, le=10, description="tries per call, all with the same idempotency key")
    backoff_s: float = Field(default=0.2, ge=0, le=10, description="wait before a retry, times the attempt number")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every call (e.g. Authorization)")


class ActionsConfig(StageConfig):
    """The action step: executes decided actions through the domain pack's executors before the reply is phrased."""

    enabled: bool = Field(default=True, description="False: no action step (decided actions are labels only; "
                                                    "a benchmark baseline, not for customers)")
    dry_run: bool = Field(default=False, description="call no executor; every action is answered done, marked dry run")
    webhooks: dict[str, WebhookConfig] = Field(default_factory=lambda: {"bank": WebhookConfig(url=DEFAULT_ACTION_SERVER)})
    audit_log: str | None = Field(default=None, description="SQLite file of the audit log, on the head node "
                                                            "(None: $COACT_AUDIT_LOG, else ~/.coact/audit.sqlite)")
    # It waits on other systems, not on a core: a sliver of CPU, many calls in flight.
    deployment: DeploymentOptions = _deployment(0.05, 64)

