"""Capacity model: replicas, nodes and GPUs per deployment for a target load and p99 latency target.

    python -m coact.cluster.experiments.capacity --sessions 100 10000 1000000 --turn-every-s 30 --p99-s 8
    python -m coact.cluster.experiments.capacity --profile gpu-assumed --sessions 1000000 --p99-s 3
    python -m coact.cluster.experiments.capacity --fit results/experiments/sweep/<run>/points.csv --validate

Model (its assumptions, stated so they can be argued with):
- Each stage has c replicas. A batch of b requests takes S(b) = s0 + s1 (b - 1) ms (a linear batching
  curve, fitted on Serve's measured batch compute times). A busy replica's next batch is what arrived
  while the last one ran: b = (lambda / c) S(b), at least 1; past max_batch the stage is unstable.
- Queueing delay: the smaller of (a) M/M/c Erlang C with requests served one at a time, service
  S(1) (light load: P(W > t) = C exp(-(c mu - lambda) t), scaled by the Allen-Cunneen factor
  (ca2 + cs2) / 2, ca2 = 1 for Poisson arrivals, cs2 = 1 gives plain M/M/c) and (b) waiting out the
  batch in service (mean S(b) / 2, quantile q S(b)): under load a batching replica is always busy but
  stable. Both grow with lambda, so the model's latency does too.
- A lightly loaded replica holds a lone request up to its batch wait (Serve's @serve.batch timeout):
  fill = (1 - rho) min(wait, (max_batch - 1) / (lambda / c)).
- Stage p99 = fill + wait p99 + S(b); turn p99 = max(intent, reasoner) + decision + responder + hops +
  proxy, i.e. the sum of stage p99s (an upper bound: tails rarely coincide). Chit-chat turns skip
  decision and responder (fraction `full_fraction` does not).
- Stages do not share hardware (true across nodes; on this 2-core machine they do, one reason the
  measured check has a wide tolerance). Replicas are packed onto nodes by their CPU and GPU requests.
- Checking against measured points (`check_against`) uses the batch sizes Serve actually formed and each
  point's measured batch compute: each stage is then M/M/c Erlang C whose servers serve batches of b
  (request rate b / S(b)). Measured batches can stay far below what the queue would allow (an LM
  replica's generation thread holds the GIL, so its event loop admits requests late), which the
  projection's batch rule does not know. With N users at most N - 1 requests wait ahead, so the wait is
  capped at (N - 1) S(b) / (c b).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

STAGES = ("intent", "reasoner", "decision", "responder")


@dataclass(frozen=True)
class StageProfile:
    s0_ms: float  # one request alone
    s1_ms: float  # each further request in the same batch
    max_batch: int = 1
    wait_ms: float = 0.0
    cpus: float = 0.25
    gpus: float = 0.0
    cs2: float = 1.0  # squared coefficient of variation of service time (1: exponential)

    def service_ms(self, b: float) -> float:
        return self.s0_ms + self.s1_ms * (b - 1)


@dataclass(frozen=True)
class Profile:
    stages: dict[str, StageProfile]
    hop_ms: float = 8.0  # one Serve handle hop (measured no-op hop here: 6-10 ms)
    proxy_ms: float = 25.0  # HTTP proxy + ingress (client latency minus the ingress's total)
    full_fraction: float = 0.9  # turns that reach decision and responder (the rest are chit-chat)
    source: str = ""


# Measured on this 2-core machine (fp32, 1 thread per replica, 20 new tokens; results/experiments/full-1025):
# one request's model call inside its replica (bench_overhead, batching off: 23, 23, 6, 2243 ms), the
# encoder's per-item cost in a batch (bench_precision: 226 ms for 32 sentences) and the LM's (DESIGN: ~37
# tok/s summed at batch 8 vs 11 alone). `--fit points.csv` replaces them with a sweep's curves.
CPU_MEASURED = Profile(
    stages={
        "intent": StageProfile(s0_ms=23.0, s1_ms=7.0, max_batch=16, wait_ms=5.0, cpus=0.25),
        "reasoner": StageProfile(s0_ms=23.0, s1_ms=7.0, max_batch=32, wait_ms=10.0, cpus=0.25),
        "decision": StageProfile(s0_ms=6.0, s1_ms=6.0, max_batch=1, cpus=0.1),
        "responder": StageProfile(s0_ms=2240.0, s1_ms=450.0, max_batch=8, wait_ms=20.0, cpus=0.5, cs2=0.3),
    },
    hop_ms=10.0, proxy_ms=25.0,
    source="CPU, measured here (2 shared cores)",
)
# NOT measured (no GPU here): assumed figures for a 7B instruct model on vLLM with one GPU per replica
# (24 new tokens at ~25 ms/token decode, ~1 ms per extra sequence in a continuous batch) and MiniLM on a
# GPU share. Replace them with measured curves before buying hardware.
GPU_ASSUMED = Profile(
    stages={
        "intent": StageProfile(s0_ms=4.0, s1_ms=0.2, max_batch=64, wait_ms=5.0, cpus=1.0, gpus=0.25),
        "reasoner": StageProfile(s0_ms=4.0, s1_ms=0.2, max_batch=64, wait_ms=5.0, cpus=1.0, gpus=0.25),
        "decision": StageProfile(s0_ms=2.0, s1_ms=2.0, max_batch=1, cpus=0.5),
        "responder": StageProfile(s0_ms=600.0, s1_ms=1.0, max_batch=128, wait_ms=10.0, cpus=2.0, gpus=1.0, cs2=0.3),
    },
    hop_ms=2.0, proxy_ms=5.0, source="GPU, ASSUMED (not measured)",
)
PROFILES = {"cpu-measured": CPU_MEASURED, "gpu-assumed": GPU_ASSUMED}


# ----------------------------------------------------------------------------------- queueing maths

def erlang_b(c: int, a: float) -> float:
    """Blocking probability of M/M/c/c with offered load a (Erlangs); the stable recurrence."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(c: int, a: float) -> float:
    """P(an arrival waits) in M/M/c with offered load a = lambda / mu; 1 when unstable (a >= c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = erlang_b(c, a)
    return c * b / (c - a * (1 - b))


def wait_quantile_s(c: int, lam: float, mu: float, q: float, factor: float = 1.0) -> float:
    """q-quantile of the M/M/c queueing delay (s), from P(W > t) = C exp(-(c mu - lambda) t)."""
    if lam >= c * mu:
        return math.inf
    pw = erlang_c(c, lam / mu)
    if pw <= 1 - q:
        return 0.0
    return factor * math.log(pw / (1 - q)) / (c * mu - lam)


def mean_wait_s(c: int, lam: float, mu: float, factor: float = 1.0) -> float:
    if lam >= c * mu:
        return math.inf
    return factor * erlang_c(c, lam / mu) / (c * mu - lam)


# ----------------------------------------------------------------------------------- one stage

@dataclass
class StageResult:
    replicas: int
    lam: float  # requests/s into the stage
    batch: float
    rho: float
    mean_s: float
    p99_s: float


def batch_under_load(p: StageProfile, lam_per_replica: float) -> float:
    """The batch a busy replica forms: what arrives while the last batch ran, b = lambda_r S(b), >= 1.

    inf when even max_batch cannot keep up (b > max_batch).
    """
    lr = lam_per_replica / 1000.0  # per ms
    denom = 1.0 - lr * p.s1_ms
    b = lr * (p.s0_ms - p.s1_ms) / denom if denom > 0 else math.inf
    return max(1.0, b) if b <= p.max_batch else math.inf


def stage(p: StageProfile, lam: float, c: int, q: float = 0.99, population: int | None = None,
          batch: float | None = None) -> StageResult:
    """One stage's latency; `batch` replaces the modelled batch size with an observed one."""
    s1 = p.service_ms(1) / 1000.0
    if lam <= 0:
        return StageResult(c, lam, 1.0, 0.0, s1, s1)
    lr = lam / c
    observed = batch is not None and batch == batch
    b = min(max(batch, 1.0), p.max_batch) if observed else batch_under_load(p, lr)
    if population is not None:  # a closed loop cannot diverge: no batch (or queue) holds more than its N users
        b = min(b, float(p.max_batch), float(max(population, 1)))
    if math.isinf(b):
        return StageResult(c, lam, float(p.max_batch), lam * p.service_ms(p.max_batch) / 1000 / (c * p.max_batch),
                           math.inf, math.inf)
    s_b = p.service_ms(b) / 1000.0
    rho1 = lr * s1  # utilisation if every request were served alone
    factor = (1.0 + p.cs2) / 2.0
    batching = p.max_batch > 1
    if observed:
        # The batches Serve actually formed: M/M/c whose servers serve batches of b (rate b / S(b)).
        wq, wm = wait_quantile_s(c, lam, b / s_b, q, factor), mean_wait_s(c, lam, b / s_b, factor)
    else:
        # Two bounds on the queueing delay, both increasing in lambda; the smaller one holds:
        # Erlang C with requests served one at a time (light load), and waiting out the batch in service
        # (a replica that batches whatever queued is always busy yet stable while b <= max_batch).
        wq = min(wait_quantile_s(c, lam, 1 / s1, q, factor), q * s_b if batching else math.inf)
        wm = min(mean_wait_s(c, lam, 1 / s1, factor), s_b / 2 if batching else math.inf)
    if population is not None:  # closed loop: at most N - 1 requests ahead
        cap = max(0, population - 1) * s_b / (c * b)
        wq, wm = min(wq, cap), min(wm, cap)
    fill = 0.0
    if batching and rho1 < 1:  # a lone request waits for the batch timeout
        fill = (1 - rho1) * min(p.wait_ms / 1000.0, (p.max_batch - 1) / lr)
    rho = lr * s_b / b
    return StageResult(c, lam, round(b, 2), rho, fill + wm + s_b, fill + wq + s_b)


