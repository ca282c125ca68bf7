"""HTTP ingress: FastAPI routes, error mapping, and the handles to the four stages."""
# No `from __future__ import annotations` here: FastAPI resolves the route annotations at runtime.


import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from coact.actors.audit_log import MAX_ROWS, get_or_create_audit
from coact.actors.session_store import DEFAULT_TTL_S, get_or_create_store
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import MAX_MESSAGE_CHARS, ResponderChunk, ResponderRequest, SessionState
from coact.graphs.serving import openai_api
from coact.graphs.serving.http import (
    SESSION_ID_PATTERN,
    ChatRequest,
    ChatResponse,
    ExplainRequest,
    ExplainResponse,
    OpenAIChatCompletion,
    OpenAIChatRequest,
    OpenAIModelList,
    SessionView,
    StreamError,
)
from coact.graphs.serving.pipeline import (
    PreparedTurn,
    Stages,
    UnknownSession,
    complete_turn,
    prepare_turn,
    run_turn,
)
from coact.graphs.serving.streaming import sse, turn_events

MAX_BODY_BYTES = 16 * 1024  # a chat message is at most MAX_MESSAGE_CHARS; reject big bodies before parsing
RETRY_AFTER_S = "2"

app = FastAPI(
    title="coact",
    version="0.1.0",
    description="A conversational assistant whose actions are decided by a Bayesian policy and phrased by an LLM.",
)


def _error(status: int, error: str, detail=None, headers: dict | None = None) -> JSONResponse:
    body = {"error": error}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body, headers=headers)


def _is_openai(request: Request) -> bool:
    path = request.url.path.rstrip("/")
    return path.endswith("/v1/chat/completions") or path.endswith("/v1/models")


def _openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                  headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else ("server_error" if status == 500 else "overloaded_error")
    return JSONResponse(status_code=status, content=openai_api.error_body(message, param, code, kind), headers=headers)


def _error_for(request: Request, status: int, error: str, detail=None, headers: dict | None = None) -> JSONResponse:
    """coact's `{"error": str, "detail": …}` body, or OpenAI's `{"error": {"message": …}}` on its routes."""
    if _is_openai(request):
        param = detail[0]["field"] if isinstance(detail, list) and detail and "field" in detail[0] else None
        # OpenAI answers every invalid request with 400; keep 413 (size) and the rest as they are.
        return _openai_error(400 if status == 422 else status, error, param, headers=headers)
    return _error(status, error, detail, headers)


