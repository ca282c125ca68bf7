"""The stages' engines: plain classes (no Ray) that the deployments wrap and the benchmarks call directly.

    IntentEngine     message (+ pending question) -> intent distribution, acts, content, answer reading
    ReasonerEngine   message -> finding probabilities and top-k FAQ passages
    ResponderEngine  decision + template + message -> a guarded reply, whole or streamed, on a ResponderBackend

The decision stage's engine is `coact.graphs.policy.policy.Policy`. Each engine is built from its section of
the app config (`actors.config`), the domain and the models folder; its methods take and return a batch.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import torch

from coact.actors.acts import ActClassifier, AnswerReader
from coact.actors.config import IntentConfig, ReasonerConfig, ResponderConfig
from coact.actors.generation import (
    GenerationSettings,
    ResponderBackend,
    build_prompt,
    compose,
    stream_raw,
    stream_reply,
    template_result,
)
from coact.actors.intent_models import load_intent_model
from coact.actors.models import FindingHeads, PassageIndex, TextEncoder, lm_version, models_dir, set_threads
from coact.actors.nlu import reason, understand
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import (
    IntentRequest,
    IntentResult,
    ReasonerResult,
    ResponderChunk,
    ResponderRequest,
    ResponderResult,
    ResponderStats,
)

# Imported by name when chosen: vLLM is an optional dependency.
BACKENDS = {"transformers": "coact.actors.generation:TransformersBackend",
            "vllm": "coact.actors.vllm_backend:VllmBackend", "scripted": "coact.actors.scripted_backend:ScriptedBackend"}


def _root(models: str | Path | None) -> Path:
    return models_dir() if models is None else Path(models)


class IntentEngine:
    """Hot-swappable intent model and act classifier over one base encoder (which reads acts and answers)."""

    def __init__(self, cfg: IntentConfig | None = None, domain: str = "banking",
                 models: str | Path | None = None) -> None:
        cfg = cfg or IntentConfig()
        root = _root(models)
        set_threads(cfg.threads)
        self.pack = load_pack(domain)
        self.quantize = cfg.quantize
        self.model_path = str(cfg.model or root / "intent")
        self.classifier = load_intent_model(self.model_path, quantize=cfg.quantize)
        self.encoder = TextEncoder(quantize=cfg.quantize, max_length=64)
        self.acts = ActClassifier(root / "acts")
        self.answers = AnswerReader.from_pack(self.pack, self.encoder.embed, **self.acts.answer_reader)
        t0 = time.perf_counter()
        self.classify([IntentRequest(message="warm-up")])  # first inference pays torch's lazy set-up
        self.warm_up_ms = round((time.perf_counter() - t0) * 1000, 1)

    def reconfigure(self, config: dict | None) -> None:
        """`{"intent_model": folder}` and / or `{"acts_model": folder}`: swap the model in place."""
        config = config or {}
        # Serve passes the deployment's user_config right after __init__: the folder just loaded is not reloaded.
        if config.get("intent_model") and str(config["intent_model"]) != self.model_path:
            self.classifier = load_intent_model(config["intent_model"], quantize=self.quantize)
            self.model_path = str(config["intent_model"])
        if config.get("acts_model"):
            acts = ActClassifier(config["acts_model"])
            self.answers = AnswerReader.from_pack(self.pack, self.encoder.embed, **acts.answer_reader)
            self.acts = acts

    def classify(self, requests: list[IntentRequest]) -> list[IntentResult]:
        # One set of models per batch, even if reconfigure swaps them meanwhile.
        classifier, acts, answers = self.classifier, self.acts, self.answers
        emb = self.encoder.embed([r.message for r in requests])
        return understand(requests, emb, classifier, acts, answers, self.pack.out_of_scope_label)

    def explain(self, message: str, target: str | None = None, steps: int = 50) -> dict:
        """Token attributions for the intent decision (actors/attributions.py; docs/attributions.md), or
        `{"error", "field"}` for a bad request. The explainer is built on first use and after a hot swap."""
        from coact.actors.attributions import ExplainError, IntentExplainer

        classifier = self.classifier
        explainer = getattr(self, "_explainer", None)
        if explainer is None or explainer.classifier is not classifier:
            explainer = IntentExplainer(classifier, encoder=self.encoder.model, tokenizer=self.encoder.tokenizer,
                                        device=self.encoder.device)
            self._explainer = explainer
        try:
            return explainer.explain(message, target, steps)
        except ExplainError as e:  # returned, not raised: a bad request is not a replica error
            return {"error": str(e), "field": e.field}


class ReasonerEngine:
    """Finding heads and the passage index over one encoder, on a GPU when there is one."""

    def __init__(self, cfg: ReasonerConfig | None = None, models: str | Path | None = None) -> None:
        cfg = cfg or ReasonerConfig()
        root = _root(models)
        set_threads(cfg.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.findings_path = str(cfg.findings_model or root / "findings")
        self.findings = FindingHeads(self.findings_path)
        self.passages = PassageIndex(root / "passages")
        self.encoder = TextEncoder(device=self.device, quantize=cfg.quantize)
        self.top_k = cfg.top_k
        t0 = time.perf_counter()
        self.reason(["warm-up"])  # first inference pays torch's lazy set-up; not the first user
        self.warm_up_ms = round((time.perf_counter() - t0) * 1000, 1)

    def reconfigure(self, config: dict | None) -> None:
        """Retrained finding heads / a rebuilt passage index / another top_k, without a redeploy."""
        config = config or {}
        if config.get("findings_model") and str(config["findings_model"]) != self.findings_path:
            self.findings = FindingHeads(config["findings_model"])
            self.findings_path = str(config["findings_model"])
        if config.get("passages"):
            self.passages = PassageIndex(config["passages"])
        if "top_k" in config:
            self.top_k = int(config["top_k"])

    def reason(self, messages: list[str]) -> list[ReasonerResult]:
        findings, passages = self.findings, self.passages  # stable across a concurrent reconfigure
        # Sends findings.effective_prior as finding_prior (the prior the heads assume), see actors.nlu.reason.
        return reason(self.encoder.embed(messages), findings, passages, self.top_k, self.device)


def load_backend(cfg: ResponderConfig, lm_folder: str) -> ResponderBackend:
    module, name = BACKENDS[cfg.backend].split(":")
    return getattr(importlib.import_module(module), name).from_config(lm_folder, cfg)


class ResponderEngine:
    """The reply: the domain's decided content, and an opener from the LM that the guard lets through or not."""

    def __init__(self, cfg: ResponderConfig | None = None, domain: str = "banking",
                 models: str | Path | None = None) -> None:
        self.cfg = cfg or ResponderConfig()
        lm = str(_root(models) / "lm")
        set_threads(self.cfg.threads)
        self.pack = load_pack(domain)
        self.settings = GenerationSettings(max_new_tokens=self.cfg.max_new_tokens, timeout_s=self.cfg.timeout_s)
        self.backend = load_backend(self.cfg, lm)
        self.version = lm_version(lm) + self.backend.version_suffix
        self.stats = ResponderStats(backend=self.cfg.backend)
        self._warm: asyncio.Future | None = None  # the warm-up generation (start_warm_up), for readiness()

    async def warm_up(self) -> float:
        """One short generation through the backend, as a turn makes it (vLLM: the engine's first request;
        transformers: torch's lazy set-up), so that the first user does not pay for it; its milliseconds."""
        t0 = time.perf_counter()
        prompt = self.backend.tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}], tokenize=False,
                                                            add_generation_prompt=True)
        async with aclosing(self.backend.stream(prompt, self.settings, 1, stop=False, min_new_tokens=1)) as deltas:
            async for _ in deltas:
                pass
        return round((time.perf_counter() - t0) * 1000, 1)

    def _warm_failed(self) -> BaseException | None:
        warm = self._warm
        if warm is None or not warm.done():
            return None
        return asyncio.CancelledError("warm-up cancelled") if warm.cancelled() else warm.exception()

    def start_warm_up(self) -> None:
        """Start the warm-up on the running event loop (once; again after it failed). Without generation
        there is nothing to warm: the templates need no model."""
        if self.cfg.generate and (self._warm is None or self._warm_failed() is not None):
            self._warm = asyncio.ensure_future(self.warm_up())

    def readiness(self) -> dict:
        """`{"ready", "detail"}`: loaded (the constructor returned) and the warm-up generation done."""
        detail = {"backend": self.cfg.backend, "model": self.version, "generate": self.cfg.generate}
        if not self.cfg.generate:
            return {"ready": True, "detail": detail}
        failed = self._warm_failed()
        if self._warm is None or failed is not None:
            self.start_warm_up()  # not started (no loop at construction) or failed: (re)try, report not ready
            why = "warm-up started" if failed is None else f"warm-up failed, retrying: {failed!r}"[:300]
            return {"ready": False, "detail": {**detail, "warm_up": why}}
        if not self._warm.done():
            return {"ready": False, "detail": {**detail, "warm_up": "running"}}
        return {"ready": True, "detail": {**detail, "warm_up_ms": self._warm.result()}}

    def prompt(self, request: ResponderRequest) -> str:
        return build_prompt(self.backend.tokenizer, self.pack, request)

    def cap(self, request: ResponderRequest) -> int:
        """Tokens this request may generate: the config's cap, lowered by the caller's (OpenAI max_tokens)."""
        return min(self.settings.max_new_tokens, request.max_new_tokens or self.settings.max_new_tokens)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.backend.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, requests: list[ResponderRequest]) -> list[tuple[str, int]]:
        """The model's raw text and token count per request, blocking (a batched backend): one batch per
        distinct token cap (almost always one), each decoded greedily as if alone."""
        prompts = [self.prompt(r) for r in requests]
        outs: list[tuple[str, int] | None] = [None] * len(requests)
        for cap in sorted({self.cap(r) for r in requests}):
            idx = [i for i, r in enumerate(requests) if self.cap(r) == cap]
            settings = replace(self.settings, max_new_tokens=cap)
            for i, out in zip(idx, self.backend.generate([prompts[i] for i in idx], settings), strict=True):
                outs[i] = out
        return outs  # type: ignore[return-value]

    def compose(self, request: ResponderRequest, text: str, tokens: int) -> ResponderResult:
        result = compose(request, text, tokens, self.version, self.pack.prompts.reply_prefix, self.cfg.layout)
        result.prompt_tokens = self.prompt_tokens(self.prompt(request))
        return result

    async def respond(self, requests: list[ResponderRequest]) -> list[ResponderResult]:
        """Whole replies: one batch generated off the event loop, or each a collected stream when the
        backend batches on its own. Past the deadline the templates are sent."""
        if not self.cfg.generate:
            return [template_result(r, "generation disabled", self.version) for r in requests]
        if not self.backend.batched:
            return list(await asyncio.gather(*(self._collect(r) for r in requests)))
        try:
            outs = await asyncio.wait_for(asyncio.to_thread(self.generate, requests), self.settings.timeout_s + 5.0)
        except TimeoutError:
            return [template_result(r, "generation timed out", self.version) for r in requests]
        return [self.compose(r, text, n) for r, (text, n) in zip(requests, outs, strict=True)]

    async def _collect(self, request: ResponderRequest) -> ResponderResult:
        result = None
        async for chunk in self.stream(request):
            result = chunk.result or result
        assert result is not None
        return result

    async def stream(self, request: ResponderRequest, raw: bool = False,
                     max_new_tokens: int | None = None) -> AsyncIterator[ResponderChunk]:
        """Guarded `token` / `replace` chunks, then the `result`. `raw` (benchmarks, tests; never the ingress):
        unguarded, no stop at the first sentence, exactly `max_new_tokens` tokens."""
        self.stats.streams_started += 1
        self.stats.streams_active += 1
        try:
            if not self.cfg.generate:
                yield ResponderChunk(kind="token", text=request.template, final=True)
                yield ResponderChunk(kind="result", result=template_result(request, "generation disabled",
                                                                            self.version))
            else:
                prompt = self.prompt(request)
                if raw:
                    n = max_new_tokens or self.settings.max_new_tokens
                    deltas = self.backend.stream(prompt, self.settings, n, stop=False, min_new_tokens=n)
                    chunks = stream_raw(deltas, self.version)
                else:
                    cap = min(max_new_tokens or self.cap(request), self.cap(request))
                    chunks = stream_reply(request, self.backend.stream(prompt, self.settings, cap),
                                          self.version, self.pack.prompts.reply_prefix, self.settings.timeout_s,
                                          self.cfg.layout)
                n_prompt = self.prompt_tokens(prompt)
                async with aclosing(chunks):  # a caller that leaves closes it, which stops generation
                    async for chunk in chunks:
                        if chunk.result is not None:
                            chunk.result.prompt_tokens = n_prompt
                        yield chunk
            self.stats.streams_finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.streams_cancelled += 1  # the caller went away: generation was stopped above
            raise
        finally:
            self.stats.streams_active -= 1

    def get_stats(self) -> ResponderStats:
        return self.stats.model_copy(update={"engine_unfinished_requests": self.backend.unfinished_requests()})

    def shutdown(self) -> None:
        self.backend.shutdown()
