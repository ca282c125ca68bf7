"""The action server's state in SQLite: cards, tickets and the record of applied calls.

The ``calls`` table is both the idempotency record and the append-only history: a call's effect and its
outcome are written in one transaction, so a retried key finds either nothing (apply it) or the outcome it
was first given (replay it), never an effect without an outcome. Stdlib only, no web framework here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coact.graphs.policy.messages import ActionCall, ActionOutcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (
    session_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('active', 'frozen')),
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reference TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL,
    summary TEXT NOT NULL,
    conversation TEXT NOT NULL,
    decision TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tickets_session ON tickets (session_id);
CREATE TABLE IF NOT EXISTS calls (
    idempotency_key TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    session_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_session ON calls (session_id);
"""


class ActionError(Exception):
    """A call the server will not apply; the app maps each subclass to an HTTP status."""


class UnknownAction(ActionError):
    def __init__(self, action: str) -> None:
        super().__init__(f"unknown action {action!r}")
        self.action = action


class KeyConflict(ActionError):
    """An idempotency key already used for another action or session: a client bug, not a retry."""

    def __init__(self, key: str, action: str, session_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for action {action!r} "
                         f"in session {session_id!r}")


class ActionState:
    """The demo bank behind the webhook. Thread-safe: one connection, one lock around every statement."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a second process on the same
        # file waits for the write lock instead of failing at commit.
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.executescript(_SCHEMA)
        self._actions: dict[str, Callable[[ActionCall, float], ActionOutcome]] = {
            "freeze_card": self._freeze_card,
            "unfreeze_card": self._unfreeze_card,
            "escalate": self._escalate,
        }

    @property
    def actions(self) -> list[str]:
        return sorted(self._actions)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ applying calls

    def apply(self, call: ActionCall) -> tuple[ActionOutcome, bool]:
        """Apply ``call`` once: ``(outcome, replayed)``; a key seen before answers its stored outcome."""
        handler = self._actions.get(call.action)
        if handler is None:
            raise UnknownAction(call.action)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen = self._db.execute("SELECT action, session_id, outcome FROM calls WHERE idempotency_key = ?",
                                        (call.idempotency_key,)).fetchone()
                if seen is not None:
                    self._db.execute("ROLLBACK")
                    if (seen["action"], seen["session_id"]) != (call.action, call.session_id):
                        raise KeyConflict(call.idempotency_key, seen["action"], seen["session_id"])
                    return ActionOutcome.model_validate_json(seen["outcome"]), True
                now = time.time()
                outcome = handler(call, now)
                self._db.execute("INSERT INTO calls (idempotency_key, action, session_id, outcome, created_at) "
                                 "VALUES (?, ?, ?, ?, ?)", (call.idempotency_key, call.action, call.session_id,
                                                            outcome.model_dump_json(), now))
                self._db.execute("COMMIT")
                return outcome, False
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # The handlers run inside apply()'s transaction, with the lock held.

    def _card_status(self, session_id: str, now: float) -> str:
        # Demo bank: every session has one card, active until an action says otherwise.
        self._db.execute("INSERT OR IGNORE INTO cards (session_id, status, updated_at) VALUES (?, 'active', ?)",
                         (session_id, now))
        return self._db.execute("SELECT status FROM cards WHERE session_id = ?", (session_id,)).fetchone()[0]

    def _next_call_number(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(rowid), 0) + 1 FROM calls").fetchone()[0]

    def _set_card(self, call: ActionCall, now: float, status: str, prefix: str) -> ActionOutcome:
        before = self._card_status(call.session_id, now)
        if before != status:
            self._db.execute("UPDATE cards SET status = ?, updated_at = ? WHERE session_id = ?",
                             (status, now, call.session_id))
        reason = f"already {status}" if before == status else f"card {status}"
        return ActionOutcome(status="done", reason=reason, reference=f"{prefix}-{self._next_call_number():06d}",
                             data={"card": {"session_id": call.session_id, "status": status}})

    def _freeze_card(self, call: ActionCall, now: float) -> ActionOutcome:
        return self._set_card(call, now, "frozen", "F")

    def _unfreeze_card(self, call: ActionCall, now: float) -> ActionOutcome:
        return self._set_card(call, now, "active", "U")

    def _escalate(self, call: ActionCall, now: float) -> ActionOutcome:
        number = self._db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM tickets").fetchone()[0]
        reference = f"T-{number:06d}"
        decision = {"evidence": [e.model_dump() for e in call.evidence], "posterior": call.posterior,
                    "expected_utility": call.expected_utility, "reason": call.reason}
        conversation = [t.model_dump() for t in call.conversation]
        self._db.execute("INSERT INTO tickets (id, reference, session_id, summary, conversation, decision, status, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?, 'open', ?)",
                         (number, reference, call.session_id, call.summary, json.dumps(conversation),
                          json.dumps(decision), now))
        return ActionOutcome(status="done", reason="ticket opened", reference=reference,
                             data={"ticket": {"reference": reference, "status": "open"}})

    # ------------------------------------------------------------ queries

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def card(self, session_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT session_id, status, updated_at FROM cards WHERE session_id = ?", (session_id,))
        return dict(rows[0]) if rows else None

    @staticmethod
    def _ticket(row: sqlite3.Row) -> dict[str, Any]:
        ticket = dict(row)
        ticket["conversation"] = json.loads(ticket["conversation"])
        ticket["decision"] = json.loads(ticket["decision"])
        return ticket

    _TICKET_COLUMNS = "reference, session_id, summary, conversation, decision, status, created_at"

    def tickets(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if session_id is None:
            rows = self._rows(f"SELECT {self._TICKET_COLUMNS} FROM tickets ORDER BY id")
        else:
            rows = self._rows(f"SELECT {self._TICKET_COLUMNS} FROM tickets WHERE session_id = ? ORDER BY id",
                              (session_id,))
        return [self._ticket(r) for r in rows]

    def ticket(self, reference: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT {self._TICKET_COLUMNS} FROM tickets WHERE reference = ?", (reference,))
        return self._ticket(rows[0]) if rows else None

    def calls(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """The applied calls, oldest first (replays are not repeated here: they had no effect)."""
        columns = "idempotency_key, action, session_id, outcome, created_at"
        if session_id is None:
            rows = self._rows(f"SELECT {columns} FROM calls ORDER BY rowid")
        else:
            rows = self._rows(f"SELECT {columns} FROM calls WHERE session_id = ? ORDER BY rowid", (session_id,))
        return [{**dict(r), "outcome": json.loads(r["outcome"])} for r in rows]

    def summary(self) -> dict[str, Any]:
        """Counts: cards by status, tickets by status, applied calls by action."""
        def counts(sql: str) -> dict[str, int]:
            return {r[0]: r[1] for r in self._rows(sql)}

        calls = counts("SELECT action, COUNT(*) FROM calls GROUP BY action ORDER BY action")
        return {"cards": counts("SELECT status, COUNT(*) FROM cards GROUP BY status ORDER BY status"),
                "tickets": counts("SELECT status, COUNT(*) FROM tickets GROUP BY status ORDER BY status"),
                "calls": calls, "total_calls": sum(calls.values())}
