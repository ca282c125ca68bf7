"""Graph overhead per hop: the real graph against a no-op four-deployment chain, deployed in the same run.

    python -m coact.cluster.experiments.bench_overhead [--turns 30] [--json results/bench/overhead.json]
    python -m coact.cluster.experiments.bench_overhead --quick

Two apps side by side on one private Ray, driven alternately at concurrency 1 over HTTP:
- the real graph: the real ChatIngress and turn function (graphs.pipeline.run_turn) over subclasses of
  the four actors that only add timers: the time inside the replica's handler and inside the model
  call itself (no change to actors/). Per hop: overhead = ingress-measured stage ms - time inside the
  replica; batch wait = inside the replica - model compute (a lone request waits the batch timeout);
- a no-op chain: an ingress and four deployments that return at once, called in the same pattern
  (intent || reasoner, then decision, then responder); its hops are pure Serve handle cost.
Printed: per-hop overhead vs the no-op hop (target <= 1.2x) and the share of a turn's latency that is
model work (target >= 70 %), plus the same with batching off (no batch-timeout wait at concurrency 1).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from ray import serve

from coact.actors.decision import DecisionActor
from coact.actors.intent import IntentActor
from coact.actors.reasoner import ReasonerActor
from coact.actors.responder import ResponderActor
from coact.cluster.experiments.harness import bench_parser, start_ray, stop_ray, write_result

HOPS = ("intent", "reasoner", "decision", "responder")


class _Timed:
    """Mixin: time inside the handler and inside the model call; `bench_timings()` returns and clears them."""

    def _init_timers(self) -> None:
        self._inside: list[float] = []
        self._compute: list[float] = []
        self._spans: list[tuple[float, float, int]] = []  # (start, end, batch size) of every model call
        self._messages: list[str] = []  # per call, where a turn makes several calls to one stage (intent)

    def _timed_compute(self, fn, *args):
        if getattr(self, "_compute", None) is None:  # the parent's __init__ warms the model up before the timers
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        self._compute.append((t1 - t0) * 1000)
        self._spans.append((t0, t1, len(args[0]) if args and isinstance(args[0], list) else 1))
        return out

    def _time_engine(self, method: str) -> None:
        """Time every call of the engine's batched ``method`` as this replica's model compute."""
        inner = getattr(self.engine, method)
        setattr(self.engine, method, lambda batch: self._timed_compute(inner, batch))

    async def _timed_call(self, coro):
        t0 = time.perf_counter()
        out = await coro
        self._inside.append((time.perf_counter() - t0) * 1000)
        return out

    def bench_timings(self) -> dict:
        out = {"inside_ms": list(self._inside), "compute_ms": list(self._compute), "spans": list(self._spans),
               "messages": list(self._messages)}
        self._inside.clear()
        self._compute.clear()
        self._spans.clear()
        self._messages.clear()
        return out


class TimedIntent(IntentActor.func_or_class, _Timed):
    """A turn calls the intent stage once for its message and once per part of a message that may ask two
    things (graphs.dialogue.split_requests), all at once, so they share a batch. Timings are therefore
    kept per call: its message, the time inside the handler and the compute of the batch it ran in."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)  # builds (and warms up) the engine before the timers exist
        self._init_timers()
        self._batch_ms: dict[int, float] = {}  # id(request) -> compute of its batch, until its call returns
        self.engine.classify = self._timed_classify(self.engine.classify)

    def _timed_classify(self, classify):
        def timed(requests):
            t0 = time.perf_counter()
            out = classify(requests)
            t1 = time.perf_counter()
            self._spans.append((t0, t1, len(requests)))
            for r in requests:
                self._batch_ms[id(r)] = (t1 - t0) * 1000
            return out

        return timed

    async def __call__(self, request):
        t0 = time.perf_counter()
        out = await self.classify(request)
        self._inside.append((time.perf_counter() - t0) * 1000)
        self._compute.append(self._batch_ms.pop(id(request), float("nan")))
        self._messages.append(request.message)
        return out


class _TimedEngine(_Timed):
    """Times the engine's batched ``ENGINE_METHOD`` as the replica's model compute (first base: its
    ``__init__`` runs the deployment's, which builds and warms up the engine, before the timers exist)."""

    ENGINE_METHOD = ""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._init_timers()
        self._time_engine(self.ENGINE_METHOD)


class TimedReasoner(_TimedEngine, ReasonerActor.func_or_class):
    ENGINE_METHOD = "reason"

    async def __call__(self, message):
        return await self._timed_call(self.reason(message))


class TimedDecision(DecisionActor.func_or_class, _Timed):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._init_timers()

    async def __call__(self, request):
        async def run():
            return self._timed_compute(self.policy.decide, request.evidence)

        return await self._timed_call(run())


