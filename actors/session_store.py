"""The embedded session store (the default backend, docs/sessions.md): a named, detached Ray actor with a TTL,
pinned to the head node. Every session carries a version and every write is a compare-and-set (`SessionTable`).

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
  while it restarts are retried by Ray (`max_task_retries`; get/delete are idempotent, and a retried put of the
  same state is recognised as the same write); the ingress bounds each call (`EmbeddedSessions`, 503 past it).
- The Redis backend (`coact.actors.session_backends.RedisSessions`) keeps sessions outside Ray altogether.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray

from coact.actors.session_backends import (
    DEFAULT_TIMEOUT_S,
    RedisSessions,
    SessionBackend,
    SessionConflict,
    StoreUnavailable,
    expected_of,
)

STORE_NAME = "coact_sessions"
STORE_NAMESPACE = "coact"
DEFAULT_TTL_S = 1800.0
HEAD_RESOURCE = "node:__internal_head__"
JOURNAL_ENV = "COACT_SESSION_JOURNAL"  # a file path; "off" disables the journal
JOURNAL_NAME = "coact_sessions.jsonl"
SWEEP_EVERY = 256  # puts between two sweeps of expired sessions

log = logging.getLogger(__name__)
Row = tuple[float, int, dict]  # (last written, version, state)


class SessionTable:
    """The logic: versioned sessions with expiry on read and a periodic sweep.

    `put` is a compare-and-set: it writes only when the stored version (0 for a missing or expired session)
    equals `expected_version` (None or 0: must not exist yet) and returns the new version; otherwise it raises
    `SessionConflict`. The one exception is the same write arriving twice (a call retried after its reply was
    lost): a stored version one past the expected one holding exactly this state is answered as done.
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock=time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._rows: dict[str, Row] = {}
        self._puts = 0

    def _live(self, session_id: str) -> Row | None:
        row = self._rows.get(session_id)
        if row is not None and self._clock() - row[0] > self.ttl_s:
            del self._rows[session_id]
            return None
        return row

    def get(self, session_id: str) -> tuple[int, dict] | None:
        row = self._live(session_id)
        return None if row is None else (row[1], row[2])

    def put(self, session_id: str, state: dict, expected_version: int | None = None,
            touched: float | None = None) -> int:
        row = self._live(session_id)
        current, expected = (0 if row is None else row[1]), expected_of(expected_version)
        if current != expected:
            if row is not None and current == expected + 1 and row[2] == state:
                return current  # this very write, retried
            raise SessionConflict(session_id, expected, current)
        self.restore(session_id, current + 1, state, touched)
        self._puts += 1
        if self._puts % SWEEP_EVERY == 0:
            self.sweep()
        return current + 1

    def restore(self, session_id: str, version: int, state: dict, touched: float | None = None) -> None:
        """Set a row as it was (journal replay): no version check."""
        self._rows[session_id] = (self._clock() if touched is None else touched, version, state)

    def delete(self, session_id: str) -> bool:
        return self._rows.pop(session_id, None) is not None

    def sweep(self) -> int:
        now = self._clock()
        dead = [k for k, (t, _, _) in self._rows.items() if now - t > self.ttl_s]
        for k in dead:
            del self._rows[k]
        return len(dead)

    def set_ttl(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s

    def rows(self) -> dict[str, Row]:
        return dict(self._rows)  # one C-level copy: safe to take from the compaction thread

    def count(self, prefix: str, exclude: str | None = None) -> int:
        """Live sessions whose id starts with `prefix` (and does not continue with `exclude`)."""
        now = self._clock()
        return sum(1 for k, (t, _, _) in list(self._rows.items())
                   if k.startswith(prefix) and now - t <= self.ttl_s
                   and not (exclude and k[len(prefix):].startswith(exclude)))

    def __len__(self) -> int:
        return len(self._rows)


def _record(session_id: str, touched: float, version: int, state: dict) -> str:
    return json.dumps({"op": "put", "id": session_id, "t": touched, "v": version, "state": state},
                      separators=(",", ":")) + "\n"


class SessionJournal:
    """Append-only JSON-lines log of puts and deletes, compacted in the background when it grows.

    fsync policy: every line is written and flushed to the OS before the call returns, but not fsynced. So a
    killed store process (the failure this guards against) loses nothing, while a crash of the machine itself
    (kernel panic, power loss) can lose the writes the OS had not yet written back (seconds). Compaction writes
    the live rows to a temporary file, fsyncs it and renames it over the log, so a crash never leaves a
    half-compacted log in place; writes made while it runs go to the old log and are appended to the new one
    before the rename. Lines without a version (written before versions existed) load as version 0.
    """

    def __init__(self, path: str | Path, compact_every: int = 4096) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.compact_every = compact_every
        self.skipped = 0  # lines the last replay could not read
        self._lines = 0
        self._lock = threading.Lock()
        self._file = None
        self._tail: list[str] | None = None  # lines written while a compaction runs
        self._compactor: threading.Thread | None = None

    def replay(self, table: SessionTable) -> int:
        """Load the log into the table; returns the number of live sessions restored (`skipped`: bad lines)."""
        self.skipped = 0
        if self.path.exists():
            with self.path.open(encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        op = json.loads(line)
                        if op["op"] == "put":
                            if not isinstance(op["state"], dict):
                                raise TypeError("state is not an object")
                            table.restore(str(op["id"]), int(op.get("v", 0)), op["state"], touched=float(op["t"]))
                        elif op["op"] == "del":
                            table.delete(str(op["id"]))
                        else:
                            raise ValueError(f"unknown op {op['op']!r}")
                    except (ValueError, KeyError, TypeError) as e:  # a torn line from a kill mid-write, or garbage
                        self.skipped += 1
                        log.warning("session journal %s: skipped line %d (%s)", self.path, number, e)
            table.sweep()
        if self.skipped:
            log.warning("session journal %s: %d unreadable line(s) skipped", self.path, self.skipped)
        self.compact(table)
        return len(table)

    def _write(self, line: str) -> None:
        with self._lock:
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            self._lines += 1
            if self._tail is not None:
                self._tail.append(line)

    def put(self, session_id: str, state: dict, touched: float, version: int = 0) -> None:
        self._write(_record(session_id, touched, version, state))

    def delete(self, session_id: str) -> None:
        self._write(json.dumps({"op": "del", "id": session_id}, separators=(",", ":")) + "\n")

    def maybe_compact(self, table: SessionTable) -> bool:
        """Start a background compaction when the log holds far more lines than live rows; True if started."""
        if self._lines <= max(self.compact_every, 2 * len(table)) or self.compacting:
            return False
        self._compactor = threading.Thread(target=self._compact, args=(table.rows,), daemon=True,
                                           name="session-journal-compaction")
        self._compactor.start()
        return True

    @property
    def compacting(self) -> bool:
        return self._compactor is not None and self._compactor.is_alive()

    def wait(self, timeout_s: float | None = None) -> None:
        """Until a running background compaction is done."""
        if self._compactor is not None:
            self._compactor.join(timeout_s)

    def compact(self, table: SessionTable) -> None:
        """Compact now, in this thread (at replay)."""
        self.wait()
        self._compact(table.rows)

    def _compact(self, rows: Callable[[], dict[str, Row]]) -> None:
        try:
            with self._lock:
                snapshot = rows()
                self._tail = []
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for sid, (touched, version, state) in snapshot.items():
                    f.write(_record(sid, touched, version, state))
                f.flush()
                with self._lock:  # what was written meanwhile follows the snapshot, then the new log replaces the old
                    f.writelines(self._tail)
                    f.flush()
                    os.fsync(f.fileno())
                    if self._file is not None:
                        self._file.close()
                        self._file = None
                    os.replace(tmp, self.path)
                    self._lines = len(snapshot) + len(self._tail)
                    self._tail = None
        except Exception:  # noqa: BLE001 - the old log is intact; the next trigger tries again
            log.exception("session journal %s: compaction failed", self.path)
            with self._lock:
                self._tail = None


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
    """The embedded store's actor: the table and its journal; compaction runs in the journal's own thread."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, journal_path: str | None = None) -> None:
        self._table = SessionTable(ttl_s)
        path = journal_path or _default_journal_path()
        self._journal = SessionJournal(path) if path else None
        self._restored = self._journal.replay(self._table) if self._journal else 0
        self._started = time.time()

    def get(self, session_id: str) -> tuple[int, dict] | None:
        return self._table.get(session_id)

    def put(self, session_id: str, state: dict, expected_version: int | None = None) -> dict:
        """{"version": new} or {"conflict": stored version}: a value, not an exception, across the actor call."""
        now = time.time()
        try:
            version = self._table.put(session_id, state, expected_version, touched=now)
        except SessionConflict as e:
            return {"conflict": e.actual}
        if self._journal:
            self._journal.put(session_id, state, now, version)
            self._journal.maybe_compact(self._table)
        return {"version": version}

    def delete(self, session_id: str) -> bool:
        found = self._table.delete(session_id)
        if found and self._journal:
            self._journal.delete(session_id)
        return found

    def set_ttl(self, ttl_s: float) -> None:
        self._table.set_ttl(ttl_s)

    def count(self, prefix: str, exclude: str | None = None) -> int:
        return self._table.count(prefix, exclude)

    def info(self) -> dict:
        return {"backend": "embedded", "sessions": len(self._table), "ttl_s": self._table.ttl_s}

    def placement(self) -> dict:
        """Where the store runs and what it restored: for operators and the fault experiments."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "started": self._started,
                "restored": self._restored, "journal": str(self._journal.path) if self._journal else None,
                "skipped": self._journal.skipped if self._journal else 0, "sessions": len(self._table)}


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
    """The cluster-wide session store actor; an existing one takes this TTL (it ignores creation arguments)."""
    store = head_actor(SessionStore, STORE_NAME, ttl_s)
    store.set_ttl.remote(ttl_s)  # ordered before this caller's later calls
    return store


_ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class EmbeddedSessions:
    """`SessionBackend` over the head-node actor: every call bounded by `timeout_s` (the actor may be restarting)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S, actor=None) -> None:
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.actor = get_or_create_store(ttl_s) if actor is None else actor  # actor: a store of one's own (tests)

    async def _call(self, what: str, method, *args):
        try:
            return await asyncio.wait_for(method.remote(*args), self.timeout_s)
        except TimeoutError as e:
            raise StoreUnavailable(f"session store: {what} did not answer within {self.timeout_s:g} s") from e
        except _ACTOR_DOWN as e:
            raise StoreUnavailable(f"session store: {what} failed ({type(e).__name__})") from e

    async def get(self, session_id: str) -> tuple[int, dict] | None:
        out = await self._call("get", self.actor.get, session_id)
        if out is None:
            return None
        if isinstance(out, dict):  # an actor started by a version without versions: its state is version 0
            return 0, out
        version, state = out
        return int(version), state

    async def put(self, session_id: str, state: dict, expected_version: int | None) -> int:
        out = await self._call("put", self.actor.put, session_id, state, expected_version)
        if "conflict" in out:
            raise SessionConflict(session_id, expected_of(expected_version), out["conflict"])
        return out["version"]

    async def delete(self, session_id: str) -> bool:
        return await self._call("delete", self.actor.delete, session_id)

    async def info(self) -> dict:
        return await self._call("info", self.actor.info)

    async def count(self, prefix: str, exclude: str | None = None) -> int:
        return await self._call("count", self.actor.count, prefix, exclude)


def open_store(sessions) -> SessionBackend:
    """The store `sessions` (a `SessionsConfig`) names: the embedded actor, or Redis at `redis_url`."""
    if sessions.backend == "redis":
        return RedisSessions(sessions.redis_url, sessions.ttl_s, prefix=sessions.redis_prefix,
                             timeout_s=sessions.timeout_s)
    return EmbeddedSessions(sessions.ttl_s, sessions.timeout_s)
