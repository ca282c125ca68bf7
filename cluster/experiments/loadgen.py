"""Load generator: realistic multi-turn sessions against the local app's public HTTP API.

    python -m coact.cluster.experiments.loadgen --url http://127.0.0.1:8000 --mode closed --concurrency 8 --duration 60
    python -m coact.cluster.experiments.loadgen --mode open --rate 0.5 --duration 60 --max-turns 200 --out results/x

A session opens with a BANKING77 test message; when the policy asks a question the user answers it
(yes/no), up to `--session-turns` turns; after a terminal action the user sometimes says "thanks".
- closed loop: `--concurrency` users, each starting a new session when the last one ends;
- open loop: sessions arrive as a Poisson process at `--rate` per second, whatever the response times.
Bounded by `--duration` (no new turn after it), `--max-turns`, and `--drain-s` for turns in flight.

Why asyncio + httpx rather than locust: open-loop arrivals must follow their own schedule (locust users
are closed loops, whose send times depend on the responses: coordinated omission), and each turn's
trace (per-stage ms, reasoner batch size, responder source) is recorded, which locust's stats drop.
Writes `<out>/summary.json` (facts + summary) and `<out>/turns.csv` (one row per turn).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from coact.cluster.experiments.harness import percentile
from coact.cluster.experiments.machine import CpuMeter, facts

STAGES = ("session", "intent", "reasoner", "decision", "responder")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PERCENTILES = (50, 95, 99)


@dataclass
class TurnRecord:
    session: int
    turn: int
    t_start_s: float
    latency_ms: float
    status: int  # HTTP status; 0 for a transport error or a turn cancelled at the drain limit
    error: str = ""
    kind: str = ""
    action: str = ""
    server_ms: float = float("nan")
    session_ms: float = float("nan")
    intent_ms: float = float("nan")
    reasoner_ms: float = float("nan")
    decision_ms: float = float("nan")
    responder_ms: float = float("nan")
    reasoner_batch: float = float("nan")
    responder_source: str = ""
    tokens: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadConfig:
    url: str
    mode: str = "closed"  # closed | open
    concurrency: int = 4
    rate: float = 1.0  # open loop: sessions per second
    duration_s: float = 30.0
    max_turns: int = 10_000
    session_turns: int = 3
    think_s: float = 0.0
    thanks_prob: float = 0.2
    drain_s: float = 120.0
    seed: int = 0
    timeout_s: float = 300.0
    labels: dict = field(default_factory=dict)  # extra columns (sweep point, app config)


def check_local(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"refusing to load {url!r}: the load generator only targets a local app ({LOCAL_HOSTS})")


def opening_messages(n: int = 400, seed: int = 0) -> list[str]:
    """BANKING77 test texts (a seeded sample): the first message of each session."""
    from coact.cluster.datasets import load_banking77

    rows = load_banking77("test")
    rng = random.Random(seed)
    return [text for text, _ in rng.sample(rows, min(n, len(rows)))]


def parse_turn(rec: TurnRecord, body: dict) -> None:
    rec.kind = body["action"]["kind"]
    rec.action = body["action"]["name"]
    trace = body["trace"]
    rec.server_ms = float(trace["total_ms"])
    for st in trace["stages"]:
        setattr(rec, f"{st['stage']}_ms", float(st["ms"]))
        out = st.get("output") or {}
        if st["stage"] == "reasoner" and "batch_size" in out:
            rec.reasoner_batch = float(out["batch_size"])
        if st["stage"] == "responder":
            rec.responder_source = str(out.get("source", ""))
            rec.tokens = float(out.get("tokens", 0) or 0)


class Runner:
    def __init__(self, cfg: LoadConfig, messages: list[str]) -> None:
        check_local(cfg.url)
        self.cfg = cfg
        self.messages = messages
        self.rng = random.Random(cfg.seed)
        self.records: list[TurnRecord] = []
        self.turns_started = 0
        self.sessions = 0
        self.t0 = 0.0

    def _may_start_turn(self) -> bool:
        return (time.perf_counter() - self.t0 < self.cfg.duration_s) and self.turns_started < self.cfg.max_turns

    async def _turn(self, client: httpx.AsyncClient, sid: int, turn: int, session_id: str | None,
                    message: str) -> tuple[TurnRecord, dict | None]:
        self.turns_started += 1
        payload = {"message": message} if session_id is None else {"session_id": session_id, "message": message}
        t = time.perf_counter()
        rec = TurnRecord(session=sid, turn=turn, t_start_s=round(t - self.t0, 4), latency_ms=float("nan"), status=0)
        body = None
        try:
            r = await client.post(f"{self.cfg.url}/v1/chat", json=payload)
            rec.status = r.status_code
            body = r.json()
            if r.status_code == 200:
                parse_turn(rec, body)
            else:
                rec.error = str(body.get("error", ""))[:120]
        except (httpx.HTTPError, ValueError) as e:
            rec.error = f"{type(e).__name__}: {e}"[:120]
        except asyncio.CancelledError:
            rec.error = "cancelled at drain limit"
            rec.latency_ms = (time.perf_counter() - t) * 1000
            self.records.append(rec)
            raise
        rec.latency_ms = round((time.perf_counter() - t) * 1000, 2)
        self.records.append(rec)
        return rec, (body if rec.ok else None)

    async def session(self, client: httpx.AsyncClient) -> None:
        """One user's session: open, answer the policy's questions, maybe thank it."""
        sid = self.sessions
        self.sessions += 1
        session_id, message = None, self.rng.choice(self.messages)
        for turn in range(self.cfg.session_turns):
            if not self._may_start_turn():
                return
            rec, body = await self._turn(client, sid, turn, session_id, message)
            if body is None:
                return
            session_id = body["session_id"]
            if rec.kind == "ask":
                message = self.rng.choice(["yes", "no", "yes, I think so", "no, it was me"])
            elif rec.kind != "chitchat" and self.rng.random() < self.cfg.thanks_prob:
                message = "thanks"
            else:
                return
            if self.cfg.think_s:
                await asyncio.sleep(self.rng.expovariate(1.0 / self.cfg.think_s))

    async def _closed(self, client: httpx.AsyncClient) -> None:
        async def user() -> None:
            while self._may_start_turn():
                await self.session(client)

        await asyncio.gather(*(user() for _ in range(self.cfg.concurrency)))

    async def _open(self, client: httpx.AsyncClient) -> None:
        # Arrival times are fixed in advance from the start: a slow response never delays the next arrival.
        tasks: list[asyncio.Task] = []
        next_at = self.rng.expovariate(self.cfg.rate)
        while self._may_start_turn():
            delay = self.t0 + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(min(delay, self.cfg.duration_s))
                continue
            tasks.append(asyncio.create_task(self.session(client)))
            next_at += self.rng.expovariate(self.cfg.rate)
        if tasks:
            await asyncio.gather(*tasks)

    async def run(self) -> list[TurnRecord]:
        limits = httpx.Limits(max_connections=max(64, self.cfg.concurrency * 2), max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as client:
            self.t0 = time.perf_counter()
            drive = self._closed(client) if self.cfg.mode == "closed" else self._open(client)
            try:
                await asyncio.wait_for(drive, self.cfg.duration_s + self.cfg.drain_s)
            except TimeoutError:
                pass  # turns still in flight were cancelled and recorded with status 0
        return self.records


def _pct(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {f"p{q}": float("nan") for q in PERCENTILES} | {"mean": float("nan")}
    out = {f"p{q}": round(percentile(values, q), 2) for q in PERCENTILES}
    out["mean"] = round(float(values.mean()), 2)
    return out


def summarise(records: list[TurnRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    lat = np.array([r.latency_ms for r in ok])
    full = [r for r in ok if r.kind != "chitchat"]  # turns that went through all four stages
    stages = {}
    for s in STAGES:
        vals = np.array([getattr(r, f"{s}_ms") for r in (ok if s in ("session", "intent", "reasoner") else full)])
        stages[s] = _pct(vals[~np.isnan(vals)])
    overhead = np.array([r.latency_ms - r.server_ms for r in ok])
    batches = np.array([r.reasoner_batch for r in ok if not np.isnan(r.reasoner_batch)])
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = f"{r.status} {r.error}".strip()[:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "turns": len(records),
        "turns_ok": len(ok),
        "turns_error": len(records) - len(ok),
        "full_turns": len(full),
        "sessions": len({r.session for r in records}),
        "wall_s": round(wall_s, 3),
        "throughput_tps": round(len(ok) / wall_s, 4) if wall_s > 0 else 0.0,
        "latency_ms": _pct(lat),
        "latency_full_turn_ms": _pct(np.array([r.latency_ms for r in full])),
        "stage_ms": stages,
        # Client latency minus the ingress's own total: HTTP proxy, routing and queueing before the ingress.
        "proxy_overhead_ms": _pct(overhead),
        "reasoner_batch": {"mean": round(float(batches.mean()), 2) if batches.size else float("nan"),
                           "max": float(batches.max()) if batches.size else float("nan")},
        "responder_model_share": round(sum(r.responder_source == "model" for r in full) / len(full), 3) if full else 0.0,
        "actions": {k: sum(r.kind == k for r in ok) for k in sorted({r.kind for r in ok})},
        "errors": errors,
    }


def run_load(cfg: LoadConfig, messages: list[str] | None = None, cpu_pids: list[int] | None = None) -> dict:
    """Run one load point; returns {"config", "summary", "cpu", "records"}."""
    messages = messages or opening_messages(seed=cfg.seed)
    runner = Runner(cfg, messages)
    meter = CpuMeter(cpu_pids)
    meter.start()
    t0 = time.perf_counter()
    records = asyncio.run(runner.run())
    wall = time.perf_counter() - t0
    return {"config": asdict(cfg), "summary": summarise(records, wall), "cpu": meter.stop(), "records": records}


def write_records(path: Path, records: list[TurnRecord], labels: dict | None = None, append: bool = False) -> None:
    labels = labels or {}
    cols = [*labels, *(f.name for f in fields(TurnRecord))]
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        for r in records:
            w.writerow({**labels, **asdict(r)})


def write_result(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "turns.csv", result["records"])
    doc = {"facts": facts(), "config": result["config"], "summary": result["summary"], "cpu": result["cpu"]}
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
    return out / "summary.json"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="app base URL (default COACT_URL or http://127.0.0.1:8000)")
    ap.add_argument("--mode", choices=["closed", "open"], default="closed")
    ap.add_argument("--concurrency", type=int, default=4, help="closed loop: concurrent users")
    ap.add_argument("--rate", type=float, default=0.5, help="open loop: session arrivals per second")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which new turns start")
    ap.add_argument("--max-turns", type=int, default=10_000)
    ap.add_argument("--session-turns", type=int, default=3)
    ap.add_argument("--think-s", type=float, default=0.0, help="mean user think time between turns (exponential)")
    ap.add_argument("--drain-s", type=float, default=120.0, help="how long turns in flight may finish")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for summary.json and turns.csv")
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    from coact.cluster.runtime import quiet_env

    quiet_env()
    args = build_parser().parse_args(argv)
    url = args.url or os.environ.get("COACT_URL") or "http://127.0.0.1:8000"
    cfg = LoadConfig(url=url.rstrip("/"), mode=args.mode, concurrency=args.concurrency, rate=args.rate,
                     duration_s=args.duration, max_turns=args.max_turns, session_turns=args.session_turns,
                     think_s=args.think_s, drain_s=args.drain_s, seed=args.seed)
    result = run_load(cfg)
    s = result["summary"]
    print(json.dumps({k: s[k] for k in ("turns", "turns_ok", "turns_error", "throughput_tps", "latency_ms",
                                        "proxy_overhead_ms", "reasoner_batch", "errors")}, indent=1))
    if args.out:
        print("wrote", write_result(args.out, result))
    return 0 if s["turns_error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
