"""Turn latency of two running coact servers, measured side by side in one run.

    python -m coact.cluster.experiments.compare_servers --a http://127.0.0.1:8011 --b http://127.0.0.1:8000 \
        [--concurrency 1 8] [--requests 24] [--rounds 2] [--json out.json]

Used to compare a revision with its baseline: serve each from its own checkout (for the baseline,
`git worktree add ../baseline <rev>` and `python -m coact.cluster.cli serve --port 8011` there), then run
this. The same BANKING77 test messages go to both, alternating A, B, A, B per concurrency level and
round, so drift in a shared machine's load hits both sides alike. Printed: p50/p99 per side and the
ratio B/A. Only the ratios mean anything; absolute numbers depend on the machine's other load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import httpx

from coact.cluster.experiments.harness import drive, graph_turn, messages, percentile, write_result


async def _level(url: str, msgs: list[str], concurrency: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        turn = graph_turn(url, client)
        await turn(msgs[0])  # warm the replicas' caches for this level
        lat, _ = await drive(turn, msgs, concurrency)
    return lat


def compare(a: str, b: str, concurrency: list[int], requests: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    msgs = messages(requests)
    out: dict[int, dict[str, list[float]]] = {c: {"a": [], "b": []} for c in concurrency}
    for r in range(rounds):
        for c in concurrency:
            for side, url in (("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a)):
                lat = asyncio.run(_level(url, msgs, c))
                out[c][side].extend(lat)
                print(f"round {r} c={c:<3} {side}: p50 {statistics.median(lat):7.0f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline server URL")
    ap.add_argument("--b", required=True, help="server under test URL")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = compare(args.a, args.b, args.concurrency, args.requests, args.rounds)
    rows = []
    print("\nconcurrency | A p50 / p99 ms | B p50 / p99 ms | p50 ratio B/A | p99 ratio B/A")
    for c, sides in res.items():
        a50, b50 = statistics.median(sides["a"]), statistics.median(sides["b"])
        a99, b99 = percentile(sides["a"], 99, "nearest"), percentile(sides["b"], 99, "nearest")
        rows.append({"concurrency": c, "a_p50_ms": a50, "a_p99_ms": a99, "b_p50_ms": b50, "b_p99_ms": b99,
                     "p50_ratio": b50 / a50, "p99_ratio": b99 / a99, "n": len(sides["a"])})
        print(f"{c:>11} | {a50:6.0f} / {a99:<6.0f} | {b50:6.0f} / {b99:<6.0f} | {b50 / a50:13.2f} | {b99 / a99:13.2f}")
    write_result(args.json, args=vars(args), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
