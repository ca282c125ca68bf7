"""Dynamic batching: ReasonerActor and ResponderActor throughput at concurrency 32, batching on vs off.

    python -m coact.cluster.experiments.bench_batching [--json results/bench/batching.json]
    python -m coact.cluster.experiments.bench_batching --quick

Each deployment runs alone (one replica, the app's resources, the same torch threads either way; the
generation timeout raised so that no reply falls back to the template) and is called through its Serve
handle by 32 concurrent callers; batching "off" is max_batch_size 1. Both settings are deployed in the same run and measured back to back, in the order on, off, off, on, so that
a drift in the machine's background load hits both equally. The actors are subclassed only to time each
model call (bench_overhead's timers), which gives the batch sizes formed and the replica's busy time:
- wall throughput: requests / wall-clock seconds, as the callers see it;
- busy throughput: requests / seconds during which the replica ran at least one model call (unbatched
  calls run concurrently in threads, so their busy intervals are merged, not summed).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from ray import serve

from coact.actors.config import ReasonerConfig, ResponderConfig
from coact.cluster.experiments.bench_overhead import TimedReasoner, TimedResponder
from coact.cluster.experiments.harness import bench_parser, start_ray, stop_ray, write_result

# "on": the stage's default batching (actors/config.py), "off": one request per call.
_OFF = {"batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}
SETTINGS = {
    "reasoner": {"on": {"batching": ReasonerConfig().batching.model_dump()}, "off": _OFF},
    "responder": {"on": {"batching": ResponderConfig().batching.model_dump()}, "off": _OFF},
}


def responder_requests(messages: list[str]) -> list:
    """Real ResponderRequests: the policy's decision on a typical first turn, and the domain's template."""
    from coact.graphs.policy.dialogue import reply_template
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import ResponderRequest, SessionEvidence
    from coact.graphs.policy.policy import Policy

    pack = load_pack("banking")
    decision = Policy(pack).decide(SessionEvidence())
    template, forbidden = reply_template(pack, decision)
    return [ResponderRequest(message=m, decision=decision, template=template, forbidden=forbidden) for m in messages]


async def _fire(handle, payloads: list, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(p) -> None:
        async with sem:
            await handle.remote(p)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in payloads))
    return time.perf_counter() - t0


def deploy(stage: str, setting: dict, models: str, max_new_tokens: int, threads: int):
    name = f"bench-{stage}"
    if stage == "reasoner":
        cfg = ReasonerConfig.model_validate({"threads": threads, **setting})
        app = serve.deployment(TimedReasoner, name="ReasonerActor", ray_actor_options={"num_cpus": 0.25},
                               max_ongoing_requests=64).bind(cfg=cfg, models=models)
    else:
        cfg = ResponderConfig.model_validate({"max_new_tokens": max_new_tokens, "threads": threads,
                                              "timeout_s": 600.0, **setting})
        app = serve.deployment(TimedResponder, name="ResponderActor", ray_actor_options={"num_cpus": 0.5},
                               max_ongoing_requests=64).bind(cfg=cfg, models=models)
    return serve.run(app, name=name, route_prefix=None), name


def busy_seconds(spans: list) -> float:
    """Length of the union of the model calls' [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for s, e, _ in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def measure(stage: str, models: str, payloads: list, concurrency: int, max_new_tokens: int, rounds: int,
            threads: int) -> dict:
    out: dict = {key: {"throughput": [], "busy_throughput": [], "batch_size_mean": []} for key in ("on", "off")}
    order = ["on", "off", "off", "on"][: 2 * rounds] if rounds > 1 else ["on", "off"]
    for key in order:
        handle, app = deploy(stage, SETTINGS[stage][key], models, max_new_tokens, threads)
        asyncio.run(_fire(handle, payloads[:2], 2))  # warm the path
        handle.bench_timings.remote().result()
        wall = asyncio.run(_fire(handle, payloads, concurrency))
        spans = handle.bench_timings.remote().result()["spans"]
        if sum(n for _, _, n in spans) < len(payloads):
            raise RuntimeError(f"{stage}: {len(spans)} model calls recorded for {len(payloads)} requests")
        sizes = [n for _, _, n in spans]
        out[key]["throughput"].append(len(payloads) / wall)
        out[key]["busy_throughput"].append(sum(sizes) / busy_seconds(spans))
        out[key]["batch_size_mean"].append(statistics.mean(sizes))
        print(f"[{stage} batching {key}] {len(payloads)} requests at concurrency {concurrency}: "
              f"{out[key]['throughput'][-1]:.2f} req/s wall, {out[key]['busy_throughput'][-1]:.2f} req/s busy, "
              f"mean batch {out[key]['batch_size_mean'][-1]:.1f} (max {max(sizes)})", flush=True)
        serve.delete(app)
    for key in ("on", "off"):
        for m in ("throughput", "busy_throughput", "batch_size_mean"):
            out[key][f"{m}_median"] = statistics.median(out[key][m])
    out["ratio"] = out["on"]["throughput_median"] / out["off"]["throughput_median"]
    out["busy_ratio"] = out["on"]["busy_throughput_median"] / out["off"]["busy_throughput_median"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "128 reasoner requests, 8 responder requests of 8 tokens")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--reasoner-requests", type=int, default=512)
    ap.add_argument("--responder-requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="1: on, off; 2: on, off, off, on")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per replica, both settings (1: the app default; 2 spin-waits on shared cores)")
    ap.add_argument("--reasoner-wait", type=float, default=None, help="batch wait of the Reasoner's 'on' setting (s)")
    ap.add_argument("--stages", nargs="+", default=["reasoner", "responder"], choices=["reasoner", "responder"])
    args = ap.parse_args(argv)
    if args.reasoner_wait is not None:
        SETTINGS["reasoner"]["on"]["batching"]["batch_wait_timeout_s"] = args.reasoner_wait
    if args.quick:
        args.reasoner_requests, args.responder_requests, args.max_new_tokens, args.rounds = 128, 8, 8, 1

    from coact.cluster.experiments.loadgen import opening_messages
    from coact.cluster.prepare import ensure_models

    models = str(ensure_models())
    started, tmp = start_ray(4)
    results: dict = {}
    try:
        for stage in args.stages:
            n = args.reasoner_requests if stage == "reasoner" else args.responder_requests
            msgs = opening_messages(max(n, 400), seed=5)
            msgs = (msgs * (n // len(msgs) + 1))[:n]
            payloads = msgs if stage == "reasoner" else responder_requests(msgs)
            results[stage] = measure(stage, models, payloads, args.concurrency, args.max_new_tokens, args.rounds,
                                     args.threads)
    finally:
        stop_ray(started, tmp)
    print(f"\nthroughput at concurrency {args.concurrency}, batching on / off (median of the runs):")
    for stage, r in results.items():
        target = " (target >= 3x)" if stage == "reasoner" else ""
        print(f"  {stage:<10} on {r['on']['throughput_median']:.2f} req/s (batch {r['on']['batch_size_mean_median']:.1f})"
              f"  off {r['off']['throughput_median']:.2f} req/s  ratio {r['ratio']:.2f}x{target};"
              f"  busy-time throughput ratio {r['busy_ratio']:.2f}x")
    write_result(args.json, args=vars(args), settings=SETTINGS, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
