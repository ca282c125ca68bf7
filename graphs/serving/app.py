"""The Serve application: the one place where the four stages and the ingress are composed.

`serve run coact.graphs.serving.app:build_app`, `serve run cluster/serve/local.yaml` and `coact serve` all
build the graph here.
"""

from __future__ import annotations

from ray.serve import Application

from coact.actors.decision import DecisionActor
from coact.actors.intent import IntentActor
from coact.actors.reasoner import ReasonerActor
from coact.actors.responder import ResponderActor
from coact.graphs.serving.http import AppConfig
from coact.graphs.serving.ingress import ChatIngress


def _replicas(n: int | None) -> dict:
    # Only pin a count when asked: a config file's autoscaling_config must not meet a fixed num_replicas.
    return {} if n is None else {"num_replicas": n}


def _vllm_settings(cfg: AppConfig) -> dict | None:
    # Plain dict: the deployment imports vLLM (an optional dependency) only when this backend is chosen.
    if cfg.responder_backend != "vllm":
        return None
    return {"dtype": cfg.vllm_dtype, "max_model_len": cfg.vllm_max_model_len,
            "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization, "enforce_eager": cfg.vllm_enforce_eager,
            "cpu_kvcache_gib": cfg.vllm_cpu_kvcache_gib, "max_num_seqs": cfg.vllm_max_num_seqs}


def build_app(args: dict | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    # user_config reaches `reconfigure`: a new model folder is picked up without redeploying.
    intent = IntentActor.options(user_config={"intent_model": cfg.intent_model}).bind(
        models=cfg.models, domain=cfg.domain, quantize=cfg.quantize_encoders,
        max_batch_size=cfg.intent_max_batch_size, batch_wait_s=cfg.intent_batch_wait_s, threads=cfg.encoder_threads)
    reasoner = ReasonerActor.options(
        **_replicas(cfg.reasoner_replicas), ray_actor_options={"num_cpus": 0.25, "num_gpus": cfg.reasoner_num_gpus},
        user_config={"findings_model": cfg.findings_model},
    ).bind(models=cfg.models, quantize=cfg.quantize_encoders, max_batch_size=cfg.reasoner_max_batch_size,
           batch_wait_s=cfg.reasoner_batch_wait_s, threads=cfg.encoder_threads)
    decision = DecisionActor.bind(domain=cfg.domain)
    responder = ResponderActor.options(
        **_replicas(cfg.responder_replicas),
        ray_actor_options={"num_cpus": 0.5, "num_gpus": cfg.responder_num_gpus},
        max_ongoing_requests=cfg.responder_max_ongoing_requests,
        max_queued_requests=cfg.responder_max_queued_requests,
    ).bind(models=cfg.models, domain=cfg.domain, generate=cfg.generate, max_new_tokens=cfg.max_new_tokens,
           timeout_s=cfg.generation_timeout_s, threads=cfg.responder_threads,
           max_batch_size=cfg.responder_max_batch_size, batch_wait_s=cfg.responder_batch_wait_s,
           backend=cfg.responder_backend, vllm=_vllm_settings(cfg))
    return ChatIngress.bind(intent, reasoner, decision, responder, domain=cfg.domain, session_ttl_s=cfg.session_ttl_s)
