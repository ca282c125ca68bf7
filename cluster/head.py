"""A private Ray head on this machine: its own temp dir, HOME, auth token and free ports on 127.0.0.1.

Used by the test suite (``ray job submit``, ``serve deploy``) and usable by hand::

    python -m coact.cluster.head --num-cpus 2      # prints the address, the dashboard URL and the client env; Ctrl-C stops it

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    # The `ray` script of the interpreter running us (the project's venv), not whatever is first on PATH.
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


@dataclass
class PrivateHead:
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
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_USAGE_STATS_ENABLED="0")
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


def start_head(num_cpus: int = 2, num_gpus: int = 0, resources: dict[str, float] | None = None,
               env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout_s: float = 180.0,
               object_store_memory: int | None = 200 * 1024**2) -> PrivateHead:
    """Start a private head with the dashboard (Jobs API) and wait until the dashboard answers authenticated.

    ``env`` adds variables to the head's processes (workers inherit them), e.g. ``PYTHONPATH`` so that a
    ``serve deploy``ed import path resolves without a working-dir upload.
    """
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    # Short path: Ray's Unix socket paths under the temp dir must stay below the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="coact-head-", dir="/tmp"))
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    token = generate_new_authentication_token()
    token_path = home / ".ray" / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    head_env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        head_env.pop(key, None)
    head_env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
                    RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false",
                    # Otherwise Ray rewrites --node-ip-address 127.0.0.1 to the eth0 address
                    # (services.resolve_ip_for_localhost); this flag keeps every process on loopback.
                    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # Entrypoints say `python`: make it this interpreter (the venv with Ray), activated or not.
    head_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), head_env.get("PATH", "")])
    head_env.update(env or {})
    port, dport = free_port(), free_port()
    cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
           # every other listening port explicit too: the defaults (10001, 52365) collide across clusters
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()),
           "--temp-dir", str(root / "session"), "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
           "--disable-usage-stats"]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if object_store_memory:
        cmd += ["--object-store-memory", str(object_store_memory)]
    log_path = root / "head.log"
    # An empty cwd: jobs without a working dir start there, and nothing in it can shadow a module (e.g. `ray/`).
    (root / "cwd").mkdir()
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
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--num-gpus", type=int, default=0, help="logical GPUs (placement only on a GPU-less machine)")
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
