"""IntentActor: message (+ the pending question) -> intent distribution, conversation acts, content, answer.

The intent model folder is hot-swappable: Serve's `user_config` (`{"intent_model": path}`) calls
`reconfigure`, which loads the new folder (frozen-encoder head or fine-tuned classifier) and
swaps it in without redeploying; every result names the model version that produced it. `{"acts_model": path}`
swaps the act classifier the same way.
"""

from __future__ import annotations

import asyncio

from ray import serve

from coact.actors.acts import ActClassifier, AnswerReader
from coact.actors.intent_models import load_intent_model
from coact.actors.models import TextEncoder, models_dir, set_batching, set_threads
from coact.actors.nlu import understand
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import IntentRequest, IntentResult


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
        # The base encoder serves the acts and the answer reading whatever intent model is loaded.
        self.encoder = TextEncoder(quantize=quantize, max_length=64)
        self.acts = ActClassifier(f"{root}/acts")
        self.answers = AnswerReader.from_pack(self.pack, self.encoder.embed, **self.acts.answer_reader)
        self._classify([IntentRequest(message="warm-up")])  # first inference pays torch's lazy set-up

    def reconfigure(self, config: dict) -> None:
        config = config or {}
        if config.get("intent_model"):
            self.classifier = load_intent_model(config["intent_model"], quantize=self.quantize)
        if config.get("acts_model"):
            acts = ActClassifier(config["acts_model"])
            self.answers = AnswerReader.from_pack(self.pack, self.encoder.embed, **acts.answer_reader)
            self.acts = acts

    def _classify(self, requests: list[IntentRequest]) -> list[IntentResult]:
        # One set of models per batch, even if reconfigure swaps them meanwhile.
        classifier, acts, answers = self.classifier, self.acts, self.answers
        emb = self.encoder.embed([r.message for r in requests])
        return understand(requests, emb, classifier, acts, answers, self.pack.out_of_scope_label)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, requests: list[IntentRequest]) -> list[IntentResult]:
        # Inference off the event loop so health checks and queueing stay responsive.
        return await asyncio.to_thread(self._classify, requests)

    async def __call__(self, request: IntentRequest) -> IntentResult:
        return await self.classify(request)
