"""The OpenAI-compatible endpoint, driven by the official `openai` client against the running app."""

from __future__ import annotations

import uuid
from operator import itemgetter

import httpx
import pytest

from tests.helpers.data import require_module
from tests.helpers.serve import check_guard_verdict

openai = require_module("openai")  # a test dependency: skipped when absent, a failure in CI

pytestmark = pytest.mark.serve

MODEL = "coact-banking"
AMBIGUOUS = "I see a payment I don't recognise"


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def ext(obj) -> dict:
    return obj.model_extra["coact"]


def stream_text(url: str, messages: list[dict], **kwargs) -> tuple[str, list]:
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_list(app_url: str) -> None:
    ids = [m.id for m in client(app_url).models.list()]
    assert ids == [MODEL]


def test_completion_keeps_the_session_across_calls(app_url: str) -> None:
    sid = uuid.uuid4().hex
    c = client(app_url)
    history = [{"role": "user", "content": AMBIGUOUS}]
    first = c.chat.completions.create(model=MODEL, messages=history, user=sid)
    assert first.object == "chat.completion" and first.choices[0].finish_reason == "stop"
    reply = first.choices[0].message.content
    check_guard_verdict(AMBIGUOUS, reply, ext(first)["trace"])
    assert ext(first)["session_id"] == sid
    assert ext(first)["action"]["kind"] == "ask"
    decision = next(s for s in ext(first)["trace"]["stages"] if s["stage"] == "decision")["output"]
    assert decision["question"] in reply
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "yes"}]
    second = c.chat.completions.create(model=MODEL, messages=history, user=sid)
    assert ext(second)["action"] | {"executed": []} == {"kind": "action", "name": "freeze_card", "target": None, "executed": []}
    assert [r["status"] for r in ext(second)["action"]["executed"]] == ["done"]  # frozen on the action server
    assert "frozen" in second.choices[0].message.content
    assert second.usage.completion_tokens == ext(second)["trace"]["stages"][-1]["output"]["tokens"]
    session = httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).json()["session"]
    assert session["turns"] == 2 and session["history"][-1]["text"] == second.choices[0].message.content


def test_streaming_chunks_and_header_session(app_url: str) -> None:
    sid = uuid.uuid4().hex
    text, chunks = stream_text(app_url, [{"role": "user", "content": AMBIGUOUS}],
                               extra_headers={"X-Coact-Session-Id": sid}, stream_options={"include_usage": True})
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert ext(chunks[0])["action"]["kind"] == "ask" and ext(chunks[0])["session_id"] == sid
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    info = ext(final)
    assert final.choices[0].finish_reason == "stop"
    assert info["session_id"] == sid
    # The reply that was sent is the guard's verdict on what the LM wrote (source, guard and text agree).
    assert (info["source"], info["guard"]) == itemgetter("source", "guard")(info["trace"]["stages"][-1]["output"])
    check_guard_verdict(AMBIGUOUS, info["reply"], info["trace"])
    # OpenAI clients only append, so nothing that could be withdrawn was sent: the text is the reply.
    assert text == info["reply"], (text, info["reply"])
    assert chunks[-1].usage is not None and chunks[-1].choices == []  # include_usage: a last, empty chunk
    # More than the first and the last chunk: the reply arrived in pieces.
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    text2, _ = stream_text(app_url, [{"role": "user", "content": "yes"}], extra_headers={"X-Coact-Session-Id": sid})
    assert "frozen" in text2
    assert httpx.get(f"{app_url}/v1/sessions/{sid}", timeout=30).json()["session"]["turns"] == 2


def test_raw_sse_format(app_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}
    with httpx.stream("POST", f"{app_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-coact-session-id"]
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"model": "gpt-4o"}, 404, "gpt-4o"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "role 'user'"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
        ({"messages": [{"role": "user", "content": "x" * 2500}]}, 400, "too long"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "image_url"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"n": 2}, 400, "n=1"),
        ({"temperature": 7}, 400, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ],
)
def test_bad_requests_get_openai_errors(app_url: str, kwargs: dict, status: int, needle: str) -> None:
    args = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client(app_url).chat.completions.create(**args)
    err = info.value
    assert err.status_code == status, err
    assert needle in err.body["message"], err.body
    assert err.body["type"] == "invalid_request_error"


def test_bad_bodies_over_plain_http(app_url: str) -> None:
    url = f"{app_url}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"X-Coact-Session-Id": "../etc"}, timeout=60)
    assert r.status_code == 400 and "X-Coact-Session-Id" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * 20000, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]


# ---------------------------------------------------------------- real clients that resend the conversation

