"""ResponderActor: decision + template content + history -> reply text, checked by the guard."""

from __future__ import annotations

import asyncio

from ray import serve

from actors.generation import GenerationSettings, build_prompt, compose, generate_batch, template_result
from actors.models import lm_version, load_lm, models_dir, set_batching, set_threads
from actors.schemas import ResponderRequest, ResponderResult
from graphs.domain import load_pack


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class ResponderActor:
    def __init__(self, models: str | None = None, domain: str = "banking", generate: bool = True,
                 max_new_tokens: int = 24, timeout_s: float = 20.0, threads: int = 1,
                 max_batch_size: int = 8, batch_wait_s: float = 0.02) -> None:
        root = models_dir() if models is None else models
        # One thread per replica by default: several replicas share the cores, and an oversubscribed
        # torch thread pool was measured 4x slower than a single thread here.
        set_threads(threads)
        set_batching(self.respond, max_batch_size, batch_wait_s)
        self.pack = load_pack(domain)
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, timeout_s=timeout_s)
        self.generate = generate
        self.tokenizer, self.model = load_lm(f"{root}/lm")
        self.version = lm_version(f"{root}/lm")

    def _generate(self, requests: list[ResponderRequest]) -> list[tuple[str, int]]:
        prompts = [build_prompt(self.tokenizer, self.pack, r) for r in requests]
        return generate_batch(self.tokenizer, self.model, prompts, self.settings)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def respond(self, requests: list[ResponderRequest]) -> list[ResponderResult]:
        if not self.generate:
            return [template_result(r, "generation disabled", self.version) for r in requests]
        try:
            outs = await asyncio.wait_for(asyncio.to_thread(self._generate, requests), self.settings.timeout_s + 5.0)
        except TimeoutError:
            return [template_result(r, "generation timed out", self.version) for r in requests]
        return [compose(r, text, n, self.version, self.pack.prompts.reply_prefix) for r, (text, n) in zip(requests, outs, strict=True)]

    async def __call__(self, request: ResponderRequest) -> ResponderResult:
        return await self.respond(request)