# ----------------------------------------------------------------------------------- a whole turn

@dataclass
class TurnPrediction:
    stages: dict[str, StageResult]
    mean_s: float
    p99_s: float


def predict(profile: Profile, lam: float, replicas: dict[str, int], population: int | None = None,
            batches: dict[str, float] | None = None) -> TurnPrediction:
    res = {}
    for name in STAGES:
        rate = lam if name in ("intent", "reasoner") else lam * profile.full_fraction
        res[name] = stage(profile.stages[name], rate, replicas.get(name, 1), population=population,
                          batch=(batches or {}).get(name))
    fixed = (4 * profile.hop_ms + profile.proxy_ms) / 1000.0

    def front(attr: str) -> float:
        return max(getattr(res["intent"], attr), getattr(res["reasoner"], attr)) + fixed

    def full(attr: str) -> float:
        return front(attr) + getattr(res["decision"], attr) + getattr(res["responder"], attr)

    # The mean mixes full turns with chit-chat turns (intent and reasoner only); the p99 is a full turn's.
    f = profile.full_fraction
    return TurnPrediction(res, f * full("mean_s") + (1 - f) * front("mean_s"), full("p99_s"))


def plan(profile: Profile, lam: float, p99_target_s: float, rho_max: float = 0.85,
         max_replicas: int = 10_000_000) -> TurnPrediction:
    """Fewest replicas per stage with rho <= rho_max, then add replicas where the p99 is worst until it fits."""
    replicas = {}
    for name in STAGES:
        p = profile.stages[name]
        rate = lam if name in ("intent", "reasoner") else lam * profile.full_fraction
        best_mu = p.max_batch / (p.service_ms(p.max_batch) / 1000)  # a replica's most requests/s
        replicas[name] = max(1, math.ceil(rate / (rho_max * best_mu)))
    floor = predict(profile, 0.0, replicas).p99_s  # every request alone, no queue
    if floor > p99_target_s:
        raise ValueError(f"p99 target {p99_target_s} s is below this profile's unloaded turn time {floor:.2f} s")
    pred = predict(profile, lam, replicas)
    for _ in range(10_000):
        if pred.p99_s <= p99_target_s:
            return pred
        worst = max(STAGES, key=lambda n: pred.stages[n].p99_s - profile.stages[n].service_ms(1) / 1000)
        replicas[worst] += max(1, replicas[worst] // 20)  # grow by 5 % at scale, one at a time when small
        if replicas[worst] > max_replicas:
            break
        pred = predict(profile, lam, replicas)
    raise ValueError(f"cannot meet p99 {p99_target_s} s at {lam:.1f} turns/s: below this profile's service times?")


def hardware(profile: Profile, pred: TurnPrediction, node_cpus: int, node_gpus: int) -> dict:
    cpus = sum(profile.stages[n].cpus * pred.stages[n].replicas for n in STAGES)
    gpus = sum(profile.stages[n].gpus * pred.stages[n].replicas for n in STAGES)
    nodes = max(math.ceil(cpus / node_cpus), math.ceil(gpus / node_gpus) if node_gpus else 0, 1)
    return {"cpus": round(cpus, 2), "gpus": round(gpus, 2), "nodes": nodes}


def capacity_table(profile: Profile, sessions: list[int], turn_every_s: float, p99_s: float,
                   node_cpus: int = 32, node_gpus: int = 8) -> list[dict]:
    rows = []
    for n in sessions:
        lam = n / turn_every_s
        pred = plan(profile, lam, p99_s)
        row = {"sessions": n, "turns_per_s": round(lam, 2), "p99_s": round(pred.p99_s, 3),
               "mean_s": round(pred.mean_s, 3)}
        for name in STAGES:
            st = pred.stages[name]
            row |= {f"{name}_replicas": st.replicas, f"{name}_batch": st.batch, f"{name}_rho": round(st.rho, 3)}
        rows.append(row | hardware(profile, pred, node_cpus, node_gpus if any(
            s.gpus for s in profile.stages.values()) else 0))
    return rows


# ----------------------------------------------------------------------------------- fit and check

def fit_profile(points: pd.DataFrame, base: Profile = CPU_MEASURED) -> Profile:
    """Batching curves S(b) from a sweep's points (Serve's batch compute vs batch size), hops and proxy.

    A least-squares line through (mean batch size, mean batch compute) per stage, with the per-item
    cost s1 kept within [0.05, 1] x s0: a batch never costs less than its first request alone nor more
    per item than serving the items one by one. On a shared machine the compute times also carry the
    background load of each point, so the fit is rough; `check_against` does not depend on it.
    """
    import numpy as np

    stages = {}
    for name in STAGES:
        p = base.stages[name]
        if name == "decision":
            ms = points["decision_replica_ms_mean"].dropna()
            stages[name] = replace(p, s0_ms=float(ms.median()), s1_ms=float(ms.median())) if len(ms) else p
            continue
        d = points[[f"{name}_batch_size_mean", f"{name}_batch_exec_ms_mean"]].dropna()
        if len(d) >= 2 and d.iloc[:, 0].nunique() >= 2:
            slope, at_0 = np.polyfit(d.iloc[:, 0], d.iloc[:, 1], 1)
            s0 = max(float(at_0 + slope), 1.0)  # S(1)
            s1 = float(slope)
        elif len(d):
            s0, s1 = float(d.iloc[:, 1].median()), p.s1_ms * float(d.iloc[:, 1].median()) / p.s0_ms
        else:
            s0, s1 = p.s0_ms, p.s1_ms
        stages[name] = replace(p, s0_ms=s0, s1_ms=min(max(s1, 0.05 * s0), s0))
    low = points[points["concurrency"] == points["concurrency"].min()]
    hops = [float(low[f"{n}_queue_ms"].median()) for n in STAGES if f"{n}_queue_ms" in low]
    hops = [h for h in hops if h == h]
    hop = float(np.median(hops)) if hops else base.hop_ms
    proxy = float(points["proxy_overhead_ms_p50"].median())
    full = float((points["full_turns"] / points["turns_ok"]).median())
    return Profile(stages, hop_ms=max(hop, 0.0), proxy_ms=proxy, full_fraction=full, source="fitted on a sweep")


def profile_for_point(profile: Profile, row: dict) -> Profile:
    """The profile at one sweep point: its batching settings, its turn mix, its measured service times.

    Each stage's curve is shifted so that S(b) at the batch size Serve saw equals the batch compute
    Serve measured at that point (the background load of a shared machine moves it between points).
    """
    st = dict(profile.stages)
    st["reasoner"] = replace(st["reasoner"], max_batch=int(row["reasoner_max_batch_size"]),
                             wait_ms=1000 * float(row["reasoner_batch_wait_s"]))
    st["responder"] = replace(st["responder"], max_batch=int(row["responder_max_batch_size"]),
                              wait_ms=1000 * float(row["responder_batch_wait_s"]))
    for name in STAGES:
        p = st[name]
        b = row.get(f"{name}_batch_size_mean", float("nan"))
        ms = row.get(f"{name}_batch_exec_ms_mean", float("nan"))
        if name == "decision":
            b, ms = 1.0, row.get("decision_replica_ms_mean", float("nan"))
        if b == b and ms == ms and ms > 0:
            ratio = p.s1_ms / p.s0_ms
            s0 = ms / (1 + ratio * (max(b, 1.0) - 1))
            st[name] = replace(p, s0_ms=s0, s1_ms=ratio * s0)
    full = row["full_turns"] / row["turns_ok"] if row["turns_ok"] else profile.full_fraction
    return replace(profile, stages=st, full_fraction=full)


def check_against(points: pd.DataFrame, profile: Profile | None = None) -> pd.DataFrame:
    """Predicted vs measured p99 (and mean) at every sweep point, at the point's measured throughput.

    Service times and batch sizes come from each point (profile_for_point, Serve's batch-size metric),
    so this checks the queueing and composition parts of the model against what was measured, not the
    service-time fit or the batch-formation rule.
    """
    import pandas as pd

    profile = profile or fit_profile(points)
    rows = []
    for r in points.to_dict("records"):
        prof = profile_for_point(profile, r)
        replicas = {"intent": 1, "decision": 1, "reasoner": int(r["reasoner_replicas"]),
                    "responder": int(r["responder_replicas"])}
        batches = {n: r.get(f"{n}_batch_size_mean") for n in ("intent", "reasoner", "responder")}
        pred = predict(prof, float(r["throughput_tps"]), replicas, population=int(r["concurrency"]), batches=batches)
        rows.append({"config": r["config"], "concurrency": r["concurrency"], "throughput_tps": r["throughput_tps"],
                     "measured_p99_s": r["latency_ms_p99"] / 1000, "predicted_p99_s": round(pred.p99_s, 3),
                     "measured_mean_s": r["latency_ms_mean"] / 1000, "predicted_mean_s": round(pred.mean_s, 3)})
    df = pd.DataFrame(rows)
    df["p99_ratio"] = df["predicted_p99_s"] / df["measured_p99_s"]
    df["mean_ratio"] = df["predicted_mean_s"] / df["measured_mean_s"]
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu-measured")
    ap.add_argument("--fit", type=Path, default=None, help="a sweep's points.csv: fit the CPU profile on it")
    ap.add_argument("--validate", action="store_true", help="with --fit: predicted vs measured p99 per point")
    ap.add_argument("--sessions", type=int, nargs="+", default=[100, 10_000, 1_000_000])
    ap.add_argument("--turn-every-s", type=float, default=30.0, help="mean seconds between a session's turns")
    ap.add_argument("--p99-s", type=float, default=8.0, help="turn latency target (p99, seconds)")
    ap.add_argument("--node-cpus", type=int, default=32)
    ap.add_argument("--node-gpus", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="write the table here")
    args = ap.parse_args(argv)

    import pandas as pd

    profile = PROFILES[args.profile]
    if args.fit:
        points = pd.read_csv(args.fit)
        profile = fit_profile(points)
        if args.validate:
            print(check_against(points, profile).to_string(index=False))
    print(f"profile: {profile.source}")
    print(json.dumps({k: asdict(v) for k, v in profile.stages.items()}, indent=None))
    table = capacity_table(profile, args.sessions, args.turn_every_s, args.p99_s, args.node_cpus, args.node_gpus)
    print(pd.DataFrame(table).to_string(index=False))
    if args.json:
        args.json.write_text(json.dumps({"profile": {k: asdict(v) for k, v in profile.stages.items()},
                                         "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
