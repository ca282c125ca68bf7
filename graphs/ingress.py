"""HTTP ingress: FastAPI routes, error mapping, and the handles to the four stages."""
# No `from __future__ import annotations` here: FastAPI resolves the route annotations at runtime.


import asyncio
import re

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.schemas import (
    MAX_MESSAGE_CHARS,
    SESSION_ID_PATTERN,
    ChatRequest,
    ChatResponse,
    SessionState,
    SessionView,
)
from actors.session_store import DEFAULT_TTL_S, get_or_create_store
from graphs.domain import load_pack
from graphs.pipeline import Stages, UnknownSession, run_turn

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


@app.middleware("http")
async def limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > MAX_BODY_BYTES
        except ValueError:
            return _error(400, "invalid Content-Length header")
        if too_big:
            return _error(413, f"request body too large: {length} bytes (limit {MAX_BODY_BYTES}; "
                               f"a message holds at most {MAX_MESSAGE_CHARS} characters)")
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": ".".join(str(x) for x in e["loc"] if x != "body"), "problem": e["msg"], "type": e["type"]}
              for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "request body is not valid JSON", errors)
    if any(e["type"] == "string_too_long" for e in errors):
        return _error(413, f"message too long: at most {MAX_MESSAGE_CHARS} characters", errors)
    fields = ", ".join(sorted({e["field"] or "body" for e in errors}))
    return _error(422, f"invalid request: {fields}", errors)


@app.exception_handler(StarletteHTTPException)
async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal(_: Request, exc: Exception) -> JSONResponse:
    # Still JSON, still naming the problem; the replica log has the traceback.
    return _error(500, f"internal error: {type(exc).__name__}")


def _valid_session_id(session_id: str) -> bool:
    # Defined before the ingress class: @serve.ingress serialises the routes when it runs.
    return re.fullmatch(SESSION_ID_PATTERN, session_id) is not None


def _overloaded(what: str, retry_after_s: float | None = None) -> JSONResponse:
    retry = str(max(1, round(retry_after_s))) if retry_after_s else RETRY_AFTER_S
    return _error(503, f"overloaded: {what}; retry later", headers={"Retry-After": retry})


_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


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


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress(app)
class ChatIngress:
    def __init__(self, intent: DeploymentHandle, reasoner: DeploymentHandle, decision: DeploymentHandle,
                 responder: DeploymentHandle, domain: str = "banking", session_ttl_s: float = DEFAULT_TTL_S,
                 turn_timeout_s: float = 120.0) -> None:
        self.pack = load_pack(domain)
        self.store = get_or_create_store(session_ttl_s)
        self.ttl_s = session_ttl_s
        self.turn_timeout_s = turn_timeout_s
        self.stages = Stages(
            intent=_retrying(intent),
            reason=_retrying(reasoner),
            decide=_retrying(decision),
            respond=_retrying(responder),
            load=self._load,
            save=self._save,
        )

    async def _load(self, session_id: str) -> dict | None:
        return await self.store.get.remote(session_id)

    async def _save(self, session_id: str, state: dict) -> None:
        await self.store.put.remote(session_id, state)

    @app.post("/v1/chat", response_model=ChatResponse, responses={400: {}, 404: {}, 413: {}, 422: {}, 503: {}})
    async def chat(self, body: ChatRequest):
        try:
            return await asyncio.wait_for(run_turn(self.stages, self.pack, body), self.turn_timeout_s)
        except UnknownSession:
            return _error(404, f"unknown session_id {body.session_id!r}: it expired or never existed; "
                               "omit session_id to start a new session")
        except BackPressureError as e:
            return _overloaded("a stage's request queue is full", getattr(e, "retry_after_s", None))
        except TimeoutError:
            return _overloaded(f"the turn did not finish within {self.turn_timeout_s:.0f} s")
        except _REPLICA_GONE:
            return _overloaded("a stage replica is restarting")

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

    @app.get("/healthz")
    async def healthz(self):
        info = await self.store.info.remote()
        return {"status": "ok", "domain": f"{self.pack.name}@{self.pack.version}", **info}
