"""Session state outside the replicas: a named, detached Ray actor with a TTL, pinned to the head node.

Replicas come and go (autoscaling, crashes, `ray.kill`); the conversation must not. The store
holds plain JSON dicts so it never needs the project's code to (de)serialise.

Where it lives and what survives what:
- It is placed on the head node (the `node:__internal_head__` resource every Ray head carries,
  KubeRay and the cluster launcher included), so scaling worker nodes down or losing one never
  takes the sessions with it. The head also holds the GCS: if the head dies the cluster is gone
  anyway (unless GCS fault tolerance with an external Redis is configured, then the store restarts
  on the new head and only the journal below, if it lives on a shared volume, brings sessions back).
- Every write is appended to a journal file on the head (`SessionJournal`), and the actor restarts
  (`max_restarts=-1`) replaying it, so killing the store's process loses no session. Calls made
  while it restarts are retried by Ray (`max_task_retries`; get/put/delete are idempotent).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import ray

STORE_NAME = "coact_sessions"
STORE_NAMESPACE = "coact"
DEFAULT_TTL_S = 1800.0
HEAD_RESOURCE = "node:__internal_head__"
JOURNAL_ENV = "COACT_SESSION_JOURNAL"  # a file path; "off" disables the journal
JOURNAL_NAME = "coact_sessions.jsonl"


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

    def put(self, session_id: str, state: dict, touched: float | None = None) -> None:
        self._rows[session_id] = (self._clock() if touched is None else touched, state)
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

    def rows(self) -> dict[str, tuple[float, dict]]:
        return dict(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


class SessionJournal:
    """Append-only JSON-lines log of puts and deletes, compacted when it grows.

    A line is written (and flushed to the OS) before the call returns, so a killed process loses
    nothing; no fsync, because the failure it guards against is the actor's process dying, not the
    machine. Compaction rewrites the live rows to a temporary file and renames it over the log.
    """

    def __init__(self, path: str | Path, compact_every: int = 4096) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.compact_every = compact_every
        self._lines = 0
        self._lock = threading.Lock()
        self._file = None

    def replay(self, table: SessionTable) -> int:
        """Load the log into the table; returns the number of live sessions restored."""
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        op = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a kill mid-write: everything before it is whole
                    if op["op"] == "put":
                        table.put(op["id"], op["state"], touched=op["t"])
                    else:
                        table.delete(op["id"])
            table.sweep()
        self.compact(table)
        return len(table)

    def _write(self, record: dict) -> None:
        with self._lock:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
            self._lines += 1

    def put(self, session_id: str, state: dict, touched: float) -> None:
        self._write({"op": "put", "id": session_id, "t": touched, "state": state})

    def delete(self, session_id: str) -> None:
        self._write({"op": "del", "id": session_id})

    def maybe_compact(self, table: SessionTable) -> None:
        if self._lines > max(self.compact_every, 2 * len(table)):
            self.compact(table)

    def compact(self, table: SessionTable) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for sid, (touched, state) in table.rows().items():
                    f.write(json.dumps({"op": "put", "id": sid, "t": touched, "state": state},
                                       separators=(",", ":")) + "\n")
            os.replace(tmp, self.path)
            self._lines = len(table)


def _default_journal_path() -> str | None:
    configured = os.environ.get(JOURNAL_ENV)
    if configured:
        return None if configured.lower() == "off" else configured
    try:  # the Ray session folder on the head: lives exactly as long as this cluster
        return os.path.join(ray._private.worker.global_worker.node.get_session_dir_path(), JOURNAL_NAME)
    except Exception:  # noqa: BLE001 - no session folder (e.g. client mode): run without a journal
        return None


@ray.remote(num_cpus=0)
class SessionStore:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, journal_path: str | None = None) -> None:
        self._table = SessionTable(ttl_s)
        path = journal_path or _default_journal_path()
        self._journal = SessionJournal(path) if path else None
        self._restored = self._journal.replay(self._table) if self._journal else 0
        self._started = time.time()

    def get(self, session_id: str) -> dict | None:
        return self._table.get(session_id)

    def put(self, session_id: str, state: dict) -> None:
        now = time.time()
        self._table.put(session_id, state, touched=now)
        if self._journal:
            self._journal.put(session_id, state, now)
            self._journal.maybe_compact(self._table)

    def delete(self, session_id: str) -> bool:
        found = self._table.delete(session_id)
        if found and self._journal:
            self._journal.delete(session_id)
        return found

    def info(self) -> dict:
        return {"sessions": len(self._table), "ttl_s": self._table.ttl_s}

    def placement(self) -> dict:
        """Where the store runs and what it restored: for operators and the fault experiments."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "started": self._started,
                "restored": self._restored, "journal": str(self._journal.path) if self._journal else None,
                "sessions": len(self._table)}


def head_actor(actor_class, name: str, *args):
    """A cluster-wide named actor on the head node: created on first use, restarted when its process dies (calls
    retried), outliving the deployments that use it."""
    return actor_class.options(
        name=name, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1,
        # A sliver of the head-only resource pins it there without using up anything schedulable.
        resources={HEAD_RESOURCE: 0.001},
    ).remote(*args)


def get_or_create_store(ttl_s: float = DEFAULT_TTL_S):
    """The cluster-wide session store."""
    return head_actor(SessionStore, STORE_NAME, ttl_s)
