"""Precision and threads: encoder and LM in fp32 vs int8 / bf16, and intra-op threads, side by side in one run.

    python -m coact.cluster.experiments.bench_precision [--texts 300] [--prompts 8] [--json results/bench/precision.json]
    python -m coact.cluster.experiments.bench_precision --quick

In this process (no Ray): the MiniLM encoder (+ the intent head) on a seeded BANKING77 test subset —
accuracy, argmax agreement with fp32, ms per sentence alone and per batch of 32 — and SmolLM2 greedy
generation on real responder prompts — text identical to fp32's, tokens/s for the batch — each at 1
and 2 torch threads. A variant "holds" when the intent accuracy drops by at most 0.5 point (encoder)
or when every prompt's greedy text equals fp32's (LM).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import numpy as np

from coact.cluster.experiments.harness import bench_parser, write_result


def _timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def encoder_variants(models: Path, texts: list[str], labels: list[str], threads: list[int], repeats: int) -> list[dict]:
    import torch

    from coact.actors.models import IntentClassifier, TextEncoder

    head = IntentClassifier(models / "intent")
    rows, reference = [], None
    for name in ("fp32", "int8", "bf16"):
        enc = TextEncoder(quantize=name == "int8", max_length=64)
        if name == "bf16":
            enc.model = enc.model.to(torch.bfloat16)
        torch.set_num_threads(max(threads))
        pred = np.asarray(head.predict(enc.embed(texts)))
        reference = pred if reference is None else reference
        acc = float(np.mean(pred == np.asarray(labels)))
        for t in threads:
            torch.set_num_threads(t)
            one = _timed(lambda e=enc: [e.embed([x]) for x in texts[:8]], repeats) / 8
            batch = _timed(lambda e=enc: e.embed(texts[:32]), repeats)
            rows.append({"model": "MiniLM encoder + intent head", "variant": name, "threads": t, "accuracy": acc,
                         "agreement_with_fp32": float(np.mean(pred == reference)), "ms_per_sentence": one,
                         "ms_per_batch_32": batch})
    return rows


def lm_variants(models: Path, prompts: list[str], max_new_tokens: int, threads: list[int]) -> list[dict]:
    import torch

    from coact.actors.generation import GenerationSettings, generate_batch
    from coact.actors.models import load_lm

    settings = GenerationSettings(max_new_tokens=max_new_tokens, timeout_s=600)
    rows, reference = [], None
    for name in ("fp32", "int8", "bf16"):
        tok, model = load_lm(models / "lm")
        if name == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        elif name == "bf16":
            model = model.to(torch.bfloat16)
        for t in threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            outs = generate_batch(tok, model, prompts, settings)
            wall = time.perf_counter() - t0
            texts = [o[0] for o in outs]
            reference = texts if reference is None else reference
            rows.append({"model": "SmolLM2-135M", "variant": name, "threads": t, "prompts": len(prompts),
                         "identical_to_fp32": float(np.mean([a == b for a, b in zip(texts, reference, strict=True)])),
                         "tokens_per_s": sum(o[1] for o in outs) / wall, "wall_s": wall, "sample": texts[0][:80]})
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "40 texts, 2 prompts x 6 tokens, 1 thread")
    ap.add_argument("--texts", type=int, default=300, help="BANKING77 test texts for the encoder accuracy")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.texts, args.prompts, args.max_new_tokens, args.threads, args.repeats = 40, 2, 6, [1], 1

    from coact.cluster.datasets import load_banking77
    from coact.cluster.experiments.bench_batching import responder_requests
    from coact.cluster.prepare import ensure_models
    from coact.cluster.runtime import quiet_env

    quiet_env()
    models = ensure_models()
    rows = load_banking77("test")
    sample = random.Random(0).sample(rows, args.texts)
    texts, labels = [t for t, _ in sample], [y for _, y in sample]
    enc = encoder_variants(models, texts, labels, args.threads, args.repeats)

    from coact.actors.generation import build_prompt
    from coact.actors.models import load_lm
    from coact.graphs.policy.domain import load_pack

    tok, _ = load_lm(models / "lm")
    pack = load_pack("banking")
    prompts = [build_prompt(tok, pack, r) for r in responder_requests(texts[: args.prompts])]
    lm = lm_variants(models, prompts, args.max_new_tokens, args.threads)

    write_result(args.json, args=vars(args), encoder=enc, lm=lm)
    print(f"encoder: {args.texts} BANKING77 test texts; ms per sentence alone and per batch of 32 (medians)")
    base = {r["threads"]: r for r in enc if r["variant"] == "fp32"}
    for r in enc:
        holds = base[r["threads"]]["accuracy"] - r["accuracy"] <= 0.005
        print(f"  {r['variant']:<5} threads {r['threads']}  accuracy {r['accuracy']:.3f}  agreement {r['agreement_with_fp32']:.3f}"
              f"  {r['ms_per_sentence']:7.1f} ms/sentence ({base[r['threads']]['ms_per_sentence'] / r['ms_per_sentence']:.2f}x)"
              f"  {r['ms_per_batch_32']:7.1f} ms/batch32 ({base[r['threads']]['ms_per_batch_32'] / r['ms_per_batch_32']:.2f}x)"
              f"  {'holds' if holds else 'accuracy drops'}")
    print(f"LM: {args.prompts} responder prompts x {args.max_new_tokens} new tokens, greedy, one batch")
    lbase = {r["threads"]: r for r in lm if r["variant"] == "fp32"}
    for r in lm:
        print(f"  {r['variant']:<5} threads {r['threads']}  identical to fp32 {r['identical_to_fp32']:.2f}  "
              f"{r['tokens_per_s']:6.1f} tok/s ({r['tokens_per_s'] / lbase[r['threads']]['tokens_per_s']:.2f}x)"
              f"  {'holds' if r['identical_to_fp32'] == 1.0 else 'text changes'}  e.g. {r['sample']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
