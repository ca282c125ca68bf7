"""Readiness (``GET /readyz``): can every stage serve a turn now, and does the session store answer.

``/healthz`` is liveness: the ingress replica runs and the store answers, nothing more (cheap; ``wait_healthy``
and Serve's own checks use it). ``/readyz`` asks each stage's deployment for its ``ready()`` (models loaded and
warmed by a real call: actors/*.py) and the store for its ``info()``, all at once, each under a timeout, so a
stage that hangs or has no replica yet reads "not ready" instead of hanging the probe. docs/operations.md.

Plain functions, no Ray: the ingress hands in one probe (a no-argument coroutine function) per stage; the
unit tests hand in plain coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

PROBE_TIMEOUT_S = 2.0  # per probe; all run concurrently, so /readyz answers within about this
RETRY_AFTER_S = "5"  # the 503's Retry-After: stages warm for seconds (transformers) to minutes (vLLM)
MAX_DETAIL_CHARS = 300

Probe = Callable[[], Awaitable[object]]


def as_status(answer: object) -> dict:
    """A probe's answer as ``{"ready": bool, "detail": ...}``: a stage's ``ready()`` dict, or not ready."""
    if isinstance(answer, Mapping) and isinstance(answer.get("ready"), bool):
        return {"ready": answer["ready"], "detail": answer.get("detail")}
    return {"ready": False, "detail": f"unexpected answer: {answer!r}"[:MAX_DETAIL_CHARS]}


async def run_probe(probe: Probe, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """One probe's status; a timeout or an exception is "not ready", with why in ``detail``."""
    try:
        answer = await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return {"ready": False, "detail": f"no answer within {timeout_s:g} s"}
    except Exception as e:  # noqa: BLE001 - a failing probe is a status to report, not an error of /readyz
        return {"ready": False, "detail": f"{type(e).__name__}: {e}"[:MAX_DETAIL_CHARS]}
    return as_status(answer)


def aggregate(stages: Mapping[str, dict], store: dict) -> dict:
    """The /readyz body: ready when there is at least one stage and every stage and the store are ready."""
    stages = dict(stages)
    ready = bool(stages) and all(s["ready"] for s in stages.values()) and store["ready"]
    return {"ready": ready, "stages": stages, "store": store}


async def check(stages: Mapping[str, Probe], store: Probe, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Run every stage's probe and the store's concurrently; the aggregated body (see ``aggregate``)."""
    names = list(stages)
    *results, store_status = await asyncio.gather(*(run_probe(stages[n], timeout_s) for n in names),
                                                  run_probe(store, timeout_s))
    return aggregate(dict(zip(names, results, strict=True)), store_status)


def http_status(body: dict) -> tuple[int, dict[str, str]]:
    """200 when ready, else 503 with Retry-After."""
    return (200, {}) if body["ready"] else (503, {"Retry-After": RETRY_AFTER_S})
