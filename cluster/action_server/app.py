"""The action server's HTTP API (FastAPI) over ``ActionState``.

Routes::

    POST   /v1/actions/{action}       body: ActionCall -> 200 ActionOutcome (+ ``Idempotent-Replayed: true``)
    GET    /v1/cards/{session_id}     the session's card (404 before its first card action)
    GET    /v1/tickets[?session_id=]  tickets, oldest first
    GET    /v1/tickets/{reference}    one ticket (404 if none)
    GET    /v1/calls[?session_id=]    the applied calls, oldest first
    GET    /v1/state                  counts
    GET    /healthz                   liveness (never needs the token)
    PUT    /v1/admin/faults           fault injection, for tests and demos only (see ``Faults``)
    GET    /v1/admin/faults           the faults in force
    DELETE /v1/admin/faults           clear them

Every error answers JSON ``{"error": "..."}`` (validation errors add ``"fields"``), never a bare 500 for
bad input, so an executor can log what was wrong.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from coact.cluster.action_server.state import ActionState, KeyConflict, UnknownAction
from coact.graphs.policy.messages import ActionCall, ActionOutcome

REPLAYED_HEADER = "Idempotent-Replayed"


class Faults(BaseModel):
    """Injected faults (tests and demos only): delay matching calls, or answer them with an error status.

    A call that gets ``status`` is not applied, so the executor's retry after the fault is cleared is the
    first effect. ``actions`` None matches every action.
    """

    model_config = ConfigDict(extra="forbid")
    delay_s: float = Field(default=0.0, ge=0.0, le=600.0)
    status: int | None = Field(default=None, ge=400, le=599, description="answer this HTTP status instead")
    actions: list[str] | None = Field(default=None, description="only these actions; None = all")

    def matches(self, action: str) -> bool:
        return self.actions is None or action in self.actions


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only the JSON-safe parts: pydantic's `ctx`/`input` may hold exceptions or the whole body.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()]


def create_app(db_path: str | Path, token: str | None = None) -> FastAPI:
    """The app over the SQLite file ``db_path``; with ``token``, every route but /healthz needs the bearer."""
    state = ActionState(db_path)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="coact reference action server", lifespan=lifespan)
    app.state.actions = state
    app.state.faults = Faults()

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if token is not None and request.url.path != "/healthz":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _fields(exc)
        named = "; ".join(f"{'.'.join(map(str, f['loc']))}: {f['msg']}" for f in fields[:5])
        return _error(422, f"invalid request: {named}", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "actions": state.actions}

    @app.post("/v1/actions/{action}", response_model=ActionOutcome)
    async def act(action: str, call: ActionCall,
                  idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> Response:
        if action != call.action:
            return _error(422, f"path action {action!r} differs from body action {call.action!r}")
        if not call.idempotency_key:
            return _error(422, "idempotency_key must not be empty")
        if idempotency_key is not None and idempotency_key != call.idempotency_key:
            return _error(422, f"Idempotency-Key header {idempotency_key!r} differs from body "
                               f"idempotency_key {call.idempotency_key!r}")
        faults: Faults = app.state.faults
        if faults.matches(action):
            if faults.delay_s > 0:
                await asyncio.sleep(faults.delay_s)
            if faults.status is not None:
                return _error(faults.status, f"injected fault: status {faults.status} for {action!r}")
        try:
            # SQLite blocks; off the event loop so a delayed call doesn't hold up the others.
            outcome, replayed = await run_in_threadpool(state.apply, call)
        except UnknownAction as exc:
            return _error(404, str(exc))
        except KeyConflict as exc:
            return _error(409, str(exc))
        headers = {REPLAYED_HEADER: "true"} if replayed else None
        return JSONResponse(outcome.model_dump(mode="json"), headers=headers)

    async def one(lookup: Any, key: str, what: str) -> Response:
        found = await run_in_threadpool(lookup, key)
        return JSONResponse(found) if found else _error(404, f"no {what} {key!r}")

    @app.get("/v1/cards/{session_id}")
    async def card(session_id: str) -> Response:
        return await one(state.card, session_id, "card for session")

    @app.get("/v1/tickets")
    async def tickets(session_id: str | None = None) -> list[dict[str, Any]]:
        return await run_in_threadpool(state.tickets, session_id)

    @app.get("/v1/tickets/{reference}")
    async def ticket(reference: str) -> Response:
        return await one(state.ticket, reference, "ticket")

    @app.get("/v1/calls")
    async def calls(session_id: str | None = None) -> list[dict[str, Any]]:
        return await run_in_threadpool(state.calls, session_id)

    @app.get("/v1/state")
    async def summary() -> dict[str, Any]:
        return await run_in_threadpool(state.summary)

    @app.get("/v1/admin/faults")
    async def get_faults() -> Faults:
        return app.state.faults

    @app.put("/v1/admin/faults")
    async def put_faults(faults: Faults) -> Faults:
        app.state.faults = faults
        return faults

    @app.delete("/v1/admin/faults")
    async def clear_faults() -> Faults:
        app.state.faults = Faults()
        return app.state.faults

    return app
