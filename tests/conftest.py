"""Shared fixtures: the prepared models folder and one real local Ray cluster + Serve app."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from coact.cluster.prepare import ensure_models

    return ensure_models()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from coact.cluster.local import init_ray

    # A short private temp dir: Ray's socket paths must stay under the Unix limit, and runs must not share state.
    tmp = tempfile.mkdtemp(prefix="coact-ray-", dir="/tmp")
    init_ray(num_cpus=4, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def app_url(models_dir: Path, ray_cluster: None) -> Iterator[str]:
    from ray import serve

    from coact.cluster.local import deploy

    url = deploy({"models": str(models_dir), "generate": True, "max_new_tokens": 20}, port=free_port(),
                 timeout_s=600)
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[object]:
    """A private `ray start --head` with the dashboard (Jobs API), token auth on, own HOME/temp dir/ports."""
    from coact.cluster.head import start_head

    head = start_head(num_cpus=2)
    yield head
    pids = head.descendants()
    killed = head.stop()
    # Every process the head started must be gone, without a machine-wide `ray stop`.
    assert not killed, f"head processes needed SIGKILL after SIGTERM: {killed}"
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
