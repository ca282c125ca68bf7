"""DecisionActor: accumulated evidence -> exact posterior, expected utilities, VOI, chosen action.

The engine is the policy core's `Policy` (graphs/policy/policy.py).
"""

from __future__ import annotations

from ray import serve

from coact.actors.config import DecisionConfig
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import DecisionRequest, DecisionResult, SessionEvidence
from coact.graphs.policy.policy import Policy


@serve.deployment  # options from DecisionConfig.deployment at bind time
class DecisionActor:
    def __init__(self, cfg: DecisionConfig | None = None, domain: str = "banking") -> None:
        cfg = cfg or DecisionConfig()
        self.policy = Policy(load_pack(domain), cfg.weights)
        self.policy.decide(SessionEvidence())  # builds the cached elimination plans

    def reconfigure(self, config: dict) -> None:
        # Utility weights are policy parameters (tuned offline); swap them without a redeploy.
        weights = (config or {}).get("weights")
        if weights:
            self.policy = Policy(self.policy.pack, weights)

    async def __call__(self, request: DecisionRequest) -> DecisionResult:
        return self.policy.decide(request.evidence)

    async def ready(self) -> dict:
        """Readiness (GET /readyz): the network built and its elimination plans cached in the constructor."""
        return {"ready": True, "detail": {"domain": f"{self.policy.pack.name}@{self.policy.pack.version}"}}
