"""The session store's table and journal (what a restarted store replays), without Ray: versioned
compare-and-set, replay that skips bad lines, state saved before versions, background compaction. The store
under faults is tests/test_faults.py; the Redis backend is tests/test_session_backends.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from coact.actors.session_backends import SessionConflict
from coact.actors.session_store import SessionJournal, SessionTable

pytestmark = pytest.mark.unit


def _put(table: SessionTable, journal: SessionJournal, sid: str, state: dict, expected: int | None,
         touched: float) -> int:
    version = table.put(sid, state, expected, touched=touched)
    journal.put(sid, state, touched, version)
    return version


def test_journal_restores_puts_deletes_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    table, journal = SessionTable(ttl_s=100, clock=lambda: 50.0), SessionJournal(path)
    for sid, state in {"a": {"turns": 1}, "b": {"turns": 2}, "c": {"turns": 3}}.items():
        assert _put(table, journal, sid, state, None, 40.0) == 1
    assert _put(table, journal, "a", {"turns": 4}, 1, 45.0) == 2
    table.delete("b")
    journal.delete("b")
    restored = SessionTable(ttl_s=100, clock=lambda: 50.0)
    assert SessionJournal(path).replay(restored) == 2
    assert restored.get("a") == (2, {"turns": 4}) and restored.get("b") is None
    assert restored.get("c") == (1, {"turns": 3})
    # The restored versions hold for compare-and-set: a writer that loaded version 1 of "a" is too late.
    with pytest.raises(SessionConflict) as e:
        restored.put("a", {"turns": 5}, 1)
    assert (e.value.expected, e.value.actual) == (1, 2) and "another turn" in str(e.value)
    assert restored.put("a", {"turns": 5}, 2) == 3


def test_compare_and_set() -> None:
    table = SessionTable(ttl_s=100, clock=lambda: 0.0)
    assert table.get("s") is None
    assert table.put("s", {"n": 1}, None) == 1  # None: must not exist yet
    for stale in (None, 0, 2):
        with pytest.raises(SessionConflict):
            table.put("s", {"n": 2}, stale)
    assert table.put("s", {"n": 2}, 1) == 2
    # The same write arriving twice (a retried call whose reply was lost) is that write, not a conflict...
    assert table.put("s", {"n": 2}, 1) == 2
    # ...but another state written from the same version is.
    with pytest.raises(SessionConflict):
        table.put("s", {"n": 3}, 1)
    assert table.get("s") == (2, {"n": 2})
    # Four writers that all loaded version 2: exactly one wins, the rest are told.
    outcomes = []
    for i in range(4):
        try:
            outcomes.append(table.put("s", {"writer": i}, 2))
        except SessionConflict:
            outcomes.append("conflict")
    assert outcomes == [3, "conflict", "conflict", "conflict"]


def test_an_expired_session_starts_again_at_version_zero() -> None:
    now = [0.0]
    table = SessionTable(ttl_s=10, clock=lambda: now[0])
    table.put("s", {"n": 1}, None)
    now[0] = 20.0
    with pytest.raises(SessionConflict) as e:  # a turn that loaded it before it expired cannot write it back
        table.put("s", {"n": 2}, 1)
    assert e.value.actual == 0
    assert table.put("s", {"n": 1}, 0) == 1
    table.set_ttl(5)
    now[0] = 26.0
    assert table.get("s") is None


def test_replay_skips_bad_lines_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = SessionJournal(path)
    journal.put("old", {"x": 1}, 0.0, 1)
    journal.put("a", {"x": 2}, 95.0, 1)
    with path.open("a") as f:
        f.write('{"op": "put", "id": "half\n')  # a torn line: the process died mid-write
        f.write("not json at all\n")
        f.write('{"op": "put", "id": "nostate", "t": 95.0}\n')  # a record missing its state
        f.write('{"op": "frobnicate", "id": "a"}\n')
        f.write("\n")  # blank lines are not counted
    journal.put("b", {"x": 3}, 96.0, 4)  # whole lines after the bad ones still load (the old replay stopped)
    restored = SessionTable(ttl_s=10, clock=lambda: 100.0)
    again = SessionJournal(path)
    assert again.replay(restored) == 2
    assert again.skipped == 4
    assert restored.get("a") == (1, {"x": 2}) and restored.get("b") == (4, {"x": 3}) and restored.get("old") is None
    # Replay compacted the log: only the live sessions are left, each a whole JSON line with its version.
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted((x["id"], x["v"]) for x in lines) == [("a", 1), ("b", 4)]
    third = SessionJournal(path)
    third.replay(SessionTable(ttl_s=10, clock=lambda: 100.0))
    assert third.skipped == 0


def test_state_saved_before_versions_loads_as_version_zero(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    # The line format before versions: no "v".
    path.write_text(json.dumps({"op": "put", "id": "legacy", "t": 99.0, "state": {"turns": 3}}) + "\n")
    table = SessionTable(ttl_s=10, clock=lambda: 100.0)
    assert SessionJournal(path).replay(table) == 1
    assert table.get("legacy") == (0, {"turns": 3})
    # Migrated on its first write: a turn that loaded version 0 saves version 1.
    assert table.put("legacy", {"turns": 4}, 0) == 1
    assert json.loads(path.read_text())["v"] == 0  # the compacted log now carries the version explicitly


def test_journal_compacts_in_the_background_when_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    table, journal = SessionTable(ttl_s=1e3, clock=lambda: 100.0), SessionJournal(path, compact_every=10)
    version, started = None, 0
    for i in range(50):
        version = _put(table, journal, "same", {"i": i}, version, float(i))
        started += journal.maybe_compact(table)
    journal.wait(10)
    assert started >= 1 and not journal.compacting
    # The writes go on while a compaction runs (they are not held up by it); the next trigger compacts them.
    if journal.maybe_compact(table):
        journal.wait(10)
    assert len(path.read_text().splitlines()) <= 11
    restored = SessionTable(ttl_s=1e3, clock=lambda: 100.0)
    SessionJournal(path).replay(restored)
    assert restored.get("same") == (50, {"i": 49})


def test_writes_during_a_compaction_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    table, journal = SessionTable(ttl_s=1e3, clock=lambda: 100.0), SessionJournal(path, compact_every=1)
    for i in range(200):
        _put(table, journal, f"s{i}", {"i": i}, None, 50.0)
    # A compaction whose snapshot is taken, then held while it writes the new log: the request path goes on.
    gate, snapshotted = threading.Event(), threading.Event()

    class HeldRows(dict):
        def items(self):
            gate.wait(10)
            return super().items()

    def rows():
        snapshotted.set()
        return HeldRows(table.rows())

    worker = threading.Thread(target=journal._compact, args=(rows,))
    worker.start()
    assert snapshotted.wait(10)
    for i in range(200, 260):
        _put(table, journal, f"s{i}", {"i": i}, None, 60.0)
    _put(table, journal, "s0", {"i": "new"}, 1, 61.0)
    table.delete("s1")
    journal.delete("s1")
    assert worker.is_alive()  # all of that was written while the compaction ran
    gate.set()
    worker.join(10)
    journal.wait(10)
    restored = SessionTable(ttl_s=1e3, clock=lambda: 100.0)
    SessionJournal(path).replay(restored)
    assert len(restored) == 259 and restored.get("s259") == (1, {"i": 259})
    assert restored.get("s0") == (2, {"i": "new"}) and restored.get("s1") is None


def test_count_by_prefix_skips_expired_and_excluded() -> None:
    from coact.actors.session_store import SessionTable

    now = [1000.0]
    table = SessionTable(ttl_s=60, clock=lambda: now[0])
    for sid in ("alice:a", "alice:b", "alice:conv:x", "bob:a", "plain"):
        table.put(sid, {"s": sid})
    assert table.count("alice:") == 3 and table.count("alice:", exclude="conv:") == 2 and table.count("bob:") == 1
    now[0] += 61
    table.put("alice:c", {"s": "c"})
    assert table.count("alice:", exclude="conv:") == 1
