"""Liveness (/healthz) and readiness (/readyz): docs/operations.md.

The aggregation (graphs/serving/readiness.py) with real probes (coroutines that answer, fail, hang or answer
nonsense); the Responder engine's warm-up state on the real scripted backend; and /readyz of the session's app
over HTTP with every stage ready.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from coact.graphs.serving import readiness

pytestmark = pytest.mark.unit

STAGES = ("intent", "reasoner", "decision", "responder", "actions")


def _answer(ready: bool, detail: object = None):
    async def probe():
        await asyncio.sleep(0)
        return {"ready": ready, "detail": detail}
    return probe


def _hang():
    async def probe():
        await asyncio.sleep(3600)
    return probe


def _fail(exc: Exception):
    async def probe():
        raise exc
    return probe


def _store_info():
    async def probe():
        return {"ready": True, "detail": {"backend": "embedded", "sessions": 0}}
    return probe


def test_all_ready_is_ready() -> None:
    body = asyncio.run(readiness.check({s: _answer(True, {"stage": s}) for s in STAGES}, _store_info()))
    assert body["ready"] is True
    assert list(body["stages"]) == list(STAGES)
    assert all(body["stages"][s] == {"ready": True, "detail": {"stage": s}} for s in STAGES)
    assert body["store"] == {"ready": True, "detail": {"backend": "embedded", "sessions": 0}}
    assert readiness.http_status(body) == (200, {})


def test_one_stage_not_ready_is_not_ready() -> None:
    probes = {s: _answer(True) for s in STAGES} | {"responder": _answer(False, {"warm_up": "running"})}
    body = asyncio.run(readiness.check(probes, _store_info()))
    assert body["ready"] is False
    assert body["stages"]["responder"] == {"ready": False, "detail": {"warm_up": "running"}}
    assert all(body["stages"][s]["ready"] for s in STAGES if s != "responder")
    status, headers = readiness.http_status(body)
    assert status == 503 and headers == {"Retry-After": readiness.RETRY_AFTER_S}


def test_a_hung_stage_times_out_and_the_probe_does_not_hang() -> None:
    probes = {s: _answer(True) for s in STAGES} | {"intent": _hang(), "reasoner": _hang()}
    t0 = time.monotonic()
    body = asyncio.run(readiness.check(probes, _store_info(), timeout_s=0.3))
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, elapsed  # concurrent: about one timeout, not one per hung stage
    assert body["ready"] is False
    for s in ("intent", "reasoner"):
        assert body["stages"][s] == {"ready": False, "detail": "no answer within 0.3 s"}
    assert body["stages"]["decision"]["ready"] is True


def test_a_failing_stage_or_store_is_not_ready_with_the_error() -> None:
    probes = {s: _answer(True) for s in STAGES} | {"decision": _fail(RuntimeError("replica died"))}
    body = asyncio.run(readiness.check(probes, _fail(ConnectionError("redis down"))))
    assert body["ready"] is False
    assert body["stages"]["decision"] == {"ready": False, "detail": "RuntimeError: replica died"}
    assert body["store"] == {"ready": False, "detail": "ConnectionError: redis down"}


def test_store_alone_not_ready_is_not_ready() -> None:
    body = asyncio.run(readiness.check({s: _answer(True) for s in STAGES}, _hang(), timeout_s=0.1))
    assert body["ready"] is False and all(v["ready"] for v in body["stages"].values())
    assert body["store"]["ready"] is False


def test_odd_answers_and_no_stages_are_not_ready() -> None:
    async def none():
        return None

    async def truthy_string():
        return {"ready": "yes"}

    body = asyncio.run(readiness.check({"intent": none, "reasoner": truthy_string}, _store_info()))
    assert body["ready"] is False
    assert body["stages"]["intent"]["ready"] is False and "unexpected answer" in body["stages"]["intent"]["detail"]
    assert body["stages"]["reasoner"]["ready"] is False
    assert asyncio.run(readiness.check({}, _store_info()))["ready"] is False


@pytest.mark.models
def test_responder_engine_is_ready_after_its_warm_up(models_dir) -> None:
    # The real engine on the scripted backend (the LM's tokenizer, no weights): not ready until the warm-up
    # generation ran, then ready with its time; without generation ready at once.
    from coact.actors.config import ResponderConfig
    from coact.actors.engines import ResponderEngine

    engine = ResponderEngine(ResponderConfig(backend="scripted"), models=models_dir)

    async def scenario() -> tuple[dict, dict, dict]:
        first = engine.readiness()  # no loop at construction: this call starts the warm-up
        again = engine.readiness()
        await engine._warm
        return first, again, engine.readiness()

    first, again, done = asyncio.run(scenario())
    assert first["ready"] is False and first["detail"]["warm_up"] == "warm-up started"
    assert again["ready"] is False and again["detail"]["warm_up"] == "running"
    assert done["ready"] is True and done["detail"]["warm_up_ms"] >= 0 and done["detail"]["backend"] == "scripted"
    assert engine.stats.streams_started == 0  # the warm-up is not a user stream

    templates = ResponderEngine(ResponderConfig(backend="scripted", generate=False), models=models_dir)
    assert templates.readiness() == {"ready": True, "detail": {"backend": "scripted", "model": templates.version,
                                                               "generate": False}}


@pytest.mark.serve
def test_readyz_of_the_shared_app_is_ready_with_every_stage(app_url: str) -> None:
    import httpx

    from tests.helpers.serve import wait_for

    # The app is healthy (deploy waited for /healthz); the Responder's warm-up may still be running.
    def ready():
        r = httpx.get(f"{app_url}/readyz", timeout=10)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.headers["retry-after"] == readiness.RETRY_AFTER_S
        return r if r.status_code == 200 else None

    r = wait_for(ready, timeout_s=120)
    body = r.json()
    assert body["ready"] is True
    assert set(body["stages"]) == set(STAGES)
    for name, stage in body["stages"].items():
        assert stage["ready"] is True, (name, stage)
        assert stage["detail"], (name, stage)
    assert body["stages"]["intent"]["detail"]["warm_up_ms"] > 0
    assert body["stages"]["reasoner"]["detail"]["warm_up_ms"] > 0
    assert body["stages"]["responder"]["detail"]["generate"] is True
    assert body["stages"]["responder"]["detail"]["warm_up_ms"] > 0
    assert body["store"]["ready"] is True and "backend" in body["store"]["detail"]
    # Liveness stays the cheap check it was.
    assert httpx.get(f"{app_url}/healthz", timeout=10).json()["status"] == "ok"


def test_rayservice_worker_pods_are_ready_on_readyz() -> None:
    # Worker pods: readiness is the app's /readyz through the pod's Serve proxy; the head and every liveness
    # probe stay KubeRay's own (docs/operations.md says why).
    from pathlib import Path

    import yaml

    manifest = Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / "rayservice.yaml"
    cluster = yaml.safe_load(manifest.read_text())["spec"]["rayClusterConfig"]
    serve_port = yaml.safe_load(yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"])["http_options"]["port"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "readinessProbe" not in head and "livenessProbe" not in head
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": serve_port}, group["groupName"]
        assert probe["timeoutSeconds"] > readiness.PROBE_TIMEOUT_S  # /readyz answers within about one probe timeout
        assert "livenessProbe" not in container, group["groupName"]
