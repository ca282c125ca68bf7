"""IntentActor: message (+ the pending question) -> intent distribution, conversation acts, content, answer.

The intent model folder is hot-swappable: Serve's `user_config` (`{"intent_model": path}`) calls
`reconfigure`, which loads the new folder (frozen-encoder head or fine-tuned classifier) and
swaps it in without redeploying; every result names the model version that produced it. `{"acts_model": path}`
swaps the act classifier the same way. The work is `actors.engines.IntentEngine`'s.
"""

from __future__ import annotations

import asyncio

from ray import serve

from coact.actors.config import IntentConfig
from coact.actors.engines import IntentEngine
from coact.actors.models import set_batching
from coact.graphs.policy.messages import IntentRequest, IntentResult


@serve.deployment  # options (resources, replicas, request limits) from IntentConfig.deployment at bind time
class IntentActor:
    def __init__(self, cfg: IntentConfig | None = None, domain: str = "banking", models: str | None = None) -> None:
        cfg = cfg or IntentConfig()
        set_batching(self.classify, cfg.batching)
        self.engine = IntentEngine(cfg, domain, models)
        self._explaining = asyncio.Lock()

    def reconfigure(self, config: dict) -> None:
        self.engine.reconfigure(config)

    @serve.batch
    async def classify(self, requests: list[IntentRequest]) -> list[IntentResult]:
        # Inference off the event loop so health checks and queueing stay responsive.
        return await asyncio.to_thread(self.engine.classify, requests)

    async def __call__(self, request: IntentRequest) -> IntentResult:
        return await self.classify(request)

    async def ready(self) -> dict:
        """Readiness (GET /readyz): the models loaded and warmed by a classification in the constructor."""
        return {"ready": True, "detail": {"model": self.engine.model_path, "warm_up_ms": self.engine.warm_up_ms}}

    async def explain(self, message: str, target: str | None = None, steps: int = 50) -> dict:
        # Integrated Gradients costs `steps` forward and backward passes (seconds on a CPU), taken from the
        # turns this replica classifies: one explanation at a time, the others are told to retry.
        if self._explaining.locked():
            return {"busy": True}
        async with self._explaining:
            return await asyncio.to_thread(self.engine.explain, message, target, steps)
