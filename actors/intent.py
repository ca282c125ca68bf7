"""IntentActor: message -> calibrated intent distribution, control intent, out-of-scope flag."""

from __future__ import annotations

import asyncio

from ray import serve

from actors.models import IntentClassifier, TextEncoder, models_dir
from actors.nlu import ControlDetector, intent_results
from actors.schemas import IntentResult
from graphs.domain import load_pack


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class IntentActor:
    def __init__(self, models: str | None = None, domain: str = "banking", quantize: bool = False) -> None:
        root = models_dir() if models is None else models
        self.pack = load_pack(domain)
        self.classifier = IntentClassifier(f"{root}/intent")
        self.encoder = TextEncoder(quantize=quantize, max_length=self.classifier.encoder_max_length)
        texts, labels = ControlDetector.examples(self.pack)
        self.control = ControlDetector(self.pack, self.encoder.embed(texts), labels)

    def _classify(self, messages: list[str]) -> list[IntentResult]:
        emb = self.encoder.embed(messages)
        probs = self.classifier.predict_proba(emb)
        return intent_results(messages, emb, probs, self.classifier.labels, self.classifier.priors,
                              self.control, self.pack.out_of_scope_label, self.classifier.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, messages: list[str]) -> list[IntentResult]:
        # Inference off the event loop so health checks and queueing stay responsive.
        return await asyncio.to_thread(self._classify, messages)

    async def __call__(self, message: str) -> IntentResult:
        return await self.classify(message)
