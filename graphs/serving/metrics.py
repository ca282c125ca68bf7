"""The ingress's Prometheus metrics, through Ray's metrics API (`ray.util.metrics`): Ray exports them on each
node's metrics port with Ray's own, as `coact_<name>` (see docs/operations.md and the Grafana dashboard in
cluster/grafana/coact.json).

What a turn is counted by comes from its response (action kind, the trace's stage times, the responder's
source and guard verdict), so a streamed and a plain turn are counted alike; refusals and store failures are
counted where the ingress answers them.
"""

from __future__ import annotations

from typing import Any

# Milliseconds: from a cached template (~1 ms) to a slow CPU generation (~10 s).
MS_BOUNDARIES = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
QUESTION_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 5.5, 8.5]  # integer counts: 0, 1, 2, 3, 4-5, 6-8, more
TERMINAL = {"action", "answer", "escalate", "decline"}


class IngressMetrics:
    """Created once per ingress replica (Ray metrics must be created in the process that records them)."""

    def __init__(self, app: str = "coact") -> None:
        from ray.util.metrics import Counter, Histogram

        self.app = app
        self.turns = Counter("coact_turns", "turns answered, by action kind and route",
                             tag_keys=("app", "kind", "route"))
        self.escalations = Counter("coact_escalations", "turns that handed the case to a person", tag_keys=("app",))
        self.questions = Histogram("coact_questions_per_case", "clarifying questions asked before a case closed",
                                   boundaries=QUESTION_BOUNDARIES, tag_keys=("app",))
        self.guard = Counter("coact_guard_rejections", "LM text the guard did not send (the template went "
                                                       "instead), by reason", tag_keys=("app", "reason"))
        self.fallbacks = Counter("coact_template_fallbacks", "replies sent as the template alone, by why",
                                 tag_keys=("app", "why"))
        self.stage_ms = Histogram("coact_stage_ms", "milliseconds per stage of a turn", boundaries=MS_BOUNDARIES,
                                  tag_keys=("app", "stage"))
        self.turn_ms = Histogram("coact_turn_ms", "milliseconds per turn", boundaries=MS_BOUNDARIES,
                                 tag_keys=("app", "route"))
        self.refusals = Counter("coact_refusals", "requests refused, by status and cause",
                                tag_keys=("app", "status", "cause"))
        self.store_errors = Counter("coact_store_errors", "session store calls that failed or conflicted",
                                    tag_keys=("app", "kind"))

    def turn(self, response: Any, route: str) -> None:
        """A turn answered: `response` is a ChatResponse (or a StreamDone)."""
        kind = response.action.kind
        self.turns.inc(tags={"app": self.app, "kind": kind, "route": route})
        if kind == "escalate":
            self.escalations.inc(tags={"app": self.app})
        asked = questions_answered(response)
        if asked is not None and kind in TERMINAL:
            self.questions.observe(float(asked), tags={"app": self.app})
        for stage in response.trace.stages:
            self.stage_ms.observe(float(stage.ms), tags={"app": self.app, "stage": stage.stage})
            if stage.stage == "responder" and stage.output.get("source") == "template":
                why = str(stage.output.get("guard") or "template reply")
                if stage.output.get("generated"):  # the LM wrote something and it was not sent
                    self.guard.inc(tags={"app": self.app, "reason": guard_reason(why)})
                self.fallbacks.inc(tags={"app": self.app, "why": guard_reason(why)})
        self.turn_ms.observe(float(response.trace.total_ms), tags={"app": self.app, "route": route})

    def refused(self, status: int, cause: str) -> None:
        self.refusals.inc(tags={"app": self.app, "status": str(status), "cause": cause})

    def store_error(self, kind: str) -> None:
        self.store_errors.inc(tags={"app": self.app, "kind": kind})


def questions_answered(response: Any) -> int | None:
    """How many of the policy's questions the customer answered in the case this turn decided: the answers
    among the decision's evidence (`answer: q=state`). None when no policy decision was made this turn."""
    decision = next((s.output for s in response.trace.stages if s.stage == "decision"), None)
    if not decision or "explanation" not in decision:
        return None
    return sum(1 for item in decision["explanation"] if str(item.get("label", "")).startswith("answer:"))


def guard_reason(why: str) -> str:
    """A bounded label from a guard verdict ("claims an action: I've cancelled" -> "claims an action")."""
    head = why.split(":", 1)[0].split("(", 1)[0].strip().lower()
    return head[:40] or "unknown"


_METRICS: dict[str, IngressMetrics] = {}


def ingress_metrics(app: str | None = None) -> IngressMetrics:
    """This process's metrics (one set per replica process; `app` names it on first use)."""
    if "m" not in _METRICS:
        _METRICS["m"] = IngressMetrics(app or "coact")
    return _METRICS["m"]
