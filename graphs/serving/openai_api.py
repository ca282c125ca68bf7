"""OpenAI chat-completions compatibility: request checks and response shapes (plain functions).

The conversation's state lives in coact's session; the last user message is the turn. The session is named
by the `X-Coact-Session-Id` header, else by `user` when it is a valid session id (an unknown one starts a new
session under that id), else — a client that resends the whole conversation in `messages`, as the SDKs do —
by the conversation itself: every answer registers the hash of the conversation up to and including it
(`conversation_key`), so the next request, whose earlier messages are exactly that conversation, continues
the same session. Two conversations with the same messages (the same opening and, the LM being greedy, the
same answer) cannot be told apart: that name then continues neither (the store marks it ambiguous), and the next call starts a
new session rather than risk joining someone else's — clients serving several people pass `user`. The answer
carries the session back (header and `coact.session_id`).

Sampling: the LM decodes greedily (deterministic, and what the guard was measured on), so `temperature` and
`top_p` other than their greedy values, penalties, `stop`, `logit_bias` and `logprobs` are refused with a 400
naming the parameter; `seed` is accepted (greedy decoding is deterministic); `max_tokens` /
`max_completion_tokens` cap the tokens the LM generates (its acknowledgement): the decided content is always
sent whole. `usage` counts the tokens of the prompt the LM read and of what it generated (both 0 for a reply
that is a template only).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from coact.graphs.policy.messages import MAX_MESSAGE_CHARS
from coact.graphs.serving.http import (
    SESSION_ID_PATTERN,
    ChatResponse,
    CoactExtension,
    OpenAIAssistantMessage,
    OpenAIChatChunk,
    OpenAIChatCompletion,
    OpenAIChatRequest,
    OpenAIChoice,
    OpenAIChunkChoice,
    OpenAIDelta,
    OpenAIModel,
    OpenAIModelList,
    OpenAIUsage,
    StreamDone,
    StreamReplace,
    StreamText,
)
from coact.graphs.serving.streaming import sse

SESSION_HEADER = "X-Coact-Session-Id"
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction", "logit_bias",
               "logprobs", "top_logprobs")
CONVERSATION_PREFIX = "conv:"  # store ids of conversation aliases; ':' keeps them out of every session id


class OpenAIRequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_id(domain: str) -> str:
    return f"coact-{domain}"


def models(domain: str, created: int) -> OpenAIModelList:
    return OpenAIModelList(data=[OpenAIModel(id=model_id(domain), created=created)])


def turn_input(req: OpenAIChatRequest, domain: str, header_session: str | None) -> tuple[str, str | None]:
    """(the user's message, the session id or None) — or an OpenAIRequestError naming the problem."""
    if req.model != model_id(domain):
        raise OpenAIRequestError(404, f"The model `{req.model}` does not exist; this server serves "
                                      f"`{model_id(domain)}` (see GET /v1/models)", "model", "model_not_found")
    for name in UNSUPPORTED:
        if (req.model_extra or {}).get(name):
            raise OpenAIRequestError(400, f"`{name}` is not supported: coact's policy decides the actions",
                                     name, "unsupported_parameter")
    if req.n not in (None, 1):
        raise OpenAIRequestError(400, "only n=1 is supported", "n", "unsupported_value")
    check_sampling(req)
    last = req.messages[-1]
    param = f"messages[{len(req.messages) - 1}]"
    if last.role != "user":
        raise OpenAIRequestError(400, f"the last message must have role 'user' (got {last.role!r})",
                                 f"{param}.role", "invalid_value")
    if isinstance(last.content, list):
        kinds = sorted({p.type for p in last.content if p.type != "text"})
        if kinds:
            raise OpenAIRequestError(400, f"only text content is supported (got {', '.join(kinds)})",
                                     f"{param}.content", "invalid_value")
        text = " ".join(p.text or "" for p in last.content)
    else:
        text = last.content or ""
    text = text.strip()
    if not text:
        raise OpenAIRequestError(400, "the last user message is empty", f"{param}.content", "invalid_value")
    if len(text) > MAX_MESSAGE_CHARS:
        raise OpenAIRequestError(400, f"the last user message is too long: {len(text)} characters "
                                      f"(at most {MAX_MESSAGE_CHARS})", f"{param}.content", "string_above_max_length")
    session = header_session or req.user
    if header_session is not None and not re.fullmatch(SESSION_ID_PATTERN, header_session):
        raise OpenAIRequestError(400, f"invalid {SESSION_HEADER} header: must match {SESSION_ID_PATTERN}",
                                 SESSION_HEADER, "invalid_value")
    if session is not None and not re.fullmatch(SESSION_ID_PATTERN, session):
        session = None  # a free-form `user` (an e-mail, say) is not a session id: start a new session
    return text, session


GREEDY = {"temperature": (0.0, "0"), "top_p": (1.0, "1"), "presence_penalty": (0.0, "0"),
          "frequency_penalty": (0.0, "0")}


def check_sampling(req: OpenAIChatRequest) -> None:
    """Refuse, naming it, every sampling parameter the greedy, guard-checked LM would not honour."""
    for name, (greedy, shown) in GREEDY.items():
        value = getattr(req, name)
        if value is not None and value != greedy:
            raise OpenAIRequestError(400, f"`{name}`={value} is not supported: coact's LM phrases the decided "
                                          f"reply greedily (deterministic, checked by the guard); omit it or send "
                                          f"{shown}", name, "unsupported_value")
    if req.stop:
        raise OpenAIRequestError(400, "`stop` is not supported: the reply carries decided content that is sent "
                                      "whole", "stop", "unsupported_parameter")


def max_new_tokens(req: OpenAIChatRequest) -> int | None:
    """The caller's cap on generated tokens (`max_completion_tokens` wins over the older `max_tokens`)."""
    cap = req.max_completion_tokens or req.max_tokens
    return None if cap is None else min(int(cap), 512)


def _text(content) -> str:
    if isinstance(content, list):
        return " ".join(p.text or "" for p in content if p.type == "text").strip()
    return (content or "").strip()


def conversation_key(messages: list, reply: str | None = None) -> str | None:
    """The store id naming a conversation so far: its system, user and assistant messages (and `reply`, the
    answer just given, as the next assistant message). None for a conversation with no assistant message yet,
    which names nothing to continue."""
    turns = [(m.role, _text(m.content)) for m in messages if m.role in ("system", "developer", "user", "assistant")]
    if reply is not None:
        turns.append(("assistant", reply.strip()))
    if not any(role == "assistant" for role, _ in turns):
        return None
    digest = hashlib.sha256(json.dumps(turns, separators=(",", ":")).encode("utf-8")).hexdigest()
    return CONVERSATION_PREFIX + digest[:40]


def _responder_output(resp: ChatResponse) -> dict:
    return next((s.output for s in resp.trace.stages if s.stage == "responder"), {})


def usage_of(resp: ChatResponse) -> OpenAIUsage:
    """The LM's tokens: the prompt it read and what it generated (a template-only reply used none)."""
    out = _responder_output(resp)
    prompt, completion_tokens = int(out.get("prompt_tokens", 0)), int(out.get("tokens", 0))
    return OpenAIUsage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                       total_tokens=prompt + completion_tokens)


