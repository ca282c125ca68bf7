"""The embedded default listens on loopback only: ``coact serve`` (a private local Ray, cluster/runtime.py
``init_ray``) and the private head (``start_head``) open no listening socket outside 127.0.0.0/8.

Every process of the cluster is checked (the serve process or the head's ``ray start`` and all their
descendants: GCS, raylet, dashboard and runtime-env agents, autoscaler monitor, the Serve controller, proxy and
replicas, idle workers), with psutil, while the app answers. See docs/operations.md ("Listening addresses").
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.cluster


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the C++ servers (GCS, raylet, core workers) listen as ::ffff:127.0.0.1
    return addr.is_loopback


def listening(root_pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP/UDP socket of `root_pid` and its descendants."""
    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):  # TCP listen, or a bound UDP socket
                found.append((name, c.laddr.ip, c.laddr.port))
    return sorted(set(found))


def assert_loopback_only(sockets: list[tuple[str, str, int]]) -> None:
    print("listening sockets checked (process, address, port):")
    for s in sockets:
        print("   ", s)
    outside = [s for s in sockets if not _loopback(s[1])]
    assert not outside, f"listening beyond loopback: {outside}\nall: {sockets}"


def _stop_tree(proc: subprocess.Popen, tree: list[psutil.Process], grace_s: float = 90.0) -> list[int]:
    """SIGTERM to the PID started here, then wait for its descendants; whatever is left after `grace_s` gets
    SIGTERM (its process group), then SIGKILL. Returns the PIDs that outlived the grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=max(5.0, grace_s / 3))
    left = [p.pid for p in alive]
    if proc.poll() is None or alive:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # started with start_new_session: its group is its own
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    return left


def _up(port: int, log_path: Path) -> bool:
    """Every process of the app is there: Serve logged every deployment running (a replica opens its last port,
    the inter-deployment gRPC server, as it finishes initialising, which /healthz does not wait for), and the
    ingress answers /healthz (200, or 503 while the session store is slow: the sockets do not depend on it)."""
    if "Application 'coact' is ready at" not in log_path.read_text(errors="replace"):
        return False
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_coact_serve_listens_on_loopback_only(models_dir: Path, tmp_path: Path) -> None:
    from coact.cluster.runtime import OFFLINE_ENV, free_port

    port = free_port()
    coact = Path(sys.executable).parent / "coact"
    cmd = [str(coact), "serve", "--no-generate", "--no-action-server", "--port", str(port), "--models", str(models_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(OFFLINE_ENV)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:  # cwd: its var/ (audit log) goes there
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while not _up(port, log_path):
            assert proc.poll() is None, f"coact serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /healthz after 600 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(1)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        sockets = listening(proc.pid)
        names = {name for name, _, _ in sockets}
        # Not vacuous: the cluster's servers are among what was checked, and so is Serve's HTTP port.
        assert {"gcs_server", "raylet"} <= names, sockets
        assert ("ray::ProxyActor", "127.0.0.1", port) in sockets, sockets
        replicas = {n for n in names if n.startswith("ray::ServeReplica:coact:")}
        assert len(replicas) >= 6, sockets  # ingress, intent, reasoner, decision, responder, actions
        assert_loopback_only(sockets)
    finally:
        if not tree:  # failed before the check: still stop every process it started
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        left = _stop_tree(proc, tree)
    assert proc.returncode is not None
    assert not left, f"processes of coact serve still alive after SIGTERM and the grace period: {left}"


def test_private_head_listens_on_loopback_only(ray_head) -> None:
    # The dashboard agent starts after the dashboard answers, its ports one after the other: wait until it
    # listens on all three (HTTP, gRPC, metrics export).
    deadline = time.monotonic() + 60
    while True:
        sockets = listening(ray_head.proc.pid)
        names = {name for name, _, _ in sockets}
        if [n for n, _, _ in sockets].count("ray::DashboardAgent") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= names, sockets
    assert ("127.0.0.1", ray_head.dashboard_port) in {(ip, p) for _, ip, p in sockets}, sockets
    assert_loopback_only(sockets)
