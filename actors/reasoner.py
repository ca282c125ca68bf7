"""ReasonerActor: message -> finding probabilities y = sigmoid(f(x)) and top-k knowledge passages.

Batched across concurrent requests with @serve.batch; runs on a GPU when the replica has one.
"""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from coact.actors.models import FindingHeads, PassageIndex, TextEncoder, models_dir, set_batching, set_threads
from coact.actors.nlu import reason
from coact.graphs.policy.messages import ReasonerResult


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ReasonerActor:
    def __init__(self, models: str | None = None, top_k: int = 3, quantize: bool = False,
                 max_batch_size: int = 32, batch_wait_s: float = 0.01, threads: int | None = None) -> None:
        root = models_dir() if models is None else models
        set_threads(threads)
        set_batching(self.reason, max_batch_size, batch_wait_s)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.findings = FindingHeads(f"{root}/findings")
        self.passages = PassageIndex(f"{root}/passages")
        self.encoder = TextEncoder(device=self.device, quantize=quantize)
        self.top_k = top_k
        self._reason(["warm-up"])  # first inference pays torch's lazy set-up; not the first user

    def reconfigure(self, config: dict) -> None:
        # Hot-swap retrained finding heads / a rebuilt passage index without a redeploy.
        config = config or {}
        if config.get("findings_model"):
            self.findings = FindingHeads(config["findings_model"])
        if config.get("passages"):
            self.passages = PassageIndex(config["passages"])
        if "top_k" in config:
            self.top_k = int(config["top_k"])

    def _reason(self, messages: list[str]) -> list[ReasonerResult]:
        findings, passages = self.findings, self.passages  # stable across a concurrent reconfigure
        # Sends findings.effective_prior as finding_prior (the prior the heads assume), see actors.nlu.reason.
        return reason(self.encoder.embed(messages), findings, passages, self.top_k, self.device)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def reason(self, messages: list[str]) -> list[ReasonerResult]:
        return await asyncio.to_thread(self._reason, messages)

    async def __call__(self, message: str) -> ReasonerResult:
        return await self.reason(message)
