"""How this project runs Ray on one machine: the one place for each of these jobs.

- ``OFFLINE_ENV`` / ``quiet_env()``: nothing leaves the machine (no usage stats, no hub lookups);
- ``free_port()``: a free TCP port on 127.0.0.1;
- ``init_ray()``: attach to Ray or start a private local one on loopback (``start_ray``/``stop_ray`` add a
  private temp dir); ``use_cluster_token()``: drive a cluster that has its own auth token;
- ``deploy()`` / ``wait_healthy()`` / ``ensure_app()``: the Serve app on 127.0.0.1, returned once /healthz answers;
- ``start_head()`` / ``PrivateHead``: a private ``ray start --head`` (own temp dir, HOME, token, free ports);
- ``pids_naming()`` / ``kill_pids()`` / ``alive()``: clean-up by PID, never by process name.

A private head by hand::

    python -m coact.cluster.runtime head --num-cpus 2   # prints the address, the dashboard URL and the client env; Ctrl-C stops it

Why not ``ray start --head`` plainly: on a shared machine the default ports (6379, 8265, 10001, 52365) collide
with other clusters, the default ``~/.ray/auth_token`` and ``/tmp/ray`` are shared with every other local Ray,
and the only stock way to stop it, ``ray stop``, kills every Ray process on the machine by name. Here the head
runs as ``ray start --head --block`` in its own process session; stopping it terminates that PID (which tears
down its raylet, GCS, dashboard and workers) and then checks that every process it started has exited.

Token authentication stays on (``RAY_AUTH_MODE=token``): the token is generated here, written to
``<root>/home/.ray/auth_token`` and handed to clients either as environment (``client_env()``: ``RAY_AUTH_MODE``
+ ``RAY_AUTH_TOKEN_PATH``, for ``ray job submit`` / ``serve deploy`` subprocesses) or as an HTTP header
(``auth_headers()``, for ``JobSubmissionClient(..., headers=...)`` in a process whose Ray token is another one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 8000
APP_NAME = "coact"
NAMESPACE = "coact"

# Every process of ours (drivers, heads, their workers) runs offline: no usage stats, no model hub.
OFFLINE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
# `ray start --node-ip-address 127.0.0.1` is rewritten to the eth0 address (services.resolve_ip_for_localhost),
# and the fake provider's raylets pick eth0 too. With this flag off, Ray's get_node_ip_address() answers
# 127.0.0.1 in every process of the cluster (head, autoscaler, fake nodes, workers): one machine, loopback only.
# Its only other effect is refusing `ray start --address` worker joins, which none of our clusters makes.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Without it, a local `ray.init(_node_ip_address="127.0.0.1")` still listens beyond loopback (Ray 2.60, seen with
# psutil): GCS, raylet (node manager, object manager) and every core worker's gRPC server on `::`, the dashboard
# agent's HTTP server (52365) on loopback *and* eth0, its metrics export and gRPC ports on 0.0.0.0 / `::`, the
# runtime-env agent on eth0, the autoscaler's (44217) and dashboard's (44227) metrics on 0.0.0.0. With it every one
# of them binds 127.0.0.1 (the C++ servers as `::ffff:127.0.0.1`) with no flag of its own; Serve replicas are the
# exception (below). docs/operations.md has the table; tests/test_loopback.py checks every listening socket.


# One port no setting moves: Serve 2.60 binds every replica's inter-deployment gRPC server on "[::]:0" (a literal in
# ray/serve/_private/replica.py, through ray._common.tls_utils.add_port_to_grpc_server). The local cluster's
# workers run this hook first (runtime_env worker_process_setup_hook), so that bind goes to 127.0.0.1.
LOOPBACK_WORKER_HOOK = "coact.cluster.runtime.loopback_worker_setup"


def use_loopback() -> None:
    """Make the Ray this process starts (and every process of it) listen on 127.0.0.1 only: ``LOOPBACK_ENV`` in
    the environment its processes inherit, and in this process's ``ray_constants``, read when ray was imported.
    A local ``ray.init`` also needs ``LOOPBACK_WORKER_HOOK`` in its runtime_env (``init_ray`` adds it)."""
    import ray._private.ray_constants as ray_constants

    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False


def loopback_worker_setup() -> None:
    """A worker's setup hook: gRPC servers asked for every interface ("[::]:port") bind 127.0.0.1 instead.
    Patched before Serve's replica module imports the function (the hook runs before any task of the worker)."""
    from ray._common import tls_utils

    original = tls_utils.add_port_to_grpc_server
    if getattr(original, "loopback_only", False):
        return

    def add_port_to_grpc_server(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_to_grpc_server.loopback_only = True
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server


def quiet_env() -> None:
    """Keep this process offline and local (values already set win)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- attach to or start Ray

def inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
             **init_kwargs) -> bool:
    """Attach to Ray or start a local one; True when this call connected (the caller then shuts it down).

    - already initialised (a test fixture, a notebook): reuse it, return False, leave it running;
    - ``address`` given (other than ``"local"``): attach to it;
    - ``address=None`` inside ``ray job submit`` (``RAY_ADDRESS``/``RAY_JOB_ID`` set): attach to the job's cluster;
    - otherwise (``"local"`` always) a fresh private Ray without dashboard, every port of it on 127.0.0.1 only
      (``use_loopback``): never some other cluster started on this machine with ``ray start`` (which a plain
      ``ray.init()`` would join).
    ``init_kwargs`` (``_temp_dir``, ``_system_config``, ``log_to_driver``…) go to ``ray.init``.
    """
    import ray

    quiet_env()
    if ray.is_initialized():
        return False
    if address and address != "local":
        ray.init(address=address, namespace=NAMESPACE, **init_kwargs)
    elif address is None and inside_ray_job():
        ray.init(namespace=NAMESPACE, **init_kwargs)
    else:
        use_loopback()  # else Ray rewrites 127.0.0.1 to the eth0 address and binds beyond loopback
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", LOOPBACK_WORKER_HOOK)
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus,
                 include_dashboard=False, namespace=NAMESPACE, runtime_env=runtime_env, **init_kwargs)
    return True


def start_ray(num_cpus: float | None = 4, env: dict[str, str] | None = None,
              **init_kwargs) -> tuple[bool, str | None]:
    """``init_ray()``, with a private short temp dir when it starts a local Ray: (started here, that dir).

    ``env`` is set in this process before a local Ray starts (its raylet, and so every replica, inherits it).
    """
    import ray

    if ray.is_initialized() or inside_ray_job():
        return init_ray(), None
    tmp = tempfile.mkdtemp(prefix="coact-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ.update(env or {})
    return init_ray("local", num_cpus, _temp_dir=tmp, **init_kwargs), tmp


def stop_ray(started: bool, tmp: str | None) -> None:
    """Undo ``start_ray``: shut down what it started, remove its temp dir."""
    import ray

    if started:
        ray.shutdown()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def use_cluster_token(token: str) -> None:
    """Make this process a client of a cluster with its own token, on loopback, offline.

    Importing ray caches the auth mode and token (from ~/.ray/auth_token when present); a driver that sets
    the cluster's token afterwards must refresh both, or the GCS answers InvalidAuthToken. Processes started
    from here (raylets of ``ray.cluster_utils.Cluster``) inherit the same environment.
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.update({**OFFLINE_ENV, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    # ray_constants read the loopback flag at import: apply it to this (already importing) process too, or
    # ray.init rewrites 127.0.0.1 in the address to the eth0 address.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


# ---------------------------------------------------------------- the Serve app

def wait_healthy(url: str, timeout_s: float = 300.0) -> dict:
    """Poll ``<url>/healthz`` until it answers 200; its JSON body."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s:.0f} s (last error: {last})")


def deploy(args: dict | None = None, port: int = DEFAULT_PORT, timeout_s: float = 600.0, name: str = APP_NAME,
           route_prefix: str = "/", host: str = "127.0.0.1") -> str:
    """Deploy the app on the connected cluster; returns its base URL once /healthz answers. `host` is where
    Serve's proxy listens: beyond loopback only with API keys (the ingress refuses other clients without)."""
    from ray import serve

    from coact.graphs.serving.app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args or {}), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(url, timeout_s)
    return url


def ensure_app(url: str | None = None, args: dict | None = None, port: int = DEFAULT_PORT) -> str:
    """Attach to a running app (COACT_URL or the given URL) or start a private Ray + the app here."""
    url = url or os.environ.get("COACT_URL") or f"http://127.0.0.1:{port}"
    try:
        if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
            return url
    except httpx.HTTPError:
        pass
    init_ray("local")
    return deploy(args, port=port)


# ---------------------------------------------------------------- processes, by PID

def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a run's unique temp folder), this one excepted."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM these PIDs, SIGKILL those still alive after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_leftovers(tag: str, wait_s: float = 15.0) -> dict[str, list[int]]:
    """After a cluster was stopped: wait up to ``wait_s`` for the processes naming ``tag`` to go, kill the
    rest; ``{"leftover_killed": […], "still_alive": […]}``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and [p for p in pids_naming(tag) if alive(p)]:
        time.sleep(0.5)
    leftover = [p for p in pids_naming(tag) if alive(p)]
    kill_pids(leftover)
    return {"leftover_killed": leftover, "still_alive": [p for p in pids_naming(tag) if alive(p)]}


# ---------------------------------------------------------------- a private head

def _ray_cli() -> str:
    # The `ray` script of the interpreter running us (the project's venv), not whatever is first on PATH.
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


@dataclass
class PrivateHead:
    """A head started by ``start_head`` (see the module doc): ``stop()`` it, or use it as a context manager."""

    root: Path
    port: int
    dashboard_port: int
    token: str
    proc: subprocess.Popen
    env: dict[str, str] = field(repr=False)
    log_path: Path = field(repr=False)

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)`` and ``ray start --address`` of extra nodes."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API / ``ray job submit --address`` / ``serve deploy --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return Path(self.env["HOME"]) / ".ray" / "auth_token"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a CLI client of this head (``ray job submit``, ``serve deploy``, ``ray status``)."""
        env = dict(os.environ if base is None else base)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **OFFLINE_ENV)
        env.pop("RAY_AUTH_TOKEN", None)  # would take precedence over the path
        env.pop("RAY_ADDRESS", None)
        return env

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0, grace_s: float = 10.0, cleanup: bool = True) -> list[int]:
        """Terminate this head's ``ray start --block`` process and wait for every process it started.

        SIGTERM to that PID first (it then shuts its node down, one process after the other); after ``grace_s``
        whatever of its process tree is still alive gets SIGTERM too, so they stop side by side rather than in
        turn (a head with Serve on it took ~40 s otherwise). Only PIDs that descend from this head are ever
        signalled. Returns the PIDs that still needed SIGKILL after ``timeout_s`` (empty on a clean shutdown).
        """
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` kills its node's processes on SIGTERM
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=max(1.0, timeout_s - grace_s))
        killed = []
        for p in alive:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        if cleanup:
            shutil.rmtree(self.root, ignore_errors=True)
        return killed

    def __enter__(self) -> PrivateHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_head(num_cpus: float = 2, num_gpus: float = 0, resources: dict[str, float] | None = None,
               env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout_s: float = 180.0,
               object_store_memory: int | None = 200 * 1024**2, port: int | None = None,
               root: Path | None = None, extra_args: Sequence[str] = ()) -> PrivateHead:
    """Start a private head with the dashboard (Jobs API) and wait until the dashboard answers authenticated.

    ``env`` adds variables to the head's processes (workers inherit them), e.g. ``PYTHONPATH`` so that a
    ``serve deploy``ed import path resolves without a working-dir upload. ``port`` (GCS), ``root`` (a short
    empty folder under /tmp) and ``extra_args`` (``ray start`` options) are for callers that must know them
    first, e.g. an autoscaling config naming the GCS address.
    """
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    # Short path: Ray's Unix socket paths under the temp dir must stay below the 107-byte limit.
    root = root or Path(tempfile.mkdtemp(prefix="coact-head-", dir="/tmp"))
    home = root / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    token = generate_new_authentication_token()
    token_path = home / ".ray" / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    head_env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        head_env.pop(key, None)
    head_env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
                    **OFFLINE_ENV, **LOOPBACK_ENV)
    # Entrypoints say `python`: make it this interpreter (the venv with Ray), activated or not.
    head_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), head_env.get("PATH", "")])
    head_env.update(env or {})
    port, dport = port or free_port(), free_port()
    cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
           # every other listening port explicit too: the defaults (10001, 52365) collide across clusters
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()),
           "--temp-dir", str(root / "session"), "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
           "--disable-usage-stats", *extra_args]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if object_store_memory:
        cmd += ["--object-store-memory", str(object_store_memory)]
    log_path = root / "head.log"
    # An empty cwd: jobs without a working dir start there, and nothing in it can shadow a module (e.g. `ray/`).
    (root / "cwd").mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=head_env, cwd=str(cwd or root / "cwd"), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = PrivateHead(root=root, port=port, dashboard_port=dport, token=token, proc=proc, env=head_env,
                       log_path=log_path)
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_ready(head: PrivateHead, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not head.alive():
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{head.log_tail()}")
        try:
            # /api/jobs/ is behind token auth: a 200 here means the dashboard, the job module and the token work.
            r = httpx.get(f"{head.dashboard_url}/api/jobs/", headers=head.auth_headers(), timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"head not ready after {timeout_s:.0f} s (last: {last}):\n{head.log_tail()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("head", help="run a private head until Ctrl-C")
    h.add_argument("--num-cpus", type=int, default=2)
    h.add_argument("--num-gpus", type=int, default=0, help="logical GPUs (placement only on a GPU-less machine)")
    args = p.parse_args(argv)
    head = start_head(args.num_cpus, args.num_gpus, cwd=REPO_ROOT)
    print(f"address   {head.address}\ndashboard {head.dashboard_url}\ntoken     {head.token_path}\n"
          f"client:   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={head.token_path}\n"
          f"          ray job submit --address {head.dashboard_url} --working-dir . -- python -m coact.cluster.jobs.…",
          flush=True)
    try:
        while head.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        head.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