def completion(resp: ChatResponse, model: str) -> OpenAIChatCompletion:
    out = _responder_output(resp)
    return OpenAIChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[OpenAIChoice(message=OpenAIAssistantMessage(content=resp.reply))],
        usage=usage_of(resp),
        coact=CoactExtension(session_id=resp.session_id, action=resp.action, trace=resp.trace,
                             source=out.get("source"), guard=out.get("guard")),
    )


async def chunks(events: AsyncIterator[tuple[str, BaseModel]], model: str, include_usage: bool,
                 on_done=None) -> AsyncIterator[bytes]:
    """coact's turn events as OpenAI `chat.completion.chunk` SSE lines, ending with `data: [DONE]`.

    OpenAI clients only append deltas, so nothing sent may be withdrawn: text the guard could still replace
    (`token` events not marked `final`, the `opener_first` layout's opener) is held back until the turn is
    done and sent only if no `replace` came; decided content is sent at once. `on_done(StreamDone)` runs
    before the last chunk (the ingress registers the conversation there).
    """
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: OpenAIDelta, finish=None, coact: CoactExtension | None = None, usage=None, choices=True):
        return sse(None, OpenAIChatChunk(id=cid, created=created, model=model, usage=usage, coact=coact,
                                         choices=[OpenAIChunkChoice(delta=delta, finish_reason=finish)] if choices else []))

    streamed, held = "", ""
    try:
        async with aclosing(events):
            async for name, data in events:
                if name == "decision":
                    assert isinstance(data, ChatResponse)
                    yield chunk(OpenAIDelta(role="assistant", content=""),
                                coact=CoactExtension(session_id=data.session_id, action=data.action, trace=data.trace))
                elif name == "token":
                    assert isinstance(data, StreamText)
                    if not data.final:
                        held += data.text
                        continue
                    text, held = held + data.text, ""  # final text vouches for what came before it
                    streamed += text
                    yield chunk(OpenAIDelta(content=text))
                elif name == "replace":
                    assert isinstance(data, StreamReplace)
                    held = ""  # withdrawn before it reached the client
                    if not data.reply.startswith(streamed):  # only if decided content was already sent
                        extra = ("\n" if streamed else "") + data.reply
                        streamed += extra
                        yield chunk(OpenAIDelta(content=extra))
                    elif data.reply[len(streamed):]:
                        text = data.reply[len(streamed):]
                        streamed += text
                        yield chunk(OpenAIDelta(content=text))
                elif name == "done":
                    assert isinstance(data, StreamDone)
                    if held:
                        streamed += held
                        yield chunk(OpenAIDelta(content=held))
                        held = ""
                    if on_done is not None:
                        await on_done(data)
                    ext = CoactExtension(session_id=data.session_id, action=data.action, trace=data.trace,
                                         source=data.source, guard=data.guard, replaced=data.replaced, reply=data.reply)
                    yield chunk(OpenAIDelta(), finish="stop", coact=ext)
                    if include_usage:
                        yield chunk(OpenAIDelta(), usage=usage_of(data), choices=False)
    except Exception as e:  # headers are sent: report in-band, as OpenAI does for mid-stream errors
        yield sse(None, error_body(f"internal error: {type(e).__name__}", kind="server_error"))
    yield b"data: [DONE]\n\n"
