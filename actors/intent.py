"""IntentActor: message -> calibrated intent distribution, control intent, out-of-scope flag.

The intent model folder is hot-swappable: Serve's `user_config` (`{"intent_model": path}`) calls
`reconfigure`, which loads the new folder (frozen-encoder head or fine-tuned classifier) and
swaps it in without redeploying; every result names the model version that produced it.
"""

from __future__ import annotations

import asyncio

from ray import serve

from actors.intent_models import load_intent_model
from actors.models import TextEncoder, models_dir, set_batching, set_threads
from actors.nlu import ControlDetector, intent_results
from actors.schemas import IntentResult
from graphs.domain import load_pack


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class IntentActor:
    def __init__(self, models: str | None = None, domain: str = "banking", quantize: bool = False,
                 max_batch_size: int = 16, batch_wait_s: float = 0.005, threads: int | None = None) -> None:
        root = models_dir() if models is None else models
        set_threads(threads)
        set_batching(self.classify, max_batch_size, batch_wait_s)
        self.pack = load_pack(domain)
        self.quantize = quantize
        self.classifier = load_intent_model(f"{root}/intent", quantize=quantize)
        # The base encoder serves control-intent detection whatever intent model is loaded.
        self.encoder = TextEncoder(quantize=quantize, max_length=64)
        texts, labels = ControlDetector.examples(self.pack)
        self.control = ControlDetector(self.pack, self.encoder.embed(texts), labels)
        self._classify(["warm-up"])  # first inference pays torch's lazy set-up; not the first user

    def reconfigure(self, config: dict) -> None:
        path = (config or {}).get("intent_model")
        if path:
            self.classifier = load_intent_model(path, quantize=self.quantize)

    def _classify(self, messages: list[str]) -> list[IntentResult]:
        classifier = self.classifier  # one model per batch, even if reconfigure swaps it meanwhile
        emb = self.encoder.embed(messages)
        probs = classifier.predict_proba_texts(messages, emb)
        return intent_results(messages, emb, probs, classifier.labels, classifier.priors,
                              self.control, self.pack.out_of_scope_label, classifier.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, messages: list[str]) -> list[IntentResult]:
        # Inference off the event loop so health checks and queueing stay responsive.
        return await asyncio.to_thread(self._classify, messages)

    async def __call__(self, message: str) -> IntentResult:
        return await self.classify(message)
