"""What the action step adds to a turn: the graph with its action step against the same graph without it
(`actions.enabled: false`, decided actions as labels: the graph before the step), side by side in one run.

    python -m coact.cluster.experiments.bench_actions [--concurrency 1 8] [--requests 32] [--json out.json]
    python -m coact.cluster.experiments.bench_actions --quick     # concurrency 1 2, 4 turns (tests)

Both apps run in one private Ray on the same port with template replies (the LM would hide the step's few
milliseconds behind a second of generation), on the same at-risk first turns, each in a new session, so every
turn of the step's side executes a freeze on the reference action server (a real HTTP call to a SQLite-backed
FastAPI app on this machine). Printed per concurrency: p50/p99 ms of each side, the difference and the ratio,
and on the step's side actions executed vs replies that claim one (they must match).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

import httpx

from coact.cluster.experiments.harness import (
    bench_parser,
    drive,
    percentile,
    start_ray,
    stop_ray,
    write_result,
)
from coact.cluster.runtime import deploy, quiet_env

AT_RISK = (
    "someone has been using my card without my permission",
    "there are payments on my card that I never made",
    "my card was stolen this morning",
    "I lost my card and I can see transactions I didn't make",
    "a stranger has been spending money with my card",
    "my card details were stolen and used online",
    "I think my card was cloned, there are purchases I didn't do",
    "somebody took my card from my bag and used it",
)
CLAIM = "have frozen"


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    ap = bench_parser(__doc__, "concurrency 1 2, 4 turns", concurrency=(1, 8))
    ap.add_argument("--requests", type=int, default=32, help="turns per concurrency level and side")
    ap.add_argument("--port", type=int, default=8012)
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests = [1, 2], 4

    from ray import serve

    from coact.cluster.action_server.process import start_action_server
    from coact.cluster.prepare import ensure_models

    models = ensure_models()
    msgs = [AT_RISK[i % len(AT_RISK)] for i in range(args.requests)]
    tmp = Path(tempfile.mkdtemp(prefix="coact-bench-actions-"))
    server = start_action_server(db_path=tmp / "actions.sqlite")
    started, ray_tmp = start_ray(4)
    base = {"models": str(models), "responder": {"generate": False}}
    results: dict[str, dict] = {}
    try:
        urls = {
            "action step": deploy({**base, "actions": {"webhooks": {"bank": {"url": server.url}},
                                                       "audit_log": str(tmp / "audit.sqlite")}},
                                  port=args.port, name="with-actions", route_prefix="/with-actions"),
            "no action step": deploy({**base, "actions": {"enabled": False}}, port=args.port,
                                     name="without-actions", route_prefix="/without-actions"),
        }

        async def run(url: str, c: int) -> tuple[list[float], list[dict]]:
            replies: list[dict] = []
            async with httpx.AsyncClient(timeout=120) as client:
                async def turn(m: str) -> None:
                    r = await client.post(f"{url}/v1/chat", json={"message": m})
                    r.raise_for_status()
                    replies.append(r.json())

                await turn(msgs[0])  # warm-up
                replies.clear()
                lat, _ = await drive(turn, msgs, c)
            return lat, replies

        for c in args.concurrency:
            for side, url in urls.items():  # interleaved per level: both sides see the same machine state
                lat, replies = asyncio.run(run(url, c))
                executed = sum(r["status"] == "done" for resp in replies for r in resp["action"]["executed"])
                claimed = sum(CLAIM in resp["reply"] for resp in replies)
                results[f"{side} c={c}"] = {"side": side, "concurrency": c, "p50_ms": statistics.median(lat),
                                            "p99_ms": percentile(lat, 99, "nearest"), "executed": executed,
                                            "claimed": claimed, "turns": len(replies)}
        for name in ("with-actions", "without-actions"):
            serve.delete(name)
    finally:
        stop_ray(started, ray_tmp)
        server.stop()

    print(f"{'':18}{'p50 ms':>9}{'p99 ms':>9}{'executed':>10}{'claimed':>9}")
    for name, r in results.items():
        print(f"{name:18}{r['p50_ms']:9.1f}{r['p99_ms']:9.1f}{r['executed']:10d}{r['claimed']:9d}")
    for c in args.concurrency:
        on, off = results[f"action step c={c}"], results[f"no action step c={c}"]
        print(f"c={c}: the action step adds {on['p50_ms'] - off['p50_ms']:.1f} ms at p50 "
              f"({on['p50_ms'] / off['p50_ms']:.2f}x), {on['p99_ms'] - off['p99_ms']:.1f} ms at p99; "
              f"executed {on['executed']} / claimed {on['claimed']} of {on['turns']} turns")
    write_result(args.json, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
