"""Ray Serve's own metrics, scraped from the node's Prometheus endpoint: batch sizes and model compute.

Serve records, per replica, `ray_serve_actual_batch_size`, `ray_serve_batch_execution_time_ms` (the
batch function's run: model compute), `ray_serve_batch_wait_time_ms` (time a batch waited to fill) and
`ray_serve_deployment_processing_latency_ms` (time inside the replica's handler). Taking the difference
of two snapshots gives, per deployment, the means over a load point — no change to the actors needed.
Metrics are exported every `metrics_report_interval_ms` (10 s by default; the sweep sets 2 s), so
`settle()` waits until the counters include every request of the point.

Ray exports a histogram's `_sum` from bucket midpoints, so means are only as fine as the buckets: the
sweep's private Ray sets `FINE_BUCKETS_ENV` (integer batch-size buckets, so the batch-size mean is exact
when taken from the buckets' upper bounds; ~10-25 % wide latency buckets). A cluster started without
them (a test fixture's, a job's) gives coarse latency means and batch sizes rounded up to a power of two.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import httpx

_WANTED = ("ray_serve_actual_batch_size", "ray_serve_batch_execution_time_ms", "ray_serve_batch_wait_time_ms",
           "ray_serve_deployment_processing_latency_ms")
_LINE = re.compile(r'^(?P<name>[a-z_]+)_(?P<kind>sum|count)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')

_LAT = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300, 400, 500,
        600, 750, 1000, 1250, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7500, 10000, 12500, 15000,
        20000, 30000, 60000, 120000]
FINE_BUCKETS_ENV = {
    "RAY_SERVE_BATCH_SIZE_BUCKETS": ",".join(str(i) for i in [*range(1, 65), 96, 128, 256]),
    "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS": ",".join(str(x) for x in _LAT),
}
_BUCKET = re.compile(r'^ray_serve_actual_batch_size_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')

Snapshot = dict[tuple[str, str, str], float]  # (metric_kind, application, deployment) -> total over replicas


def metrics_port() -> int | None:
    """The local node's metrics export port (public API: ray.nodes())."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return int(node["MetricsExportPort"])
    return None


def scrape(port: int | None, host: str = "127.0.0.1") -> Snapshot:
    if not port:
        return {}
    try:
        text = httpx.get(f"http://{host}:{port}/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return {}
    snap: Snapshot = defaultdict(float)
    for line in text.splitlines():
        b = _BUCKET.match(line)
        if b:  # cumulative count of batches of size <= le
            labels = dict(_LABEL.findall(b["labels"]))
            key = (f"batch_le:{labels.get('le')}", labels.get("application", ""), labels.get("deployment", ""))
            snap[key] += float(b["value"])
            continue
        m = _LINE.match(line)
        if not m or m["name"] not in _WANTED:
            continue
        labels = dict(_LABEL.findall(m["labels"]))
        key = (f"{m['name']}_{m['kind']}", labels.get("application", ""), labels.get("deployment", ""))
        snap[key] += float(m["value"])
    return dict(snap)


def settle(port: int | None, before: Snapshot, application: str, expected: dict[str, float],
           timeout_s: float = 15.0, poll_s: float = 0.5) -> Snapshot:
    """Scrape until every deployment in `expected` has reported at least that many more requests.

    Each replica exports on its own timer, so waiting for the counts (not for two equal scrapes) is what
    says that the whole load point has landed; after `timeout_s` the last scrape is returned as it is.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(port)
        done = all(now.get(("ray_serve_deployment_processing_latency_ms_count", application, dep), 0.0)
                   - before.get(("ray_serve_deployment_processing_latency_ms_count", application, dep), 0.0) >= n
                   for dep, n in expected.items())
        if done or time.monotonic() >= deadline or not port:
            return now
        time.sleep(poll_s)


def _batch_mean(before: Snapshot, after: Snapshot, application: str, dep: str, n_batches: float) -> float:
    """Mean batch size from the histogram's buckets, each batch counted at its bucket's upper bound."""
    cums = sorted((float(k[0].split(":", 1)[1]), after[k] - before.get(k, 0.0)) for k in after
                  if k[0].startswith("batch_le:") and k[1:] == (application, dep) and not k[0].endswith("Inf"))
    total, below = 0.0, 0.0
    for le, cum in cums:
        total += (cum - below) * le
        below = cum
    return total / n_batches if total else float("nan")


def per_deployment(before: Snapshot, after: Snapshot, application: str) -> dict[str, dict[str, float]]:
    """Means over the interval between two snapshots, per deployment of one application."""
    def delta(kind: str, dep: str) -> float:
        key = (kind, application, dep)
        return after.get(key, 0.0) - before.get(key, 0.0)

    deps = {d for (_, app, d) in after if app == application and d}
    out: dict[str, dict[str, float]] = {}
    for dep in sorted(deps):
        row: dict[str, float] = {}
        n_batches = delta("ray_serve_actual_batch_size_count", dep)
        if n_batches > 0:
            row["batches"] = n_batches
            row["batch_size_mean"] = _batch_mean(before, after, application, dep, n_batches)
            n_exec = delta("ray_serve_batch_execution_time_ms_count", dep)
            if n_exec > 0:
                row["batch_exec_ms_mean"] = delta("ray_serve_batch_execution_time_ms_sum", dep) / n_exec
            n_wait = delta("ray_serve_batch_wait_time_ms_count", dep)
            if n_wait > 0:
                row["batch_wait_ms_mean"] = delta("ray_serve_batch_wait_time_ms_sum", dep) / n_wait
        n_req = delta("ray_serve_deployment_processing_latency_ms_count", dep)
        if n_req > 0:
            row["requests"] = n_req
            row["replica_ms_mean"] = delta("ray_serve_deployment_processing_latency_ms_sum", dep) / n_req
        if row:
            out[dep] = {k: round(v, 3) for k, v in row.items()}
    return out


if __name__ == "__main__":  # `python -m coact.cluster.experiments.serve_metrics`: the exports for a `ray start` head
    for key, value in FINE_BUCKETS_ENV.items():
        print(f"export {key}={value}")
