"""The session store's journal (what a restarted store replays), without Ray; the store under faults is
tests/test_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coact.actors.session_store import SessionJournal, SessionTable

pytestmark = pytest.mark.unit


def test_journal_restores_puts_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    table, journal = SessionTable(ttl_s=100, clock=lambda: 50.0), SessionJournal(path)
    for sid, state in {"a": {"turns": 1}, "b": {"turns": 2}, "c": {"turns": 3}}.items():
        table.put(sid, state, touched=40.0)
        journal.put(sid, state, 40.0)
    table.put("a", {"turns": 4}, touched=45.0)
    journal.put("a", {"turns": 4}, 45.0)
    table.delete("b")
    journal.delete("b")
    restored = SessionTable(ttl_s=100, clock=lambda: 50.0)
    assert SessionJournal(path).replay(restored) == 2
    assert restored.get("a") == {"turns": 4} and restored.get("b") is None and restored.get("c") == {"turns": 3}


def test_journal_skips_a_torn_line_and_expired_sessions(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = SessionJournal(path)
    journal.put("old", {"x": 1}, 0.0)
    journal.put("new", {"x": 2}, 95.0)
    with path.open("a") as f:
        f.write('{"op": "put", "id": "half')  # the process died mid-write
    restored = SessionTable(ttl_s=10, clock=lambda: 100.0)
    assert SessionJournal(path).replay(restored) == 1
    assert restored.get("new") == {"x": 2} and restored.get("old") is None
    # Replay compacted the log: only the live session is left, and it is whole JSON again.
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["id"] == "new"


def test_journal_compacts_when_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    table, journal = SessionTable(ttl_s=1e3, clock=lambda: 100.0), SessionJournal(path, compact_every=10)
    for i in range(50):
        table.put("same", {"i": i}, touched=float(i))
        journal.put("same", {"i": i}, float(i))
        journal.maybe_compact(table)
    assert len(path.read_text().splitlines()) <= 11
    restored = SessionTable(ttl_s=1e3, clock=lambda: 100.0)
    SessionJournal(path).replay(restored)
    assert restored.get("same") == {"i": 49}
