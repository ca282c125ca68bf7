"""Start (or attach to) Ray on this machine and run the Serve app on 127.0.0.1."""

from __future__ import annotations

import os
import time

import httpx

DEFAULT_PORT = 8000
APP_NAME = "coact"


def quiet_env() -> None:
    """Keep every run offline and local: no usage stats, no hub lookups."""
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, **kwargs):
    import ray

    quiet_env()
    if ray.is_initialized():
        return ray.get_runtime_context()
    if address:
        return ray.init(address=address, namespace="coact", **kwargs)
    # A fresh local head bound to loopback (otherwise Ray picks the eth0 address). address="local"
    # so that a cluster someone else started with `ray start` on this machine is never joined by accident.
    return ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                    namespace="coact", **kwargs)


def wait_healthy(url: str, timeout_s: float = 300.0) -> dict:
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
           route_prefix: str = "/") -> str:
    """Deploy the app on the connected cluster; returns its base URL once /healthz answers."""
    from ray import serve

    from coact.graphs.serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args or {}), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(url, timeout_s)
    return url


def ensure_app(url: str | None = None, args: dict | None = None, port: int = DEFAULT_PORT) -> str:
    """Attach to a running app (COACT_URL or the given URL) or start Ray + the app here."""
    url = url or os.environ.get("COACT_URL") or f"http://127.0.0.1:{port}"
    try:
        if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
            return url
    except httpx.HTTPError:
        pass
    init_ray()
    return deploy(args, port=port)
