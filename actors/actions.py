"""ActionActor: the action step between the decision and the reply. Executes the decided action through its
executor and records it in the audit log; the work is `actors.executor.ActionExecutor`'s.

A deployment of its own (not a stage of the DecisionActor): it waits on other systems, so it scales by
concurrent calls rather than by CPU, and a slow or dead action server never holds a decision replica.
"""

from __future__ import annotations

from ray import serve

from coact.actors.audit_log import get_or_create_audit
from coact.actors.config import ActionsConfig
from coact.actors.executor import ActionExecutor
from coact.graphs.policy.messages import ActionCall, ActionRecord


@serve.deployment  # options from ActionsConfig.deployment at bind time
class ActionActor:
    def __init__(self, cfg: ActionsConfig | None = None, domain: str = "banking") -> None:
        cfg = cfg or ActionsConfig()
        self.engine = ActionExecutor(cfg, domain)
        self.audit = get_or_create_audit(cfg.audit_log)

    async def ready(self) -> dict:
        """Readiness (GET /readyz): the executor is built (no model to warm; the action server is not probed:
        a turn whose action fails is answered, not refused)."""
        return {"ready": True, "detail": {"executors": len(self.engine.executors), "dry_run": self.engine.cfg.dry_run}}

    async def __call__(self, call: ActionCall) -> ActionRecord:
        record = await self.engine.execute(call)
        await self.audit.append.remote(call.model_dump(mode="json"), record.model_dump(mode="json"))
        return record
