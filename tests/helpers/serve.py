"""Talking to a running app: plain turns over HTTP, handles to its deployments, waiting for a condition."""

from __future__ import annotations

import time

import httpx

SHARED_APP = "coact"  # the session's app (fixture `app_url`)


def chat(url: str, message: str, session_id: str | None = None, timeout_s: float = 300) -> dict:
    """One plain turn; asserts a 200 and returns the response body."""
    body = {"message": message} | ({"session_id": session_id} if session_id else {})
    r = httpx.post(f"{url}/v1/chat", json=body, timeout=timeout_s)
    assert r.status_code == 200, r.text
    return r.json()


def stage(data: dict, name: str) -> dict:
    """One stage of a response's trace."""
    return next(s for s in data["trace"]["stages"] if s["stage"] == name)


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition", every_s: float = 0.2):
    """Poll until `predicate()` is truthy and return its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def handle(deployment: str, app: str = SHARED_APP):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app)


def responder_stats(app: str = SHARED_APP) -> dict:
    return handle("ResponderActor", app).get_stats.remote().result().model_dump()


def replicas(app: str, *deployments: str) -> set[str]:
    """Names of the live replica actors of these deployments of `app`."""
    import ray

    prefixes = tuple(f"SERVE_REPLICA::{app}#{d}#" for d in deployments)
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefixes)}


def wait_running(app: str, url: str | None = None, timeout_s: float = 300.0) -> None:
    """Until Serve reports `app` RUNNING (and, given its URL, /healthz answers)."""
    from ray import serve

    def ready() -> bool:
        status = serve.status().applications.get(app)
        if not status or status.status != "RUNNING":
            return False
        if url is None:
            return True
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout_s, what=f"app {app} to be RUNNING", every_s=1.0)


def responder_request(message: str = "Where is my new card?", app: str = SHARED_APP):
    """A real ResponderRequest for `message`, built by the app's own stages (Intent, Reasoner, Decision)."""
    from coact.graphs.policy.dialogue import plan_turn, reply_template
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import DecisionRequest, IntentRequest, ResponderRequest, SessionState

    pack = load_pack("banking")
    intent = handle("IntentActor", app).remote(IntentRequest(message=message)).result()
    reasoner = handle("ReasonerActor", app).remote(message).result()
    plan = plan_turn(SessionState(session_id="t"), message, intent, reasoner, pack)
    decision = handle("DecisionActor", app).remote(DecisionRequest(evidence=plan.evidence)).result()
    template, forbidden = reply_template(pack, decision)
    return ResponderRequest(message=message, decision=decision, template=template, forbidden=forbidden)


def check_guard_verdict(message: str, reply: str, trace: dict) -> str:
    """The reply is the one the guard allows for what the model generated, re-judged here from the trace.

    The model wrote a sentence (`generated`, with its token count); the decided content is the domain's
    template for the decision in the trace, with its reason clause. If the guard accepts the sentence, the
    reply must be exactly template + sentence with `source: model`; if it rejects it, exactly the template with `source: template`
    and the guard's reason. A reply sent unchecked, a decided content dropped or altered, an accepted opener
    thrown away or a label that does not match what was sent all fail here. Returns the source.
    """
    from coact.actors.generation import names_problem
    from coact.actors.guard import check_opener, check_reply, first_sentence
    from coact.graphs.policy.dialogue import reply_template
    from coact.graphs.policy.domain import load_pack
    from coact.graphs.policy.messages import DecisionResult, ResponderRequest
    from coact.graphs.policy.reasons import Reason, with_reason

    stages = {s["stage"]: s["output"] for s in trace["stages"]}
    out, decided = stages["responder"], stages["decision"]
    decision = DecisionResult.model_validate({k: decided[k] for k in DecisionResult.model_fields if k in decided})
    template, forbidden = reply_template(load_pack("banking"), decision)
    clause = decided.get("reason_clause")
    template = with_reason(template, None if clause is None else Reason(**clause), decision.kind)
    assert out["tokens"] > 0 and out["generated"].strip(), out  # the LM wrote something for the guard to judge
    if (out.get("guard") or "").startswith("stopped mid-stream: "):
        # The streaming guard stopped generation at an offending piece: the decided content alone is sent.
        assert out["source"] == "template" and reply == template, (out, reply)
        return "template"
    sentence = first_sentence(out["generated"])
    why = check_opener(sentence, decision, forbidden, grounding=f"{message} {template}")
    # The default layout (content_first): the decided content, then the LM's acknowledgement.
    expected = f"{template} {sentence}".strip()
    if why is None:
        why = check_reply(expected, template, decision, forbidden)
    req = ResponderRequest(message=message, decision=decision, template=template)
    if why is None and not names_problem(sentence, req):
        why = "generic (names nothing the customer said)"
    if why is None:
        assert (out["source"], out["guard"]) == ("model", None), (out, sentence)
        assert reply == expected, (reply, sentence, template)
    else:
        assert (out["source"], out["guard"]) == ("template", why), (out, sentence, why)
        assert reply == template, (reply, template)
    return out["source"]