class TimedResponder(_TimedEngine, ResponderActor.func_or_class):
    ENGINE_METHOD = "generate"

    async def __call__(self, request):
        return await self._timed_call(self.respond(request))


def timed_app(models: str, max_new_tokens: int, batching: bool):
    from coact.graphs.serving.http import AppConfig
    from coact.graphs.serving.ingress import ChatIngress

    off = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    cfg = AppConfig.model_validate({"models": models, "responder": {"max_new_tokens": max_new_tokens}}
                                   | ({} if batching else {s: {"batching": off} for s in ("intent", "reasoner",
                                                                                       "responder")}))
    # The app's own resources and request limits (AppConfig's defaults), on the timed subclasses.
    intent = serve.deployment(TimedIntent, name="IntentActor", **cfg.intent.deployment.serve_options()).bind(
        cfg=cfg.intent, models=models)
    reasoner = serve.deployment(TimedReasoner, name="ReasonerActor", **cfg.reasoner.deployment.serve_options()).bind(
        cfg=cfg.reasoner, models=models)
    decision = serve.deployment(TimedDecision, name="DecisionActor",
                                **cfg.decision.deployment.serve_options()).bind(cfg=cfg.decision)
    responder = serve.deployment(TimedResponder, name="ResponderActor",
                                 **cfg.responder.deployment.serve_options()).bind(cfg=cfg.responder, models=models)
    return ChatIngress.options(**cfg.ingress.deployment.serve_options()).bind(intent, reasoner, decision, responder)


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class NoopStage:
    async def __call__(self, x):
        return {"ok": True, "echo": str(x)[:32]}


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class NoopIngress:
    def __init__(self, intent, reasoner, decision, responder) -> None:
        self.h = {"intent": intent, "reasoner": reasoner, "decision": decision, "responder": responder}

    async def _hop(self, name: str, x) -> float:
        t0 = time.perf_counter()
        await self.h[name].remote(x)
        return (time.perf_counter() - t0) * 1000

    async def __call__(self, request) -> dict:
        msg = (await request.json())["message"]
        ms = dict(zip(("intent", "reasoner"), await asyncio.gather(self._hop("intent", msg),
                                                                    self._hop("reasoner", msg)), strict=True))
        ms["decision"] = await self._hop("decision", msg)
        ms["responder"] = await self._hop("responder", msg)
        return {"hop_ms": ms}


def noop_app():
    return NoopIngress.bind(*(NoopStage.options(name=f"Noop{h.title()}").bind() for h in HOPS))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def drive(real_url: str, noop_url: str, messages: list[str]) -> tuple[list[dict], list[dict]]:
    """Alternate one real turn and one no-op turn, so that both see the same background load."""
    real, noop = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        for m in messages:
            t0 = time.perf_counter()
            r = await client.post(f"{real_url}/v1/chat", json={"message": m})
            r.raise_for_status()
            real.append({"latency_ms": (time.perf_counter() - t0) * 1000, "message": m, **r.json()})
            t0 = time.perf_counter()
            r = await client.post(noop_url, json={"message": m})
            r.raise_for_status()
            noop.append({"latency_ms": (time.perf_counter() - t0) * 1000, **r.json()})
    return real, noop


def _own_calls(calls: list[str], turns: list[str]) -> list[int]:
    """Index of each turn's own call among a stage's calls (in order); the other calls are its parts'."""
    out, j = [], 0
    for m in turns:
        while j < len(calls) and calls[j] != m:
            j += 1
        if j == len(calls):
            raise RuntimeError(f"intent: no timed call for the turn {m!r}")
        out.append(j)
        j += 1
    return out


def _stage(turn: dict, name: str) -> dict:
    return next(s for s in turn["trace"]["stages"] if s["stage"] == name)


