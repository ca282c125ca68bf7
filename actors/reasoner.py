"""ReasonerActor: message -> finding probabilities y = sigmoid(f(x)) and top-k knowledge passages.

Batched across concurrent requests with @serve.batch; runs on a GPU when the replica has one. The work is
`actors.engines.ReasonerEngine`'s.
"""

from __future__ import annotations

import asyncio

from ray import serve

from coact.actors.config import ReasonerConfig
from coact.actors.engines import ReasonerEngine
from coact.actors.models import set_batching
from coact.graphs.policy.messages import ReasonerResult


@serve.deployment  # options from ReasonerConfig.deployment at bind time
class ReasonerActor:
    def __init__(self, cfg: ReasonerConfig | None = None, models: str | None = None) -> None:
        cfg = cfg or ReasonerConfig()
        set_batching(self.reason, cfg.batching)
        self.engine = ReasonerEngine(cfg, models)

    def reconfigure(self, config: dict) -> None:
        # Hot-swap retrained finding heads / a rebuilt passage index without a redeploy.
        self.engine.reconfigure(config)

    @serve.batch
    async def reason(self, messages: list[str]) -> list[ReasonerResult]:
        return await asyncio.to_thread(self.engine.reason, messages)

    async def __call__(self, message: str) -> ReasonerResult:
        return await self.reason(message)

    async def ready(self) -> dict:
        """Readiness (GET /readyz): heads, index and encoder loaded and warmed in the constructor."""
        return {"ready": True, "detail": {"findings": self.engine.findings_path, "device": self.engine.device,
                                          "warm_up_ms": self.engine.warm_up_ms}}
