"""Per-turn latency and throughput: the Serve graph against the same four models in one process.

    python -m coact.cluster.experiments.bench_graph [--concurrency 1 8 32] [--requests 32] [--max-new-tokens 20] [--json out.json]
    python -m coact.cluster.experiments.bench_graph --quick        # concurrency 1 4, 4 turns of 8 tokens (tests)

Both sides run the same turn function (graphs.pipeline.run_turn) on the same messages. The
in-process side calls the four stages one after another, blocking, with no batching; the graph
side is the real Serve application over HTTP (batching in Reasoner and Responder, Intent and
Reasoner concurrent). Printed: p50/p99 latency and turns/s per concurrency, and the ratios.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import httpx

from coact.cluster.experiments.harness import (
    DRY_RUN_ACTIONS,
    bench_parser,
    drive,
    graph_turn,
    messages,
    percentile,
    start_ray,
    stop_ray,
    write_result,
)
from coact.cluster.runtime import deploy, quiet_env


def in_process_turn(models: Path, max_new_tokens: int):
    """The four stages as plain objects in this process, called one after another."""
    from coact.actors.config import ResponderConfig
    from coact.actors.engines import IntentEngine, ReasonerEngine, ResponderEngine
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.policy import Policy
    from coact.graphs.serving.http import ChatRequest
    from coact.graphs.serving.pipeline import Stages, run_turn

    intent = IntentEngine(models=models)
    reasoner = ReasonerEngine(models=models)
    decision = Policy(load_pack("banking"))
    responder = ResponderEngine(ResponderConfig(max_new_tokens=max_new_tokens), models=models)
    store: dict[str, tuple[int, dict]] = {}

    async def respond(req):
        (text, n), = responder.generate([req])
        return responder.compose(req, text, n)

    async def intent_one(request):  # an IntentRequest (the message and the pending question), as the ingress sends
        return intent.classify([request])[0]

    async def reason_one(m):
        return reasoner.reason([m])[0]

    async def decide(r):
        return decision.decide(r.evidence)

    async def load(sid):
        return store.get(sid)

    async def save(sid, state, version):
        store[sid] = (version + 1, state)
        return version + 1

    stages = Stages(intent=intent_one, reason=reason_one, decide=decide, respond=respond, load=load, save=save)
    pack = load_pack("banking")

    async def turn(m: str):
        return await run_turn(stages, pack, ChatRequest(message=m))

    return turn


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    ap = bench_parser(__doc__, "concurrency 1 4, 4 turns of 8 new tokens", concurrency=(1, 8, 32))
    ap.add_argument("--requests", type=int, default=32, help="turns per concurrency level and side")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--port", type=int, default=8011)
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
        lat, wall = asyncio.run(drive(turn, msgs, c))
        results[("in-process", c)] = (statistics.median(lat), percentile(lat, 99, "nearest"), len(msgs) / wall)
        print(f"in-process  c={c:<3} p50={results[('in-process', c)][0]:8.0f} ms  "
              f"p99={results[('in-process', c)][1]:8.0f} ms  {results[('in-process', c)][2]:6.2f} turns/s", flush=True)
    del turn

    from ray import serve

    started, tmp = start_ray(4)  # a private local Ray (or the job's cluster under `ray job submit`)
    try:
        url = deploy({"models": str(models), "responder": {"max_new_tokens": args.max_new_tokens}, **DRY_RUN_ACTIONS},
                     port=args.port)

        async def run_graph(c: int):
            async with httpx.AsyncClient(timeout=600) as client:
                turn = graph_turn(url, client)
                await turn(msgs[0])
                return await drive(turn, msgs, c)

        for c in args.concurrency:
            lat, wall = asyncio.run(run_graph(c))
            results[("serve", c)] = (statistics.median(lat), percentile(lat, 99, "nearest"), len(msgs) / wall)
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
    rows = [{"concurrency": c, "side": side, "p50_ms": v[0], "p99_ms": v[1], "turns_per_s": v[2]}
            for (side, c), v in results.items()]
    ratios = {c: {"throughput_ratio": results[("serve", c)][2] / results[("in-process", c)][2],
                  "p50_ratio": results[("serve", c)][0] / results[("in-process", c)][0]} for c in args.concurrency}
    write_result(args.json, args=vars(args), rows=rows, ratios=ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
