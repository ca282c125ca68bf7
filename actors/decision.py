"""DecisionActor: accumulated evidence -> exact posterior, expected utilities, VOI, chosen action."""

from __future__ import annotations

from ray import serve

from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import DecisionRequest, DecisionResult, SessionEvidence
from coact.graphs.policy.policy import Policy


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class DecisionActor:
    def __init__(self, domain: str = "banking", weights: dict[str, float] | None = None) -> None:
        self.policy = Policy(load_pack(domain), weights)
        self.policy.decide(SessionEvidence())  # builds the cached elimination plans

    def reconfigure(self, config: dict) -> None:
        # Utility weights are policy parameters (tuned offline); swap them without a redeploy.
        weights = (config or {}).get("weights")
        if weights:
            self.policy = Policy(self.policy.pack, weights)

    async def __call__(self, request: DecisionRequest) -> DecisionResult:
        return self.policy.decide(request.evidence)
