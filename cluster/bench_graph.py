"""Per-turn latency and throughput: the Serve graph against the same four models in one process.

    python -m coact.cluster.bench_graph [--concurrency 1 8 32] [--requests 32] [--max-new-tokens 20] [--json out.json]
    python -m coact.cluster.bench_graph --quick        # concurrency 1 4, 4 turns of 8 tokens (tests)

Both sides run the same turn function (graphs.pipeline.run_turn) on the same messages. The
in-process side calls the four stages one after another, blocking, with no batching; the graph
side is the real Serve application over HTTP (batching in Reasoner and Responder, Intent and
Reasoner concurrent). Printed: p50/p99 latency and turns/s per concurrency, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from coact.cluster.local import quiet_env


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def messages(n: int) -> list[str]:
    from coact.cluster.datasets import load_banking77

    rows = load_banking77("test")
    step = max(1, len(rows) // n)
    return [rows[i * step][0] for i in range(n)]


async def _drive(turn, msgs: list[str], concurrency: int) -> tuple[list[float], float]:
    """Send msgs with at most `concurrency` turns in flight; return per-turn ms and wall seconds."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(m: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            await turn(m)
            lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in msgs))
    return lat, time.perf_counter() - t0


def in_process_turn(models: Path, max_new_tokens: int):
    """The four stages as plain objects in this process, called one after another."""
    from coact.actors.decision import DecisionActor
    from coact.actors.generation import compose
    from coact.actors.intent import IntentActor
    from coact.actors.reasoner import ReasonerActor
    from coact.actors.responder import ResponderActor
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.serving.http import ChatRequest
    from coact.graphs.serving.pipeline import Stages, run_turn

    intent = IntentActor.func_or_class(models=str(models))
    reasoner = ReasonerActor.func_or_class(models=str(models))
    decision = DecisionActor.func_or_class()
    responder = ResponderActor.func_or_class(models=str(models), max_new_tokens=max_new_tokens)
    store: dict[str, dict] = {}

    async def respond(req):
        (text, n), = responder._generate([req])
        return compose(req, text, n, responder.version, responder.pack.prompts.reply_prefix)

    async def intent_one(request):  # an IntentRequest (the message and the pending question), as the ingress sends
        return intent._classify([request])[0]

    async def reason_one(m):
        return reasoner._reason([m])[0]

    async def decide(r):
        return decision.policy.decide(r.evidence)

    async def load(sid):
        return store.get(sid)

    async def save(sid, state):
        store[sid] = state

    stages = Stages(intent=intent_one, reason=reason_one, decide=decide, respond=respond, load=load, save=save)
    pack = load_pack("banking")

    async def turn(m: str):
        return await run_turn(stages, pack, ChatRequest(message=m))

    return turn


def graph_turn(url: str, client: httpx.AsyncClient):
    async def turn(m: str):
        r = await client.post(f"{url}/v1/chat", json={"message": m})
        r.raise_for_status()
        return r.json()

    return turn


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="turns per concurrency level and side")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--quick", action="store_true", help="concurrency 1 4, 4 turns of 8 new tokens")
    ap.add_argument("--json", default=None, help="write the table (and machine facts) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.max_new_tokens = [1, 4], 4, 8

    from coact.cluster.prepare import ensure_models

    models = ensure_models()
    msgs = messages(args.requests)
    results: dict[tuple[str, int], tuple[float, float, float]] = {}

    turn = in_process_turn(models, args.max_new_tokens)
    asyncio.run(turn(msgs[0]))  # warm-up
    for c in args.concurrency:
        lat, wall = asyncio.run(_drive(turn, msgs, c))
        results[("in-process", c)] = (statistics.median(lat), _percentile(lat, 0.99), len(msgs) / wall)
        print(f"in-process  c={c:<3} p50={results[('in-process', c)][0]:8.0f} ms  "
              f"p99={results[('in-process', c)][1]:8.0f} ms  {results[('in-process', c)][2]:6.2f} turns/s", flush=True)
    del turn

    from ray import serve

    from coact.cluster.experiments.sweep import start_ray, stop_ray
    from coact.cluster.local import deploy

    started, tmp = start_ray(4)  # a private local Ray (or the job's cluster under `ray job submit`)
    try:
        url = deploy({"models": str(models), "max_new_tokens": args.max_new_tokens}, port=args.port)

        async def run_graph(c: int):
            async with httpx.AsyncClient(timeout=600) as client:
                turn = graph_turn(url, client)
                await turn(msgs[0])
                return await _drive(turn, msgs, c)

        for c in args.concurrency:
            lat, wall = asyncio.run(run_graph(c))
            results[("serve", c)] = (statistics.median(lat), _percentile(lat, 0.99), len(msgs) / wall)
            print(f"serve graph c={c:<3} p50={results[('serve', c)][0]:8.0f} ms  "
                  f"p99={results[('serve', c)][1]:8.0f} ms  {results[('serve', c)][2]:6.2f} turns/s", flush=True)
    finally:
        serve.delete("coact")
        stop_ray(started, tmp)

    print("\nconcurrency | in-process p50/p99 ms | serve p50/p99 ms | in-proc turns/s | serve turns/s | "
          "throughput ratio serve/in-process | p50 ratio serve/in-process")
    for c in args.concurrency:
        a, b = results[("in-process", c)], results[("serve", c)]
        print(f"{c:>11} | {a[0]:>9.0f} / {a[1]:<9.0f} | {b[0]:>6.0f} / {b[1]:<7.0f} | {a[2]:>15.2f} | {b[2]:>13.2f} | "
              f"{b[2] / a[2]:>33.2f} | {b[0] / a[0]:>26.2f}")
    if args.json:
        from coact.cluster.experiments.machine import facts

        rows = [{"concurrency": c, "side": side, "p50_ms": v[0], "p99_ms": v[1], "turns_per_s": v[2]}
                for (side, c), v in results.items()]
        ratios = {c: {"throughput_ratio": results[("serve", c)][2] / results[("in-process", c)][2],
                      "p50_ratio": results[("serve", c)][0] / results[("in-process", c)][0]} for c in args.concurrency}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"facts": facts(), "args": vars(args), "rows": rows, "ratios": ratios},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
