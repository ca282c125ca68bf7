"""Session state outside the replicas: a named, detached Ray actor with a TTL.

Replicas come and go (autoscaling, crashes, `ray.kill`); the conversation must not. The store
holds plain JSON dicts so it never needs the project's code to (de)serialise.
"""

from __future__ import annotations

import time

import ray

STORE_NAME = "coact_sessions"
STORE_NAMESPACE = "coact"
DEFAULT_TTL_S = 1800.0


class SessionTable:
    """The logic: dict of sessions with expiry on read and a periodic sweep."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock=time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._rows: dict[str, tuple[float, dict]] = {}

    def get(self, session_id: str) -> dict | None:
        row = self._rows.get(session_id)
        if row is None:
            return None
        touched, state = row
        if self._clock() - touched > self.ttl_s:
            del self._rows[session_id]
            return None
        return state

    def put(self, session_id: str, state: dict) -> None:
        self._rows[session_id] = (self._clock(), state)
        if len(self._rows) % 256 == 0:
            self.sweep()

    def delete(self, session_id: str) -> bool:
        return self._rows.pop(session_id, None) is not None

    def sweep(self) -> int:
        now = self._clock()
        dead = [k for k, (t, _) in self._rows.items() if now - t > self.ttl_s]
        for k in dead:
            del self._rows[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._rows)


@ray.remote(num_cpus=0)
class SessionStore:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._table = SessionTable(ttl_s)

    def get(self, session_id: str) -> dict | None:
        return self._table.get(session_id)

    def put(self, session_id: str, state: dict) -> None:
        self._table.put(session_id, state)

    def delete(self, session_id: str) -> bool:
        return self._table.delete(session_id)

    def info(self) -> dict:
        return {"sessions": len(self._table), "ttl_s": self._table.ttl_s}


def get_or_create_store(ttl_s: float = DEFAULT_TTL_S):
    """The cluster-wide store; created on first use, survives the deployments that use it."""
    return SessionStore.options(
        name=STORE_NAME, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1
    ).remote(ttl_s)
