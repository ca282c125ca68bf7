"""Facts recorded with every result (machine, versions, load) and a CPU meter for a process tree."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
_PACKAGES = ("ray", "torch", "transformers", "numpy", "httpx", "pgmpy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:  # read-only
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def facts() -> dict:
    """Machine and version facts; the load average says how shared the machine was."""
    return {
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def ray_cluster_root_pids() -> list[int]:
    """PIDs of the Ray processes this driver started (raylet, GCS, ...); workers are their children."""
    try:
        from ray._private import worker

        node = worker._global_node
        if node is None:
            return []
        return [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]
    except Exception:  # private API: absent in a job driver or another Ray version; fall back to machine-wide only
        return []


class CpuMeter:
    """CPU seconds used by a set of process trees, and the machine-wide CPU %, between start() and stop()."""

    def __init__(self, root_pids: list[int] | None = None) -> None:
        self.root_pids = root_pids or []
        self._t0: dict[int, float] = {}
        self._wall0 = 0.0

    def _tree(self) -> dict[int, float]:
        seen: dict[int, float] = {}
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        return seen

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # resets the machine-wide counter
        self._t0 = self._tree()
        self._wall0 = time.monotonic()

    def stop(self) -> dict:
        wall = max(1e-9, time.monotonic() - self._wall0)
        now = self._tree()
        # Processes started during the run count from zero; those that ended are lost (a small undercount).
        used = sum(max(0.0, t - self._t0.get(pid, 0.0)) for pid, t in now.items())
        return {
            "machine_cpu_percent": psutil.cpu_percent(interval=None),
            "ray_cpu_seconds": round(used, 2) if self.root_pids else None,
            "ray_cores_busy": round(used / wall, 3) if self.root_pids else None,
        }
