"""The Serve application: the one place where the four stages and the ingress are composed.

`serve run coact.graphs.serving.app:build_app`, `serve run cluster/serve/local.yaml` and `coact serve` all
build the graph here. Every deployment's options come from its section of `AppConfig` (`.options(...)` at
bind time): the decorators carry none, so the config is the one source of resources, limits and scaling.
"""

from __future__ import annotations

from ray.serve import Application

from coact.actors.actions import ActionActor
from coact.actors.decision import DecisionActor
from coact.actors.intent import IntentActor
from coact.actors.reasoner import ReasonerActor
from coact.actors.responder import ResponderActor
from coact.graphs.serving.http import AppConfig
from coact.graphs.serving.ingress import ChatIngress


def build_app(args: dict | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    # user_config reaches `reconfigure`: a new model folder is picked up without redeploying.
    intent = IntentActor.options(**cfg.intent.deployment.serve_options(),
                                 user_config={"intent_model": cfg.intent.model}).bind(cfg.intent, cfg.domain, cfg.models)
    reasoner = ReasonerActor.options(**cfg.reasoner.deployment.serve_options(),
                                     user_config={"findings_model": cfg.reasoner.findings_model}).bind(cfg.reasoner,
                                                                                                     cfg.models)
    decision = DecisionActor.options(**cfg.decision.deployment.serve_options()).bind(cfg.decision, cfg.domain)
    responder = ResponderActor.options(**cfg.responder.deployment.serve_options()).bind(cfg.responder, cfg.domain,
                                                                                         cfg.models)
    actions = (ActionActor.options(**cfg.actions.deployment.serve_options()).bind(cfg.actions, cfg.domain)
               if cfg.actions.enabled else None)
    return ChatIngress.options(**cfg.ingress.deployment.serve_options()).bind(
        intent, reasoner, decision, responder, actions, domain=cfg.domain, sessions=cfg.sessions,
        turn_timeout_s=cfg.ingress.turn_timeout_s, audit_log=cfg.actions.audit_log,
        auth=cfg.ingress.auth)
