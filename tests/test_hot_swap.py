"""A new intent model folder reaches the running replicas through Serve's user_config, no redeploy."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

APP = "coact-swap"


def _config(models_dir: Path, intent_model: str | None):
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP, "route_prefix": "/swap", "import_path": "coact.graphs.serving.app:build_app",
           "args": {"models": str(models_dir), "generate": False}}
    if intent_model:
        # What an operator edits in the config file before `serve deploy`: the code version (import
        # path, runtime env, args) is unchanged, so Serve calls `reconfigure` on the live replicas.
        app["deployments"] = [{"name": "IntentActor", "user_config": {"intent_model": intent_model}}]
    return ServeDeploySchema.model_validate({"applications": [app]})


def _intent_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#IntentActor")}


def _intent_version(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat", json={"message": "How do I top up by card?"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["trace"]["model_versions"]["intent"]


def _wait_running(timeout_s: float = 300) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status and status.status == "RUNNING":
            return
        time.sleep(1)
    raise TimeoutError(f"{APP} not RUNNING: {serve.status().applications.get(APP)}")


def test_intent_model_hot_swap(app_url: str, models_dir: Path, tmp_path: Path) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    from coact.actors.models import read_meta
    from coact.cluster.jobs import train_intent

    # A genuinely different model: a frozen-encoder head trained on a small sample.
    train_intent.main(["--mode", "frozen", "--train-per-class", "20", "--val-per-class", "5", "--epochs", "2",
                       "--no-test", "--no-progress", "--output", str(tmp_path / "run"),
                       "--model-out", str(tmp_path / "intent-b")])
    new_version = read_meta(tmp_path / "intent-b")["version"]
    old_version = read_meta(models_dir / "intent")["version"]
    assert new_version != old_version

    client = _get_global_client()
    url = app_url.rstrip("/") + "/swap"
    try:
        client.deploy_apps(_config(models_dir, None))
        _wait_running()
        assert _intent_version(url) == old_version
        replicas = _intent_replicas()
        assert replicas

        client.deploy_apps(_config(models_dir, str(tmp_path / "intent-b")))
        deadline = time.monotonic() + 120
        version = old_version
        while version != new_version and time.monotonic() < deadline:
            time.sleep(1)
            version = _intent_version(url)
        assert version == new_version
        assert _intent_replicas() == replicas  # reconfigured in place, not replaced
    finally:
        serve.delete(APP)