@app.middleware("http")
async def limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > MAX_BODY_BYTES
        except ValueError:
            return _error_for(request, 400, "invalid Content-Length header")
        if too_big:
            return _error_for(request, 413, f"request body too large: {length} bytes (limit {MAX_BODY_BYTES}; "
                               f"a message holds at most {MAX_MESSAGE_CHARS} characters)")
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": ".".join(str(x) for x in e["loc"] if x != "body"), "problem": e["msg"], "type": e["type"]}
              for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return _error_for(request, 400, "request body is not valid JSON", errors)
    if any(e["type"] == "string_too_long" for e in errors):
        return _error_for(request, 413, f"message too long: at most {MAX_MESSAGE_CHARS} characters", errors)
    fields = ", ".join(sorted({e["field"] or "body" for e in errors}))
    if _is_openai(request):
        first = errors[0]
        return _openai_error(400, f"invalid request: {first['field'] or 'body'}: {first['problem']}"
                                  + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), first["field"] or None,
                             first["type"])
    return _error(422, f"invalid request: {fields}", errors)


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_for(request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Still JSON, still naming the problem; the replica log has the traceback.
    return _error_for(request, 500, f"internal error: {type(exc).__name__}")


def _valid_session_id(session_id: str) -> bool:
    # Defined before the ingress class: @serve.ingress serialises the routes when it runs.
    return re.fullmatch(SESSION_ID_PATTERN, session_id) is not None


# The decision page (docs/web.md): a fixed allow-list of files, so no path from the URL reaches the disk.
WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


def _web_file(name: str) -> Response:
    if name not in WEB_FILES:
        return _error(404, f"unknown page file {name!r}: one of {sorted(WEB_FILES)}")
    return Response((WEB_DIR / name).read_bytes(), media_type=f"{WEB_FILES[name]}; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@dataclass(frozen=True)
class TurnFailure:
    """A turn that could not be answered (unknown session, overload), rendered by the route that ran it."""

    status: int
    error: str
    retry_after: str | None = None

    def response(self, openai: bool = False) -> JSONResponse:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        if openai:
            return _openai_error(self.status, self.error, headers=headers)
        return _error(self.status, self.error, headers=headers)


def _overloaded(what: str, retry_after_s: float | None = None) -> TurnFailure:
    retry = str(max(1, round(retry_after_s))) if retry_after_s else RETRY_AFTER_S
    return TurnFailure(503, f"overloaded: {what}; retry later", retry)


_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _retrying(handle: DeploymentHandle, attempts: int = 3, backoff_s: float = 0.25):
    """Call a stage, retrying when the replica died under the request.

    Safe because every stage is a pure function of its input (the session is written once, by the
    ingress, after all stages answered); a request that still fails maps to 503 + Retry-After.
    """
    async def call(arg):
        for attempt in range(attempts):
            try:
                return await handle.remote(arg)
            except _REPLICA_GONE:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(backoff_s * (attempt + 1))
    return call


@serve.deployment  # options from AppConfig.ingress.deployment at bind time (graphs/serving/app.py)
@serve.ingress(app)
class ChatIngress:
    def __init__(self, intent: DeploymentHandle, reasoner: DeploymentHandle, decision: DeploymentHandle,
                 responder: DeploymentHandle, actions: DeploymentHandle | None = None, domain: str = "banking",
                 session_ttl_s: float = DEFAULT_TTL_S, turn_timeout_s: float = 120.0,
                 audit_log: str | None = None) -> None:
        self.pack = load_pack(domain)
        self.store = get_or_create_store(session_ttl_s)
        self.audit = get_or_create_audit(audit_log)
        self.ttl_s = session_ttl_s
        self.turn_timeout_s = turn_timeout_s
        self.responder = responder
        self.intent = intent
        self.created = int(time.time())
        self.stages = Stages(
            intent=_retrying(intent),
            reason=_retrying(reasoner),
            decide=_retrying(decision),
            respond=_retrying(responder),
            load=self._load,
            save=self._save,
            # Retrying a call whose replica died is safe: the idempotency key makes the executor act once.
            execute=_retrying(actions) if actions is not None else None,
        )

    async def _load(self, session_id: str) -> dict | None:
        return await self.store.get.remote(session_id)

    async def _save(self, session_id: str, state: dict) -> None:
        await self.store.put.remote(session_id, state)

    async def _responder_stream(self, req: ResponderRequest) -> AsyncIterator[ResponderChunk]:
        # Handle streaming: a plain handle call cannot carry a stream between deployments (ray #57098).
        gen = self.responder.options(stream=True).stream.remote(req)
        try:
            async for chunk in gen:
                yield chunk
        finally:
            gen.cancel()  # the client left (or the turn ended early): stop generating in the Responder

    def _events(self, turn: PreparedTurn):
        return turn_events(self.stages, turn, self._responder_stream, unavailable=(BackPressureError, *_REPLICA_GONE))

    async def _prepare(self, body: ChatRequest, create_missing: bool = False) -> PreparedTurn | TurnFailure:
        """The turn up to the decision, with the same error mapping as a whole turn."""
        return await self._mapped(prepare_turn(self.stages, self.pack, body, create_missing), body)

    async def _mapped(self, turn: Awaitable, body: ChatRequest):
        """Await (part of) a turn under the turn timeout; known failures become a TurnFailure (404 / 503)."""
        try:
            return await asyncio.wait_for(turn, self.turn_timeout_s)
        except UnknownSession:
            return TurnFailure(404, f"unknown session_id {body.session_id!r}: it expired or never existed; "
                                    "omit session_id to start a new session")
        except BackPressureError as e:
            return _overloaded("a stage's request queue is full", getattr(e, "retry_after_s", None))
        except TimeoutError:
            return _overloaded(f"the turn did not finish within {self.turn_timeout_s:.0f} s")
        except _REPLICA_GONE:
            return _overloaded("a stage replica is restarting")

    async def _sse(self, turn: PreparedTurn) -> AsyncIterator[bytes]:
        try:
            async with aclosing(self._events(turn)) as events:
                async for name, data in events:
                    yield sse(name, data)
        except Exception as e:  # headers are sent: report in-band, as an event
            yield sse("error", StreamError(error=f"internal error: {type(e).__name__}"))

    @app.post("/v1/chat", response_model=ChatResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": "`stream: true`: server-sent events "
              "`decision`, `token`…, `replace` (guard), `done` (see docs/streaming-and-openai.md)"},
        400: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def chat(self, body: ChatRequest):
        if body.stream:
            turn = await self._prepare(body)
            if isinstance(turn, TurnFailure):
                return turn.response()
            return StreamingResponse(self._sse(turn), media_type="text/event-stream", headers=SSE_HEADERS)
        resp = await self._mapped(run_turn(self.stages, self.pack, body), body)
        return resp.response() if isinstance(resp, TurnFailure) else resp

    @app.post("/v1/explain", response_model=ExplainResponse, responses={400: {}, 413: {}, 422: {}, 503: {}})
    async def explain(self, body: ExplainRequest):
        """Token attributions (Integrated Gradients) for the intent model's decision on a message."""
        try:
            out = await asyncio.wait_for(self.intent.explain.remote(body.message, body.target, body.steps),
                                         self.turn_timeout_s)
        except BackPressureError as e:
            return _overloaded("the intent stage's request queue is full",
                               getattr(e, "retry_after_s", None)).response()
        except (TimeoutError, *_REPLICA_GONE):
            return _overloaded("the explanation did not finish").response()
        if out.get("busy"):
            return _overloaded("the intent replica is computing another explanation", 5.0).response()
        if "error" in out:
            return _error(422, f"invalid request: {out['field']}: {out['error']}",
                          [{"field": out["field"], "problem": out["error"], "type": "value_error"}])
        return ExplainResponse(**out)

    # --- OpenAI-compatible API -----------------------------------------------------------------

    @app.get("/v1/models", response_model=OpenAIModelList)
    async def openai_models(self):
        return openai_api.models(self.pack.name, self.created)

    @app.post("/v1/chat/completions", response_model=OpenAIChatCompletion, responses={
        200: {"content": {"text/event-stream": {}}, "description": "`stream: true`: chat.completion.chunk events"},
        400: {}, 404: {}, 413: {}, 503: {}})
    async def openai_chat(self, body: OpenAIChatRequest,
                          x_coact_session_id: str | None = Header(default=None, alias=openai_api.SESSION_HEADER)):
        try:
            message, session_id = openai_api.turn_input(body, self.pack.name, x_coact_session_id)
        except openai_api.OpenAIRequestError as e:
            return _openai_error(e.status, e.message, e.param, e.code)
        turn = await self._prepare(ChatRequest(message=message, session_id=session_id), create_missing=True)
        if isinstance(turn, TurnFailure):
            return turn.response(openai=True)
        headers = {openai_api.SESSION_HEADER: turn.session.session_id}
        model = openai_api.model_id(self.pack.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(openai_api.chunks(self._events(turn), model, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS | headers)
        try:  # a whole reply: the Responder's batched path, as for a plain /v1/chat turn
            resp = await asyncio.wait_for(complete_turn(self.stages, turn), self.turn_timeout_s)
        except BackPressureError as e:
            return _openai_error(503, "overloaded: the Responder's request queue is full; retry later",
                                 headers={"Retry-After": str(max(1, round(getattr(e, "retry_after_s", 0) or 2)))})
        except (TimeoutError, *_REPLICA_GONE):
            return _openai_error(503, "overloaded: the turn did not finish; retry later",
                                 headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(openai_api.completion(resp, model).model_dump(mode="json"), headers=headers)

    @app.get("/v1/sessions/{session_id}", response_model=SessionView, responses={404: {}, 422: {}})
    async def get_session(self, session_id: str):
        if not _valid_session_id(session_id):
            return _error(422, f"invalid session_id: must match {SESSION_ID_PATTERN}")
        raw = await self._load(session_id)
        if raw is None:
            return _error(404, f"unknown session_id {session_id!r}")
        return SessionView(session=SessionState.model_validate(raw), ttl_s=self.ttl_s)

    @app.delete("/v1/sessions/{session_id}", responses={404: {}, 422: {}})
    async def delete_session(self, session_id: str):
        if not _valid_session_id(session_id):
            return _error(422, f"invalid session_id: must match {SESSION_ID_PATTERN}")
        if not await self.store.delete.remote(session_id):
            return _error(404, f"unknown session_id {session_id!r}")
        return {"deleted": session_id}

    @app.get("/v1/audit", responses={422: {}})
    async def audit(self, session_id: str | None = None, limit: int = MAX_ROWS):
        """The audit log: every executed action with its decision and result, oldest first (operators)."""
        if session_id is not None and not _valid_session_id(session_id):
            return _error(422, f"invalid session_id: must match {SESSION_ID_PATTERN}")
        if not 1 <= limit <= MAX_ROWS:
            return _error(422, f"invalid limit: between 1 and {MAX_ROWS}")
        return {"entries": await self.audit.entries.remote(session_id, limit)}

    @app.get("/", include_in_schema=False)
    async def page(self):
        return _web_file("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def page_file(self, name: str):
        return _web_file(name)

    @app.get("/healthz")
    async def healthz(self):
        info = await self.store.info.remote()
        return {"status": "ok", "domain": f"{self.pack.name}@{self.pack.version}", **info}