def analyse(real: list[dict], noop: list[dict], stats: dict[str, dict]) -> dict:
    full = [t for t in real if t["action"]["kind"] != "chitchat"]
    idx = [i for i, t in enumerate(real) if t["action"]["kind"] != "chitchat"]  # reached the responder
    # Reached the decision: all but turns answered by template before it (acts, acknowledgements).
    decided = [i for i, t in enumerate(real) if "skipped" not in (_stage(t, "decision")["output"] or {})]
    stage_ms = {h: [_stage(real[i], h)["ms"] for i in idx] for h in HOPS}
    out: dict = {"turns": len(real), "full_turns": len(full)}
    per_hop, model_share = {}, []
    for h in HOPS:
        inside, compute = stats[h]["inside_ms"], stats[h]["compute_ms"]
        if h == "intent":  # the turn's own call, not its parts' (they ran in the same batch)
            own = _own_calls(stats[h]["messages"], [t["message"] for t in real])
            inside, compute = [inside[j] for j in own], [compute[j] for j in own]
            stats[h] = stats[h] | {"inside_ms": inside, "compute_ms": compute}
        n = len(inside)
        # At concurrency 1 the replica's i-th call is the i-th turn that reached it.
        keep = {"decision": decided, "responder": idx}.get(h, list(range(len(real))))
        if n != len(keep) or len(compute) != n:
            raise RuntimeError(f"{h}: {n} timed calls for {len(keep)} turns (concurrency must be 1)")
        over = [_stage(real[i], h)["ms"] - inside[j] for j, i in enumerate(keep)]
        wait = [a - c for a, c in zip(inside, compute, strict=True)]
        per_hop[h] = {"stage_ms": _median(stage_ms[h]), "inside_ms": _median(inside), "compute_ms": _median(compute),
                      "batch_wait_ms": _median(wait), "hop_overhead_ms": _median(over)}
    for i in idx:
        t = real[i]
        c = {h: stats[h]["compute_ms"] for h in HOPS}
        j_all, j_decided, j_full = i, decided.index(i), idx.index(i)
        work = max(c["intent"][j_all], c["reasoner"][j_all]) + c["decision"][j_decided] + c["responder"][j_full]
        model_share.append(work / t["latency_ms"])
    noop_hop = {h: _median([t["hop_ms"][h] for t in noop]) for h in HOPS}
    out["per_hop"] = per_hop
    out["noop_hop_ms"] = noop_hop
    out["noop_turn_ms"] = _median([t["latency_ms"] for t in noop])
    out["real_turn_ms"] = _median([t["latency_ms"] for t in full])
    out["model_share"] = _median(model_share)
    out["hop_ratio"] = {h: per_hop[h]["hop_overhead_ms"] / noop_hop[h] for h in HOPS}
    out["hop_ratio_mean"] = statistics.mean(per_hop[h]["hop_overhead_ms"] for h in HOPS) / statistics.mean(
        noop_hop.values())
    return out


def run_once(models: str, max_new_tokens: int, batching: bool, messages: list[str], port: int) -> dict:
    from coact.cluster.runtime import wait_healthy

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(timed_app(models, max_new_tokens, batching), name="bench-real", route_prefix="/real")
    serve.run(noop_app(), name="bench-noop", route_prefix="/noop")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(f"{base}/real", 600)
    asyncio.run(drive(f"{base}/real", f"{base}/noop", messages[:2]))  # warm both paths
    handles = {h: serve.get_deployment_handle(n, app_name="bench-real") for h, n in zip(
        HOPS, ("IntentActor", "ReasonerActor", "DecisionActor", "ResponderActor"), strict=True)}
    for h in handles.values():
        h.bench_timings.remote().result()  # clear the warm-up's timings
    real, noop = asyncio.run(drive(f"{base}/real", f"{base}/noop", messages[2:]))
    stats = {h: handles[h].bench_timings.remote().result() for h in HOPS}
    serve.delete("bench-real")
    serve.delete("bench-noop")
    return analyse(real, noop, stats)


def report(label: str, r: dict) -> None:
    print(f"\n[{label}] {r['turns']} turns at concurrency 1; real turn p50 {r['real_turn_ms']:.0f} ms, "
          f"no-op chain turn p50 {r['noop_turn_ms']:.1f} ms")
    print(f"{'hop':<10} {'stage ms':>9} {'in replica':>10} {'compute':>9} {'batch wait':>10} {'hop ovh':>8} "
          f"{'no-op hop':>9} {'ratio':>6}")
    for h in HOPS:
        p = r["per_hop"][h]
        print(f"{h:<10} {p['stage_ms']:>9.1f} {p['inside_ms']:>10.1f} {p['compute_ms']:>9.1f} {p['batch_wait_ms']:>10.1f}"
              f" {p['hop_overhead_ms']:>8.1f} {r['noop_hop_ms'][h]:>9.1f} {r['hop_ratio'][h]:>6.2f}")
    print(f"mean hop overhead / mean no-op hop: {r['hop_ratio_mean']:.2f} (target <= 1.2); "
          f"model work share of a turn: {100 * r['model_share']:.1f} % (target >= 70 %)")


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "6 turns, batching on only")
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--port", type=int, default=8041)
    args = ap.parse_args(argv)
    from coact.cluster.experiments.loadgen import opening_messages
    from coact.cluster.prepare import ensure_models

    turns = 6 if args.quick else args.turns
    messages = opening_messages(turns + 2, seed=3)
    models = str(ensure_models())
    started, tmp = start_ray(4)
    results = {}
    try:
        for label, batching in (("batching on (defaults)", True), ("batching off", False))[: 1 if args.quick else 2]:
            results[label] = run_once(models, args.max_new_tokens, batching, messages, args.port)
            report(label, results[label])
    finally:
        stop_ray(started, tmp)
    write_result(args.json, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
