"""The action step's engine: carries a decided action out through its executor and says what happened.

An executor is an HTTP webhook (`POST {url}/v1/actions/{action}`, the `ActionCall` as JSON, the idempotency key
also in the `Idempotency-Key` header; docs/actions.md) or a Python entry point (`module:function`, called with
the `ActionCall`). Whatever goes wrong becomes an `ActionOutcome` the reply can follow, never an exception:

- 2xx with an `ActionOutcome` body: that outcome (done / refused / failed);
- 4xx other than 408/429: refused, with the server's reason (asking again cannot help);
- 5xx, 408, 429, a timeout or no connection: retried with the same idempotency key, then failed.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time

import httpx
from pydantic import ValidationError

from coact.actors.config import ActionsConfig, WebhookConfig
from coact.graphs.policy.domain import DomainPack, load_pack
from coact.graphs.policy.messages import ActionCall, ActionOutcome, ActionRecord

RETRYABLE = {408, 429}
MAX_REASON_CHARS = 200


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("error") or body.get("reason") or body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        text = None
    return str(text or f"HTTP {response.status_code}")[:MAX_REASON_CHARS]


class ActionExecutor:
    """One per replica: the pack's executors resolved once, one pooled HTTP client."""

    def __init__(self, cfg: ActionsConfig | None = None, domain: str | DomainPack = "banking") -> None:
        self.cfg = cfg or ActionsConfig()
        self.pack = domain if isinstance(domain, DomainPack) else load_pack(domain)
        self.functions = {}
        self.executors = {}  # every executable action: the pack's, and the actions that undo them
        for name, action in self.pack.actions.items():
            ex = action.executor
            if ex is None:
                continue
            self.executors[name] = ex
            if action.undo is not None:
                self.executors[action.undo.action] = ex
            if ex.webhook is not None and ex.webhook not in self.cfg.webhooks:
                raise ValueError(f"actions.{name}.executor.webhook: {ex.webhook!r} is not in the config's "
                                 f"actions.webhooks {sorted(self.cfg.webhooks)}")
            if ex.python is not None:
                module, _, attr = ex.python.partition(":")
                self.functions[ex.python] = getattr(importlib.import_module(module), attr)
        self.client = httpx.AsyncClient()

    async def execute(self, call: ActionCall) -> ActionRecord:
        t0 = time.perf_counter()
        outcome, attempts = await self._outcome(call)
        return ActionRecord(action=call.action, status=outcome.status, turn=call.turn, reference=outcome.reference,
                            reason=outcome.reason[:MAX_REASON_CHARS], idempotency_key=call.idempotency_key,
                            attempts=attempts, ms=round((time.perf_counter() - t0) * 1000.0, 2))

    async def _outcome(self, call: ActionCall) -> tuple[ActionOutcome, int]:
        ex = self.executors.get(call.action)
        if ex is None:
            return ActionOutcome(status="refused", reason=f"no executor for action {call.action!r}"), 0
        if self.cfg.dry_run:
            return ActionOutcome(status="done", reason="dry run", data={"dry_run": True}), 0
        if ex.python is not None:
            return await self._python(call, self.functions[ex.python]), 1
        return await self._webhook(call, self.cfg.webhooks[ex.webhook])  # type: ignore[index]

    async def _python(self, call: ActionCall, fn) -> ActionOutcome:
        try:
            out = await fn(call) if inspect.iscoroutinefunction(fn) else await asyncio.to_thread(fn, call)
            return out if isinstance(out, ActionOutcome) else ActionOutcome.model_validate(out)
        except Exception as e:  # noqa: BLE001 - a user's function failing is an outcome, not a crash of the turn
            return ActionOutcome(status="failed", reason=f"{type(e).__name__}: {e}"[:MAX_REASON_CHARS])

    async def _webhook(self, call: ActionCall, hook: WebhookConfig) -> tuple[ActionOutcome, int]:
        url = f"{hook.url.rstrip('/')}/v1/actions/{call.action}"
        headers = {**hook.headers, "Idempotency-Key": call.idempotency_key}
        body = call.model_dump(mode="json")
        why = "not attempted"
        for attempt in range(1, hook.attempts + 1):
            try:
                response = await self.client.post(url, json=body, headers=headers, timeout=hook.timeout_s)
            except httpx.TimeoutException:
                why = f"no answer within {hook.timeout_s:g} s"
            except httpx.HTTPError as e:
                why = f"could not reach the action server ({type(e).__name__})"
            else:
                if response.is_success:
                    try:
                        return ActionOutcome.model_validate(response.json()), attempt
                    except (ValueError, ValidationError):
                        return ActionOutcome(status="failed", reason="the action server's answer is not an "
                                             "ActionOutcome"), attempt
                if 400 <= response.status_code < 500 and response.status_code not in RETRYABLE:
                    return ActionOutcome(status="refused", reason=_reason(response)), attempt
                why = _reason(response)
            if attempt < hook.attempts:
                await asyncio.sleep(hook.backoff_s * attempt)
        return ActionOutcome(status="failed", reason=why), hook.attempts

    async def aclose(self) -> None:
        await self.client.aclose()
