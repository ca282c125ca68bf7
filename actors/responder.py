"""ResponderActor: decision + template content + history -> reply text, checked by the guard.

Two backends behind one deployment: transformers (batched with @serve.batch for whole replies,
one thread per streamed reply) and vLLM (one AsyncLLM engine per replica, continuous batching).
The logic lives in actors/generation.py and actors/vllm_backend.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from coact.actors.generation import (
    STREAM_THREAD,
    GenerationSettings,
    build_prompt,
    compose,
    generate_batch,
    stream_raw,
    stream_reply,
    stream_transformers,
    template_result,
)
from coact.actors.models import lm_version, load_lm, models_dir, set_batching, set_threads
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import ResponderChunk, ResponderRequest, ResponderResult, ResponderStats


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class ResponderActor:
    def __init__(self, models: str | None = None, domain: str = "banking", generate: bool = True,
                 max_new_tokens: int = 24, timeout_s: float = 20.0, threads: int = 1,
                 max_batch_size: int = 8, batch_wait_s: float = 0.02, backend: str = "transformers",
                 vllm: dict | None = None) -> None:
        root = models_dir() if models is None else models
        # One thread per replica by default: several replicas share the cores, and an oversubscribed
        # torch thread pool was measured 4x slower than a single thread here.
        set_threads(threads)
        set_batching(self.respond, max_batch_size, batch_wait_s)
        self.pack = load_pack(domain)
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, timeout_s=timeout_s)
        self.generate = generate
        self.backend = backend
        self.version = lm_version(f"{root}/lm")
        self.stats = ResponderStats(backend=backend)
        if backend == "vllm":
            from coact.actors.vllm_backend import VllmBackend, VllmSettings

            self.engine = VllmBackend(f"{root}/lm", VllmSettings(**(vllm or {})), threads=threads)
            self.tokenizer, self.model = self.engine.tokenizer, None
            self.version = f"{self.version}+vllm"
        else:
            self.engine = None
            self.tokenizer, self.model = load_lm(f"{root}/lm")

    def _generate(self, requests: list[ResponderRequest]) -> list[tuple[str, int]]:
        prompts = [build_prompt(self.tokenizer, self.pack, r) for r in requests]
        return generate_batch(self.tokenizer, self.model, prompts, self.settings)

    def _deltas(self, prompt: str, max_new_tokens: int | None = None, stop: bool = True, min_new_tokens: int = 0):
        if self.engine is not None:
            return self.engine.stream(prompt, self.settings, max_new_tokens, stop, min_new_tokens)
        return stream_transformers(self.tokenizer, self.model, prompt, self.settings, max_new_tokens, stop,
                                   min_new_tokens)

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
        if self.engine is None or not self.generate:
            return await self.respond(request)
        # vLLM batches continuously on its own: a whole reply is the streamed one, collected.
        result = None
        async for chunk in self.stream(request):
            result = chunk.result or result
        assert result is not None
        return result

    async def stream(self, request: ResponderRequest, raw: bool = False,
                     max_new_tokens: int | None = None) -> AsyncIterator[ResponderChunk]:
        """Reached with handle.options(stream=True). `raw` (benchmarks, tests; never the ingress):
        unguarded, no stop at the first sentence, exactly `max_new_tokens` tokens."""
        self.stats.streams_started += 1
        self.stats.streams_active += 1
        try:
            if not self.generate:
                yield ResponderChunk(kind="token", text=request.template)
                yield ResponderChunk(kind="result", result=template_result(request, "generation disabled",
                                                                            self.version))
            else:
                prompt = build_prompt(self.tokenizer, self.pack, request)
                if raw:
                    n = max_new_tokens or self.settings.max_new_tokens
                    chunks = stream_raw(self._deltas(prompt, n, stop=False, min_new_tokens=n), self.version)
                else:
                    chunks = stream_reply(request, self._deltas(prompt, max_new_tokens), self.version,
                                          self.pack.prompts.reply_prefix, self.settings.timeout_s)
                async with aclosing(chunks):  # a caller that leaves closes it, which stops generation
                    async for chunk in chunks:
                        yield chunk
            self.stats.streams_finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.streams_cancelled += 1  # the caller went away: generation was stopped above
            raise
        finally:
            self.stats.streams_active -= 1

    def __del__(self) -> None:
        # Serve calls this when the replica stops: end vLLM's engine-core child process with it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def get_stats(self) -> ResponderStats:
        if self.engine is not None:
            unfinished = self.engine.unfinished_requests()
        else:  # transformers: one generation thread per live stream
            unfinished = sum(t.name == STREAM_THREAD for t in threading.enumerate())
        return self.stats.model_copy(update={"engine_unfinished_requests": unfinished})
