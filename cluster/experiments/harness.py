"""What every benchmark and experiment shares: a private Ray for measuring, test messages, load clients,
request records, percentiles, CSV rows.

- ``start_ray``/``stop_ray``: ``cluster.runtime``'s attach-or-start with Serve's fine metric buckets and a
  2 s metrics interval (so a load point's counters land soon after it ends);
- ``messages`` (BANKING77 test openers), ``drive`` (an async turn function at a concurrency), ``graph_turn``
  (one turn over HTTP), ``ClosedLoopLoad`` (threads holding one conversation each, recording a ``Record`` per
  request) and ``latency_by_interval``;
- ``percentile`` (one definition; ``method`` names numpy's), ``write_csv``, ``write_result`` (a benchmark's JSON
  with the machine's facts);
- ``bench_parser``, ``experiment_parser``/``parse_experiment``/``experiment_main``, ``serve_config``,
  ``timeline_axes``/``save_figure``: the benchmarks' and cluster experiments' common shape;
- ``wait_for``: poll a condition with a deadline.

Process clean-up by PID is ``cluster.runtime.kill_leftovers`` (the runtime's private heads use it too).
``cluster.experiments.loadgen`` is the open/closed-loop load generator with per-turn traces.
"""

from __future__ import annotations

import asyncio
import csv
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster import runtime

# A multi-turn conversation of ClosedLoopLoad's clients: a question, its answer, FAQ lookups, a risk, thanks.
MESSAGES = (
    "I see a payment I don't recognise",
    "yes",
    "How long does it take for my new card to arrive?",
    "How much does it cost to transfer money abroad?",
    "My card was stolen this morning, please help",
    "thanks",
)


# ---------------------------------------------------------------- Ray for measuring

def start_ray(num_cpus: float | None = 4) -> tuple[bool, str | None]:
    """Attach (initialised / job) or start a private local Ray with fine Serve metrics; (started here, temp dir)."""
    from coact.cluster.experiments.serve_metrics import FINE_BUCKETS_ENV

    return runtime.start_ray(num_cpus, env=FINE_BUCKETS_ENV,
                             _system_config={"metrics_report_interval_ms": 2000})


stop_ray = runtime.stop_ray


# ---------------------------------------------------------------- statistics and records

def percentile(values: Iterable[float], q: float, method: str = "linear") -> float:
    """The ``q``-th percentile (0-100) of ``values``, NaN when empty; ``method`` as ``numpy.percentile``'s
    ("nearest": an observed value, rounding the rank half to even)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q, method=method)) if arr.size else float("nan")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV, columns in order of first appearance; an empty file when there are none."""
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def timeline_axes(rows: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure of ``rows`` stacked axes sharing the time axis (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=figsize, sharex=True)


def save_figure(fig: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def experiment_parser(doc: str | None, name: str, quick: str) -> Any:
    """An experiment's argument parser with the options every cluster experiment has: ``--out`` (default
    results/<name>/<time>, set by ``parse_experiment``), ``--quick``, ``--max-new-tokens``, ``--interval-s``,
    ``--deploy-timeout-s``, ``--keep-tmp``."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m coact.cluster.experiments.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default results/{name}/<time>)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--max-new-tokens", type=int, default=4, help="0: templates only (no LM generation)")
    p.add_argument("--interval-s", type=float, default=5.0, help="latency aggregation interval")
    p.add_argument("--deploy-timeout-s", type=float, default=400.0)
    p.add_argument("--keep-tmp", action="store_true", help="keep the cluster's temp folder (logs)")
    return p


def parse_experiment(p: Any, argv: list[str] | None, name: str) -> Any:
    args = p.parse_args(argv)
    if args.out is None:
        args.out = runtime.REPO_ROOT / "results" / name / time.strftime("%Y%m%d-%H%M%S")
    return args


def args_dict(args: Any) -> dict[str, Any]:
    """An argparse namespace as JSON-ready values (paths as strings), for a summary."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def experiment_main(parse_args: Callable[[list[str] | None], Any],
                    run: Callable[[Any], dict[str, Any]]) -> Callable[[list[str] | None], int]:
    """An experiment's ``main``: parse, run, print the summary (without its args) and where it went."""
    import json

    def main(argv: list[str] | None = None) -> int:
        args = parse_args(argv)
        summary = run(args)
        print(json.dumps({k: v for k, v in summary.items() if k != "args"}, indent=1, default=str))
        print(f"wrote {args.out}")
        return 0

    return main


# The experiments measure serving, not a bank's systems: the action step runs (its replica, the hop, the audit
# write) as a dry run, so no action server is needed on their clusters (bench_actions measures the real one).
DRY_RUN_ACTIONS: dict[str, Any] = {"actions": {"dry_run": True}}


def serve_config(port: int, args: dict[str, Any]) -> dict[str, Any]:
    """A Serve config of the app (``build_app`` over the repo's models, plus ``args``) at 127.0.0.1:``port``,
    the proxy on the head only: what the cluster experiments deploy through the dashboard."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": runtime.APP_NAME, "route_prefix": "/",
                          "import_path": "coact.graphs.serving.app:build_app",
                          "args": {"models": str(runtime.REPO_ROOT / "models"), **DRY_RUN_ACTIONS, **args}}],
    }


def bench_parser(doc: str | None, quick: str, concurrency: Sequence[int] | None = None) -> Any:
    """A benchmark's argument parser: ``--quick``, ``--json`` and, given default levels, ``--concurrency``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if concurrency is not None:
        ap.add_argument("--concurrency", type=int, nargs="+", default=list(concurrency))
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--json", default=None, help="write the results (and machine facts) to this file")
    return ap


def write_result(path: str | Path | None, **doc: Any) -> None:
    """A benchmark's results as JSON at ``path`` (nothing when None), with the machine's facts first."""
    import json

    from coact.cluster.experiments.machine import facts

    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"facts": facts(), **doc}, indent=2))


