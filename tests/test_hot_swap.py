"""A new intent model folder reaches the running replicas through Serve's user_config, no redeploy."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.serve import replicas

pytestmark = pytest.mark.serve

APP = "coact-swap"


def _intent_version(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat", json={"message": "How do I top up by card?"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["trace"]["model_versions"]["intent"]


def test_intent_model_hot_swap(serve_app, models_dir: Path, tmp_path: Path) -> None:
    from coact.actors.models import read_meta
    from coact.cluster.jobs import train_intent

    # A genuinely different model: a frozen-encoder head trained on a small sample.
    train_intent.main(["--mode", "frozen", "--train-per-class", "20", "--val-per-class", "5", "--epochs", "2",
                       "--no-test", "--no-progress", "--output", str(tmp_path / "run"),
                       "--model-out", str(tmp_path / "intent-b")])
    new_version = read_meta(tmp_path / "intent-b")["version"]
    old_version = read_meta(models_dir / "intent")["version"]
    assert new_version != old_version

    # Deployed from a Serve config, as `serve deploy` does.
    url = serve_app(APP, {"responder": {"generate": False}}, deployments=[])
    assert _intent_version(url) == old_version
    before = replicas(APP, "IntentActor")
    assert before

    # What an operator edits in the config file before `serve deploy`: the code version (import path,
    # runtime env, args) is unchanged, so Serve calls `reconfigure` on the live replicas.
    serve_app(APP, {"responder": {"generate": False}}, deployments=[{"name": "IntentActor",
                                                      "user_config": {"intent_model": str(tmp_path / "intent-b")}}])
    deadline = time.monotonic() + 120
    version = old_version
    while version != new_version and time.monotonic() < deadline:
        time.sleep(1)
        version = _intent_version(url)
    assert version == new_version
    assert replicas(APP, "IntentActor") == before  # reconfigured in place, not replaced