def test_conversation_resent_without_a_session_continues_it(app_url: str) -> None:
    """The SDK way: no header, no `user`, the whole conversation in `messages` every call."""
    c = client(app_url)
    system = {"role": "system", "content": f"You are the help desk of branch {uuid.uuid4().hex[:8]}."}
    history = [system, {"role": "user", "content": AMBIGUOUS}]
    first = c.chat.completions.create(model=MODEL, messages=history)
    assert ext(first)["action"]["kind"] == "ask"
    history += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "yes"}]
    second = c.chat.completions.create(model=MODEL, messages=history)
    assert ext(second)["session_id"] == ext(first)["session_id"]
    assert ext(second)["action"]["name"] == "freeze_card", ext(second)["action"]
    # streamed, a third turn continues it too
    history += [{"role": "assistant", "content": second.choices[0].message.content},
                {"role": "user", "content": "thanks bye"}]
    _, chunks = stream_text(app_url, history)
    assert ext(chunks[0])["session_id"] == ext(first)["session_id"]
    session = httpx.get(f"{app_url}/v1/sessions/{ext(first)['session_id']}", timeout=30).json()["session"]
    assert session["turns"] == 3


def test_two_conversations_with_the_same_messages_never_share_a_session(app_url: str) -> None:
    c = client(app_url)
    opening = [{"role": "system", "content": f"Branch {uuid.uuid4().hex[:8]}."}, {"role": "user", "content": AMBIGUOUS}]
    a = c.chat.completions.create(model=MODEL, messages=opening)
    b = c.chat.completions.create(model=MODEL, messages=opening)
    assert ext(a)["session_id"] != ext(b)["session_id"]
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy: the same answer
    follow = opening + [{"role": "assistant", "content": a.choices[0].message.content},
                        {"role": "user", "content": "yes"}]
    third = c.chat.completions.create(model=MODEL, messages=follow)
    # the name is ambiguous: a new session, not someone else's (pass `user` to keep sessions apart)
    assert ext(third)["session_id"] not in (ext(a)["session_id"], ext(b)["session_id"])
    for first in (a, b):
        session = httpx.get(f"{app_url}/v1/sessions/{ext(first)['session_id']}", timeout=30).json()["session"]
        assert session["turns"] == 1


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": 0.7}, "temperature"), ({"top_p": 0.5}, "top_p"), ({"stop": ["\n"]}, "stop"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": -1}, "presence_penalty"),
    ({"logprobs": True}, "logprobs"),
])
def test_sampling_parameters_it_cannot_honour_are_refused_by_name(app_url: str, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(app_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert info.value.body["param"] == param and param in info.value.body["message"]


def test_greedy_values_seed_and_max_tokens_are_honoured(app_url: str) -> None:
    c = client(app_url)
    messages = [{"role": "user", "content": "why was I charged a fee at the cash machine?"}]
    free = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, top_p=1, seed=7)
    out = ext(free)["trace"]["stages"][-1]["output"]
    assert free.usage.completion_tokens == out["tokens"] and free.usage.prompt_tokens == out["prompt_tokens"]
    assert free.usage.total_tokens == out["tokens"] + out["prompt_tokens"]
    assert out["prompt_tokens"] > 50  # the LM read the system prompt, the examples and the message
    capped = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    capped_out = ext(capped)["trace"]["stages"][-1]["output"]
    assert 1 <= capped_out["tokens"] <= 2 and capped.usage.completion_tokens == capped_out["tokens"]
    decided = next(s for s in ext(capped)["trace"]["stages"] if s["stage"] == "decision")["output"]
    clause = decided.get("reason_clause")
    assert clause is None or clause["clause"] in capped.choices[0].message.content  # the decided content is whole


def test_langchain_chat_openai(app_url: str) -> None:
    lc = require_module("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage

    llm = lc.ChatOpenAI(model=MODEL, base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=300)
    first = llm.invoke([HumanMessage(AMBIGUOUS)])
    assert "?" in first.content  # the clarifying question
    second = llm.invoke([HumanMessage(AMBIGUOUS), AIMessage(first.content), HumanMessage("yes")])
    assert "frozen" in second.content, second.content
    streamed = "".join(chunk.content for chunk in llm.stream([HumanMessage("what is the limit for top-ups?")]))
    assert streamed.strip()


def test_a_stream_never_withdraws_text_from_an_openai_client(serve_app) -> None:
    """opener_first streams the model's opener before the guard's verdict; the scripted backend's opener names
    nothing the customer said, so the guard replaces it at the end. coact's own stream shows the `replace`;
    an OpenAI client, which can only append, never received the withdrawn opener."""
    url = serve_app("oai-opener", {"responder": {"backend": "scripted", "layout": "opener_first"}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": AMBIGUOUS}], "stream": True}
    events = httpx.post(f"{url}/v1/chat", json={"message": AMBIGUOUS, "stream": True}, timeout=120).text
    assert "event: replace" in events  # the opener was withdrawn on coact's own route
    text, chunks = stream_text(url, body["messages"])
    info = ext(next(c for c in chunks if c.choices and c.choices[0].finish_reason))
    assert info["replaced"] and info["source"] == "template"
    assert text == info["reply"], (text, info["reply"])