def wait_for(predicate: Callable[[], bool], timeout_s: float, period_s: float = 1.0) -> float | None:
    """Seconds until predicate() is true, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - transient status errors while the cluster changes
            pass
        time.sleep(period_s)
    return None


# ---------------------------------------------------------------- async turns (benchmarks)

def messages(n: int) -> list[str]:
    """``n`` BANKING77 test messages spread over the split."""
    from coact.cluster.datasets import load_banking77

    rows = load_banking77("test")
    step = max(1, len(rows) // n)
    return [rows[(i * step) % len(rows)][0] for i in range(n)]


async def drive(turn: Callable[[str], Awaitable[Any]], msgs: list[str], concurrency: int) -> tuple[list[float], float]:
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


def graph_turn(url: str, client: Any) -> Callable[[str], Awaitable[dict]]:
    """One turn of a new session over HTTP with ``client`` (an ``httpx.AsyncClient``)."""
    async def turn(m: str) -> dict:
        r = await client.post(f"{url}/v1/chat", json={"message": m})
        r.raise_for_status()
        return r.json()

    return turn


# ---------------------------------------------------------------- closed-loop conversations (experiments)

@dataclass
class Record:
    client: int
    start: float
    end: float
    status: int
    error: str = ""
    retry_after: str | None = None
    session_id: str | None = None


class ClosedLoopLoad:
    """`clients` threads, each a conversation: post a turn, wait for the answer, post the next."""

    def __init__(self, url: str, clients: int, timeout_s: float = 150.0, think_s: float = 0.0) -> None:
        self.url, self.clients, self.timeout_s, self.think_s = url, clients, timeout_s, think_s
        self.records: list[Record] = []
        self.in_flight = 0
        self.sessions: dict[int, str] = {}
        self.ok_turns: Counter[str] = Counter()  # session_id -> turns answered 200
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def _run(self, client: int) -> None:
        import httpx

        turn = 0
        with httpx.Client(timeout=self.timeout_s) as http:
            while not self._stop.is_set():
                sid = self.sessions.get(client)
                body = {"message": MESSAGES[turn % len(MESSAGES)]} | ({"session_id": sid} if sid else {})
                with self._lock:
                    self.in_flight += 1
                start = time.time()
                status, error, retry_after = 0, "", None
                try:
                    r = http.post(f"{self.url}/v1/chat", json=body)
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    if status == 200:
                        sid = r.json()["session_id"]
                        turn += 1
                    else:
                        error = r.text[:200]
                except httpx.TimeoutException:
                    status, error = -1, "client timeout"
                except httpx.HTTPError as e:
                    status, error = -2, f"{type(e).__name__}: {e}"[:200]
                end = time.time()
                with self._lock:
                    self.in_flight -= 1
                    self.records.append(Record(client, start, end, status, error, retry_after, sid))
                    if status == 200:
                        self.sessions[client] = sid
                        self.ok_turns[sid] += 1
                if status != 200:
                    time.sleep(0.5)  # a client that was told to retry backs off briefly
                elif self.think_s:
                    time.sleep(self.think_s)


def latency_by_interval(records: list[Record], t0: float, interval_s: float) -> dict[int, dict]:
    """Per interval of completion time: count, p50/p99 latency of 200s, status codes."""
    buckets: dict[int, list[Record]] = {}
    for r in records:
        buckets.setdefault(int((r.end - t0) // interval_s), []).append(r)
    out = {}
    for k, rs in sorted(buckets.items()):
        lat = [1000 * (r.end - r.start) for r in rs if r.status == 200]
        out[k] = {"completed": len(rs), "ok": len(lat),
                  "p50_ms": percentile(lat, 50) if lat else None,
                  "p99_ms": percentile(lat, 99) if lat else None,
                  "codes": dict(Counter(r.status for r in rs))}
    return out


def interval_rows(lat: dict[int, dict], interval_s: float) -> list[dict]:
    """``latency_by_interval`` as CSV rows (codes as JSON)."""
    import json

    return [{"t_start": k * interval_s, "t_end": (k + 1) * interval_s,
             **{kk: vv for kk, vv in v.items() if kk != "codes"}, "codes": json.dumps(v["codes"])}
            for k, v in lat.items()]
