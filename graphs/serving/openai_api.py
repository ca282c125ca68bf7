"""OpenAI chat-completions compatibility: request checks and response shapes (plain functions).

The conversation's state lives in coact's session, not in the `messages` list: the last user message
is the turn; earlier messages are accepted and ignored. The session is named by the
`X-Coact-Session-Id` header, else by `user` when it is a valid session id; an unknown one starts a
new session under that id, and the answer carries it back (header and `coact.session_id`).
"""

from __future__ import annotations

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
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction")


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


def _responder_tokens(resp: ChatResponse) -> int:
    out = next((s.output for s in resp.trace.stages if s.stage == "responder"), {})
    return int(out.get("tokens", 0))


def completion(resp: ChatResponse, model: str) -> OpenAIChatCompletion:
    out = next((s.output for s in resp.trace.stages if s.stage == "responder"), {})
    tokens = _responder_tokens(resp)
    return OpenAIChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[OpenAIChoice(message=OpenAIAssistantMessage(content=resp.reply))],
        # Only the LM's generated tokens are counted: the rest of the reply is the decided template.
        usage=OpenAIUsage(completion_tokens=tokens, total_tokens=tokens),
        coact=CoactExtension(session_id=resp.session_id, action=resp.action, trace=resp.trace,
                             source=out.get("source"), guard=out.get("guard")),
    )


async def chunks(events: AsyncIterator[tuple[str, BaseModel]], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """coact's turn events as OpenAI `chat.completion.chunk` SSE lines, ending with `data: [DONE]`.

    OpenAI clients only append deltas, so a guard replacement cannot withdraw text: the decided
    content is appended instead (what was streamed before passed the guard), and the final chunk's
    `coact.reply` / `coact.replaced` carry the authoritative reply for clients that read them.
    """
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: OpenAIDelta, finish=None, coact: CoactExtension | None = None, usage=None, choices=True):
        return sse(None, OpenAIChatChunk(id=cid, created=created, model=model, usage=usage, coact=coact,
                                         choices=[OpenAIChunkChoice(delta=delta, finish_reason=finish)] if choices else []))

    streamed = ""
    try:
        async with aclosing(events):
            async for name, data in events:
                if name == "decision":
                    assert isinstance(data, ChatResponse)
                    yield chunk(OpenAIDelta(role="assistant", content=""),
                                coact=CoactExtension(session_id=data.session_id, action=data.action, trace=data.trace))
                elif name == "token":
                    assert isinstance(data, StreamText)
                    streamed += data.text
                    yield chunk(OpenAIDelta(content=data.text))
                elif name == "replace":
                    assert isinstance(data, StreamReplace)
                    if not data.reply.startswith(streamed):
                        extra = ("\n" if streamed else "") + data.reply
                        streamed += extra
                        yield chunk(OpenAIDelta(content=extra))
                elif name == "done":
                    assert isinstance(data, StreamDone)
                    tokens = _responder_tokens(data)
                    ext = CoactExtension(session_id=data.session_id, action=data.action, trace=data.trace,
                                         source=data.source, guard=data.guard, replaced=data.replaced, reply=data.reply)
                    yield chunk(OpenAIDelta(), finish="stop", coact=ext)
                    if include_usage:
                        yield chunk(OpenAIDelta(), usage=OpenAIUsage(completion_tokens=tokens, total_tokens=tokens),
                                    choices=False)
    except Exception as e:  # headers are sent: report in-band, as OpenAI does for mid-stream errors
        yield sse(None, error_body(f"internal error: {type(e).__name__}", kind="server_error"))
    yield b"data: [DONE]\n\n"
