"""The audit log: every executed action with the decision that led to it, append-only, queryable by session.

`AuditLog` is the logic (stdlib sqlite3, one file, WAL): rows are inserted, never updated or deleted, so the
file is the record an operator reads. A row holds the call (evidence, posterior, expected utilities, chosen
action, the summary and the conversation) and the executor's result. A retry of the same call with the same
result (same idempotency key and status) is recorded once; a failed try and a later success are two rows.

`AuditStore` hosts it in one named actor on the head node, like the session store, so every replica of the
action step on every node writes to one file, and the file outlives the actor, the app and the cluster.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import ray

from coact.actors.session_store import head_actor

AUDIT_NAME = "coact_audit"
AUDIT_ENV = "COACT_AUDIT_LOG"
DEFAULT_AUDIT_PATH = "~/.coact/audit.sqlite"
MAX_ROWS = 1000  # per query

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    session_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    reference TEXT,
    reason TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    ms REAL NOT NULL,
    call TEXT NOT NULL,
    UNIQUE (idempotency_key, status)
);
CREATE INDEX IF NOT EXISTS audit_session ON audit (session_id, id);
"""
_COLUMNS = ("id", "at", "session_id", "turn", "action", "status", "reference", "reason", "idempotency_key",
            "attempts", "ms", "call")


def audit_path(configured: str | None = None) -> Path:
    return Path(os.path.expanduser(configured or os.environ.get(AUDIT_ENV) or DEFAULT_AUDIT_PATH))


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def append(self, call: dict, record: dict) -> bool:
        """Record one execution; False if this call already has this result on record (a retry)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO audit (at, session_id, turn, action, status, reference, reason, "
                "idempotency_key, attempts, ms, call) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), call["session_id"], call["turn"], call["action"], record["status"],
                 record.get("reference"), record.get("reason", ""), call["idempotency_key"],
                 record.get("attempts", 1), record.get("ms", 0.0), json.dumps(call, separators=(",", ":"))))
            return cur.rowcount == 1

    def entries(self, session_id: str | None = None, limit: int = MAX_ROWS) -> list[dict]:
        where, args = ("WHERE session_id = ?", (session_id,)) if session_id else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit {where} ORDER BY id LIMIT ?",  # noqa: S608
                                    (*args, min(limit, MAX_ROWS))).fetchall()
        out = []
        for row in rows:
            entry = dict(zip(_COLUMNS, row, strict=True))
            entry["call"] = json.loads(entry["call"])
            out.append(entry)
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


@ray.remote(num_cpus=0)
class AuditStore:
    def __init__(self, path: str | None = None) -> None:
        self._log = AuditLog(audit_path(path))

    def append(self, call: dict, record: dict) -> bool:
        return self._log.append(call, record)

    def entries(self, session_id: str | None = None, limit: int = MAX_ROWS) -> list[dict]:
        return self._log.entries(session_id, limit)

    def info(self) -> dict:
        return {"path": str(self._log.path), "entries": self._log.count()}


def get_or_create_audit(path: str | None = None):
    """The cluster-wide audit log (the first caller's path wins: one log per cluster)."""
    return head_actor(AuditStore, AUDIT_NAME, path)
