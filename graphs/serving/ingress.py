"""HTTP ingress: FastAPI routes, error mapping, and the handles to the four stages."""
# No `from __future__ import annotations` here: FastAPI resolves the route annotations at runtime.


import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from coact.actors.audit_log import MAX_ROWS, get_or_create_audit
from coact.actors.config import SessionsConfig
from coact.actors.session_backends import SessionConflict, StoreUnavailable
from coact.actors.session_store import DEFAULT_TTL_S, open_store
from coact.graphs.policy.domain import load_pack
from coact.graphs.policy.messages import MAX_MESSAGE_CHARS, ResponderChunk, ResponderRequest
from coact.graphs.serving import openai_api, readiness
from coact.graphs.serving.auth import (
    ANONYMOUS,
    Authenticator,
    caller,
    caller_max_sessions,
    configure_gate,
    cors_allowed,
    gate_authenticator,
    load_keys,
    set_caller,
)
from coact.graphs.serving.http import (
    SESSION_ID_PATTERN,
    AuthConfig,
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
from coact.graphs.serving.metrics import ingress_metrics
from coact.graphs.serving.pipeline import (
    KeyReused,
    PreparedTurn,
    Replayed,
    SessionLocks,
    Stages,
    UnknownSession,
    complete_turn,
    prepare_turn,
    run_turn,
    session_of,
)
from coact.graphs.serving.streaming import replay_events, sse, turn_events

MAX_BODY_BYTES = 16 * 1024  # a chat message is at most MAX_MESSAGE_CHARS; reject big bodies before parsing
RETRY_AFTER_S = "2"
# Idempotency-Key on the chat routes (docs/sessions.md): a retried turn with the same key on the same session
# answers the first turn's response instead of applying it again.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
SESSION_PATH = PathParam(pattern=SESSION_ID_PATTERN, description="a session id, as returned by a turn")

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
    elif request.method in ("POST", "PUT", "PATCH"):  # chunked: count while reading, stop at the limit
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return _error_for(request, 413, f"request body too large: over {MAX_BODY_BYTES} bytes (chunked; "
                                   f"a message holds at most {MAX_MESSAGE_CHARS} characters)")
            chunks.append(chunk)
        request._body = b"".join(chunks)  # what the route reads (Starlette replays a body read here)
    return await call_next(request)


# --- API keys, rate limits, CORS (graphs/serving/auth.py, docs/security.md) -------------------------------
# Middleware is fixed when the module is imported, the keys only when a replica starts: the replica's
# ChatIngress configures the gate, and each request's caller travels to the store calls (auth.caller()).
# Probes and the static page carry no data and are open; everything else needs a key (when keys exist).
OPEN_PATHS = ("/healthz", "/readyz", "/", "/web/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _relative_path(request: Request) -> str:
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/web/")


def _cors_headers(request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    if not cors_allowed(origin):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": f"Retry-After, {openai_api.SESSION_HEADER}"}


@app.middleware("http")
async def gate(request: Request, call_next):
    cors = _cors_headers(request)
    if request.method == "OPTIONS" and cors and request.headers.get("access-control-request-method"):
        return Response(status_code=204, headers=cors | {
            "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key, "
                                            f"{openai_api.SESSION_HEADER}",
            "Access-Control-Max-Age": "600"})
    if not _is_open(_relative_path(request)):
        verdict = gate_authenticator().check(request.headers.get("authorization"),
                                     request.client.host if request.client else None)
        if not verdict.ok:
            ingress_metrics().refused(verdict.status, "rate limit" if verdict.status == 429 else "auth")
            return _error_for(request, verdict.status, verdict.error, headers=verdict.headers | cors)
        set_caller(verdict.owner or ANONYMOUS, verdict.max_sessions)
    response = await call_next(request)
    response.headers.update(cors)
    return response


def store_id(session_id: str) -> str:
    """The store's key of a session: the caller's sessions are theirs alone (another key's id is not found)."""
    owner = caller()
    return session_id if owner == ANONYMOUS else f"{owner}:{session_id}"


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
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names the first matching route's methods; a path may have several
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _error_for(request, exc.status_code, str(exc.detail), headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        for method in getattr(route, "methods", None) or ():
            if route.matches({**request.scope, "method": method})[0] == Match.FULL:
                methods.add(method)
    return sorted(methods)


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Still JSON, still naming the problem; the replica log has the traceback.
    return _error_for(request, 500, f"internal error: {type(exc).__name__}")


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
        ingress_metrics().refused(self.status, self.error.split(":", 1)[0][:40])
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


def _ready_probe(handle: DeploymentHandle):
    async def probe():
        return await handle.ready.remote()
    return probe


class TooManySessions(Exception):
    """A key at its cap of live sessions tried to start another."""


async def _counted(events, route: str):
    """The turn's events, unchanged; the finished turn is counted (graphs/serving/metrics.py)."""
    async with aclosing(events):
        async for name, data in events:
            if name == "done":
                ingress_metrics().turn(data, route)
            yield name, data


@serve.deployment  # options from AppConfig.ingress.deployment at bind time (graphs/serving/app.py)
@serve.ingress(app)
class ChatIngress:
    def __init__(self, intent: DeploymentHandle, reasoner: DeploymentHandle, decision: DeploymentHandle,
                 responder: DeploymentHandle, actions: DeploymentHandle | None = None, domain: str = "banking",
                 session_ttl_s: float = DEFAULT_TTL_S, turn_timeout_s: float = 120.0,
                 audit_log: str | None = None, sessions: SessionsConfig | None = None,
                 auth: AuthConfig | None = None) -> None:
        self.pack = load_pack(domain)
        auth = auth or AuthConfig()
        configure_gate(Authenticator(load_keys(auth.keys_file), auth.rate_per_s, auth.burst, auth.max_sessions),
                       auth.cors_origins)
        try:
            ingress_metrics(serve.get_replica_context().app_name)  # metrics tagged with this app's name
        except Exception:  # noqa: BLE001 - constructed outside a replica (tests of the class): default tag
            ingress_metrics()
        sessions = sessions or SessionsConfig(ttl_s=session_ttl_s)
        self.store = open_store(sessions)  # a SessionBackend: embedded actor or Redis (docs/sessions.md)
        self.locks = SessionLocks()
        self.audit = get_or_create_audit(audit_log)
        self.ttl_s = sessions.ttl_s
        self.turn_timeout_s = turn_timeout_s
        self.responder = responder
        self.intent = intent
        self.created = int(time.time())
        # GET /readyz asks each stage its ready() directly (not through _retrying: a probe must not wait).
        self.ready_handles = {"intent": intent, "reasoner": reasoner, "decision": decision, "responder": responder,
                              **({"actions": actions} if actions is not None else {})}
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

    async def _load(self, session_id: str) -> tuple[int, dict] | None:
        return await self.store.get(store_id(session_id))

    async def _save(self, session_id: str, state: dict, expected_version: int) -> int:
        if not expected_version:  # a new session of a key: within its cap (checked again where it is saved)
            await self._check_session_cap()
        return await self.store.put(store_id(session_id), state, expected_version)  # SessionConflict: 409

    async def _check_session_cap(self) -> None:
        cap = caller_max_sessions()
        if cap is None:
            return
        live = await self.store.count(f"{caller()}:", exclude=openai_api.CONVERSATION_PREFIX)
        if live >= cap:
            raise TooManySessions(f"key {caller()!r} has {live} live sessions (at most {cap}): end one "
                                  "(DELETE /v1/sessions/{id}) or wait for one to expire")

    async def _at_session_cap(self) -> TurnFailure | None:
        """Before a turn that starts a session: 429 when the key is at its cap."""
        try:
            await self._check_session_cap()
        except TooManySessions as e:
            return TurnFailure(429, f"too many sessions: {e}", str(max(1, round(self.ttl_s / 10))))
        except StoreUnavailable:
            return _overloaded("the session store is unavailable")
        return None

    async def _responder_stream(self, req: ResponderRequest) -> AsyncIterator[ResponderChunk]:
        # Handle streaming: a plain handle call cannot carry a stream between deployments (ray #57098).
        gen = self.responder.options(stream=True).stream.remote(req)
        try:
            async for chunk in gen:
                yield chunk
        finally:
            gen.cancel()  # the client left (or the turn ended early): stop generating in the Responder

    def _events(self, turn: PreparedTurn | ChatResponse, route: str = "chat"):
        if isinstance(turn, ChatResponse):  # a keyed turn applied before: its stored response, as events
            return replay_events(turn)
        events = turn_events(self.stages, turn, self._responder_stream, unavailable=(BackPressureError, *_REPLICA_GONE))
        return _counted(events, route)

    async def _prepare(self, body: ChatRequest, create_missing: bool = False,
                       idempotency_key: str | None = None) -> PreparedTurn | ChatResponse | TurnFailure:
        """The turn up to the decision, with the same error mapping as a whole turn (a replayed key: its response)."""
        return await self._mapped(prepare_turn(self.stages, self.pack, body, create_missing, idempotency_key), body)

    async def _in_order(self, session_id: str | None, turn):
        """Run `turn()` after the turns on this session that arrived before it (this replica; CAS across them)."""
        async with self.locks.hold(session_id):
            return await turn()

    async def _mapped(self, turn: Awaitable, body: ChatRequest):
        """Await (part of) a turn under the turn timeout; known failures become a TurnFailure (404/409/422/503)."""
        try:
            return await asyncio.wait_for(turn, self.turn_timeout_s)
        except Replayed as r:
            return r.response
        except KeyReused as e:
            return TurnFailure(422, f"invalid {IDEMPOTENCY_HEADER} header: {str(e)!r} was already used on this "
                                    "session for another message")
        except TooManySessions as e:
            return TurnFailure(429, f"too many sessions: {e}", str(max(1, round(self.ttl_s / 10))))
        except SessionConflict as e:
            ingress_metrics().store_error("conflict")
            return TurnFailure(409, f"conflict: {e}; nothing of this turn was saved: load the session and resend")
        except StoreUnavailable:
            ingress_metrics().store_error("unavailable")
            return _overloaded("the session store is unavailable")
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
        except TooManySessions as e:  # headers are sent: report in-band, as an event
            yield sse("error", StreamError(error=f"too many sessions: {e}"))
        except SessionConflict as e:
            yield sse("error", StreamError(error=f"conflict: {e}; nothing of this turn was saved"))
        except StoreUnavailable:
            yield sse("error", StreamError(error="overloaded: the session store is unavailable; retry later"))
        except Exception as e:
            yield sse("error", StreamError(error=f"internal error: {type(e).__name__}"))

    @app.post("/v1/chat", response_model=ChatResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": "`stream: true`: server-sent events "
              "`decision`, `token`…, `replace` (guard), `done` (see docs/streaming-and-openai.md)"},
        400: {}, 404: {}, 409: {}, 413: {}, 422: {}, 503: {}})
    async def chat(self, body: ChatRequest, idempotency_key: str | None = Header(
            default=None, alias=IDEMPOTENCY_HEADER, pattern=IDEMPOTENCY_KEY_PATTERN)):
        if body.session_id is None and (full := await self._at_session_cap()) is not None:
            return full.response()
        if body.stream:
            turn = await self._prepare(body, idempotency_key=idempotency_key)
            if isinstance(turn, TurnFailure):
                return turn.response()
            return StreamingResponse(self._sse(turn), media_type="text/event-stream", headers=SSE_HEADERS)
        resp = await self._mapped(self._in_order(
            body.session_id, lambda: run_turn(self.stages, self.pack, body, idempotency_key)), body)
        if isinstance(resp, TurnFailure):
            return resp.response()
        ingress_metrics().turn(resp, "chat")
        return resp

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
        400: {}, 404: {}, 409: {}, 413: {}, 503: {}})
    async def openai_chat(self, body: OpenAIChatRequest,
                          x_coact_session_id: str | None = Header(default=None, alias=openai_api.SESSION_HEADER),
                          idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER,
                                                               pattern=IDEMPOTENCY_KEY_PATTERN)):
        try:
            message, session_id = openai_api.turn_input(body, self.pack.name, x_coact_session_id)
        except openai_api.OpenAIRequestError as e:
            return _openai_error(e.status, e.message, e.param, e.code)
        by_messages = session_id is None  # no header, no `user`: the conversation resent in `messages` names it
        if by_messages:
            session_id = await self._conversation(openai_api.conversation_key(body.messages[:-1]))
        turn = await self._prepare(ChatRequest(message=message, session_id=session_id,
                                               max_new_tokens=openai_api.max_new_tokens(body)),
                                   create_missing=True, idempotency_key=idempotency_key)
        if isinstance(turn, TurnFailure):
            return turn.response(openai=True)
        replay = isinstance(turn, ChatResponse)
        headers = {openai_api.SESSION_HEADER: turn.session_id if replay else turn.session.session_id}
        model = openai_api.model_id(self.pack.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            async def remember(done) -> None:
                await self._remember(body.messages, done.reply, done.session_id)

            return StreamingResponse(openai_api.chunks(self._events(turn, "openai"), model, include_usage,
                                                       remember if by_messages else None),
                                     media_type="text/event-stream", headers=SSE_HEADERS | headers)
        try:  # a whole reply: the Responder's batched path, as for a plain /v1/chat turn
            resp = turn if replay else await asyncio.wait_for(complete_turn(self.stages, turn), self.turn_timeout_s)
        except TooManySessions as e:
            return TurnFailure(429, f"too many sessions: {e}", "60").response(openai=True)
        except SessionConflict as e:
            return TurnFailure(409, f"conflict: {e}; nothing of this turn was saved: resend").response(openai=True)
        except StoreUnavailable:
            return _overloaded("the session store is unavailable").response(openai=True)
        except BackPressureError as e:
            return _openai_error(503, "overloaded: the Responder's request queue is full; retry later",
                                 headers={"Retry-After": str(max(1, round(getattr(e, "retry_after_s", 0) or 2)))})
        except (TimeoutError, *_REPLICA_GONE):
            return _openai_error(503, "overloaded: the turn did not finish; retry later",
                                 headers={"Retry-After": RETRY_AFTER_S})
        if by_messages:
            await self._remember(body.messages, resp.reply, resp.session_id)
        if not replay:
            ingress_metrics().turn(resp, "openai")
        return JSONResponse(openai_api.completion(resp, model).model_dump(mode="json"), headers=headers)

    async def _conversation(self, key: str | None) -> str | None:
        """The session a conversation (the hash of its messages, `openai_api.conversation_key`) continues."""
        if key is None:
            return None
        try:
            loaded = await self._load(key)
        except StoreUnavailable:
            return None  # the turn's own load answers 503
        return None if loaded is None else loaded[1].get("alias_of")  # None too when it is ambiguous

    async def _remember(self, messages: list, reply: str, session_id: str) -> None:
        """Name the conversation including this answer, so that resending it continues this session; a name
        two sessions share names neither."""
        key = store_id(openai_api.conversation_key(messages, reply))
        try:
            await self.store.put(key, {"alias_of": session_id}, None)
        except SessionConflict:
            try:
                loaded = await self.store.get(key)
                if loaded is not None and loaded[1].get("alias_of") not in (session_id, None):
                    await self.store.put(key, {"alias_of": None, "ambiguous": True}, loaded[0])
            except (SessionConflict, StoreUnavailable):
                pass  # raced by a third conversation, or the store went away: the next call starts afresh
        except StoreUnavailable:
            pass  # no store: the answer stands; the session header still works

    @app.get("/v1/sessions/{session_id}", response_model=SessionView, responses={404: {}, 422: {}, 503: {}})
    async def get_session(self, session_id: str = SESSION_PATH):
        try:
            loaded = await self._load(session_id)
        except StoreUnavailable:
            return _overloaded("the session store is unavailable").response()
        if loaded is None:
            return _error(404, f"unknown session_id {session_id!r}")
        return SessionView(session=session_of(loaded[1])[0], ttl_s=self.ttl_s, version=loaded[0])

    @app.delete("/v1/sessions/{session_id}", responses={404: {}, 422: {}, 503: {}})
    async def delete_session(self, session_id: str = SESSION_PATH):
        try:
            found = await self.store.delete(store_id(session_id))
        except StoreUnavailable:
            return _overloaded("the session store is unavailable").response()
        if not found:
            return _error(404, f"unknown session_id {session_id!r}")
        return {"deleted": session_id}

    @app.get("/v1/audit", responses={422: {}})
    async def audit(self, session_id: str | None = Query(default=None, pattern=SESSION_ID_PATTERN),
                    limit: int = Query(default=MAX_ROWS, ge=1, le=MAX_ROWS)):
        """The audit log: every executed action with its decision and result, oldest first (operators)."""
        if not 1 <= limit <= MAX_ROWS:
            return _error(422, f"invalid limit: between 1 and {MAX_ROWS}")
        if caller() != ANONYMOUS:  # a key reads the audit of its own live sessions only
            if session_id is None:
                return _error(422, "invalid request: session_id: required with API keys (the audit of one "
                                   "of your sessions)", [{"field": "session_id", "problem": "required"}])
            try:
                if await self._load(session_id) is None:
                    return _error(404, f"unknown session_id {session_id!r}")
            except StoreUnavailable:
                return _overloaded("the session store is unavailable").response()
        return {"entries": await self.audit.entries.remote(session_id, limit)}

    @app.get("/", include_in_schema=False)
    async def page(self):
        return _web_file("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def page_file(self, name: str):
        return _web_file(name)

    @app.get("/readyz", responses={503: {}})
    async def readyz(self):
        """Readiness: every stage loaded and warmed, the store answering (graphs/serving/readiness.py)."""
        async def store() -> dict:
            return {"ready": True, "detail": await self.store.info()}

        probes = {name: _ready_probe(handle) for name, handle in self.ready_handles.items()}
        body = await readiness.check(probes, store)
        status, headers = readiness.http_status(body)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz(self):
        """Liveness: this ingress replica runs and the store answers; /readyz says whether turns can be served."""
        try:
            info = await self.store.info()
        except StoreUnavailable as e:
            return _error(503, f"unhealthy: {e}", headers={"Retry-After": RETRY_AFTER_S})
        return {"status": "ok", "domain": f"{self.pack.name}@{self.pack.version}", **info}
