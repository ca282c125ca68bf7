"""ResponderActor: decision + template content + history -> reply text, checked by the guard.

The work is `actors.engines.ResponderEngine`'s, on one `ResponderBackend` (actors/generation.py): transformers
(whole replies batched with @serve.batch, one thread per streamed reply) or vLLM (actors/vllm_backend.py: one
AsyncLLM engine per replica batching continuously, so whole replies skip @serve.batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from coact.actors.config import ResponderConfig
from coact.actors.engines import ResponderEngine
from coact.actors.models import set_batching
from coact.graphs.policy.messages import ResponderChunk, ResponderRequest, ResponderResult, ResponderStats


@serve.deployment  # options from ResponderConfig.deployment at bind time
class ResponderActor:
    def __init__(self, cfg: ResponderConfig | None = None, domain: str = "banking", models: str | None = None) -> None:
        cfg = cfg or ResponderConfig()
        set_batching(self.respond, cfg.batching)
        self.engine = ResponderEngine(cfg, domain, models)
        try:
            asyncio.get_running_loop()  # Serve runs the constructor on the replica's event loop
        except RuntimeError:
            pass  # constructed elsewhere: the first ready() starts the warm-up
        else:
            self.engine.start_warm_up()  # one short generation in the background; ready() reports it

    @serve.batch
    async def respond(self, requests: list[ResponderRequest]) -> list[ResponderResult]:
        return await self.engine.respond(requests)  # generation runs off the event loop, under a deadline

    async def __call__(self, request: ResponderRequest) -> ResponderResult:
        if self.engine.backend.batched:
            return await self.respond(request)
        return (await self.engine.respond([request]))[0]

    async def stream(self, request: ResponderRequest, raw: bool = False,
                     max_new_tokens: int | None = None) -> AsyncIterator[ResponderChunk]:
        """Reached with handle.options(stream=True); see ResponderEngine.stream."""
        async with aclosing(self.engine.stream(request, raw, max_new_tokens)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def ready(self) -> dict:
        """Readiness (GET /readyz): the LM loaded and its warm-up generation done (templates only: loaded)."""
        return self.engine.readiness()

    async def get_stats(self) -> ResponderStats:
        return self.engine.get_stats()

    def __del__(self) -> None:
        # Serve calls this when the replica stops: end vLLM's engine-core child process with it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
