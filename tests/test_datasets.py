"""Data loaders: the shared data, the COACT_DATA_DIR override, and the download cache (without network)."""

from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import pytest

from coact.cluster import datasets as D
from tests.helpers.data import SHARED, require

pytestmark = pytest.mark.unit


@pytest.fixture
def shared_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COACT_DATA_DIR", raising=False)
    require(SHARED, "../shared/data")  # skipped when absent; a failure in CI (CI=true)


def test_banking77_counts(shared_only: None) -> None:
    assert D.data_dir() == D._shared_data_dir()
    train, test = D.load_banking77("train"), D.load_banking77("test")
    labels = D.banking77_labels()
    assert len(train) == 10003
    assert len(test) == 3080
    assert len(labels) == 77 and len(set(labels)) == 77
    assert labels[0] == "card_arrival"
    assert {y for _, y in train} == set(labels) == {y for _, y in test}
    assert all(isinstance(t, str) and t for t, _ in train)
    assert train[0] == ("I am still waiting on my card?", "card_arrival")


def test_loader_returns_fresh_lists(shared_only: None) -> None:
    a = D.load_banking77("test")
    a.clear()
    assert len(D.load_banking77("test")) == 3080


def test_clinc150_counts(shared_only: None) -> None:
    expected = {"train": 15000, "val": 3000, "test": 4500, "oos_train": 100, "oos_val": 100, "oos_test": 1000}
    for split, n in expected.items():
        rows = D.load_clinc150(split)
        assert len(rows) == n, split
    assert {y for _, y in D.load_clinc150("oos_test")} == {"oos"}
    domains = D.clinc_domains()
    assert len(domains) == 10 and sum(len(v) for v in domains.values()) == 150


def test_clinc_out_of_domain(shared_only: None) -> None:
    domains = D.clinc_domains()
    bank = set(domains["banking"]) | set(domains["credit_cards"])
    rows = D.clinc_out_of_domain("train")
    intents = {y for _, y in rows}
    assert not intents & bank
    assert not intents & D.BANK_ADJACENT_CLINC_INTENTS
    assert {"weather", "book_flight", "recipe"} <= intents
    assert D.BANK_ADJACENT_CLINC_INTENTS <= {i for v in domains.values() for i in v}
    n_kept = 150 - len(bank) - len(D.BANK_ADJACENT_CLINC_INTENTS)
    assert len(intents) == n_kept
    assert len(rows) == 100 * n_kept
    everything = D.clinc_out_of_domain("test", exclude_domains=(), exclude_intents=())
    assert len(everything) == 4500
    with pytest.raises(ValueError, match="unknown CLINC150 domains"):
        D.clinc_out_of_domain("train", exclude_domains=("bank",))
    with pytest.raises(ValueError):
        D.clinc_out_of_domain("oos_train")


def test_bad_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        D.load_banking77("validation")
    with pytest.raises(ValueError, match="split"):
        D.load_clinc150("dev")


def _tiny_banking77(root: Path) -> None:
    folder = root / "banking77"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(
        'text,category\n"Where is my card, it has not come?",card_arrival\nI lost my card,lost_or_stolen_card\n'
        "top up failed,top_up_failed\n", encoding="utf-8")
    (folder / "test.csv").write_text("text,category\nmy card never arrived,card_arrival\n", encoding="utf-8")
    (folder / "categories.json").write_text(
        json.dumps(["card_arrival", "lost_or_stolen_card", "top_up_failed"]), encoding="utf-8")


def test_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_banking77(tmp_path)
    monkeypatch.setenv("COACT_DATA_DIR", str(tmp_path))
    assert D.data_dir() == tmp_path
    assert D.load_banking77("train") == [
        ("Where is my card, it has not come?", "card_arrival"),
        ("I lost my card", "lost_or_stolen_card"),
        ("top up failed", "top_up_failed"),
    ]
    assert D.load_banking77("test") == [("my card never arrived", "card_arrival")]
    assert D.banking77_labels() == ["card_arrival", "lost_or_stolen_card", "top_up_failed"]
    # A folder given explicitly is never downloaded into: a missing file is a clear error.
    with pytest.raises(D.DataUnavailableError, match=r"clinc150/data_full\.json"):
        D.load_clinc150("oos_test")


def test_bad_csv_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_banking77(tmp_path)
    (tmp_path / "banking77" / "test.csv").write_text("sentence,label\nhello,card_arrival\n", encoding="utf-8")
    monkeypatch.setenv("COACT_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="text,category"):
        D.load_banking77("test")


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No COACT_DATA_DIR, no shared folder: data comes from the (empty) download cache."""
    monkeypatch.delenv("COACT_DATA_DIR", raising=False)
    monkeypatch.delenv("COACT_OFFLINE", raising=False)
    monkeypatch.setattr(D, "_shared_data_dir", lambda: tmp_path / "no-shared-data")
    monkeypatch.setenv("COACT_CACHE_DIR", str(tmp_path / "cache"))
    assert D.data_dir() == tmp_path / "cache" / "data"
    return tmp_path / "cache" / "data"


def test_missing_and_offline_is_a_clear_error(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(url: str, timeout: float = 0) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(D.DataUnavailableError) as err:
        D.load_banking77("train")
    msg = str(err.value)
    assert "offline" in msg and "COACT_DATA_DIR" in msg
    assert D.REMOTE_FILES["banking77/train.csv"].url in msg
    assert calls == [D.REMOTE_FILES["banking77/train.csv"].url]
    assert "57ec275d8078af65b7731c2a98be812d844a6d6b" in calls[0]
    assert not [p for p in empty_cache.rglob("*") if p.is_file()]

    # COACT_OFFLINE refuses before touching the network.
    calls.clear()
    monkeypatch.setenv("COACT_OFFLINE", "1")
    with pytest.raises(D.DataUnavailableError, match="COACT_OFFLINE"):
        D.load_clinc150("oos_test")
    assert calls == []


def test_download_into_cache_verifies_checksum(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    categories = require(SHARED / "banking77" / "categories.json", "../shared/data/banking77")
    payload = {"data": categories.read_bytes()}

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        assert url == D.REMOTE_FILES["banking77/categories.json"].url
        return io.BytesIO(payload["data"])

    monkeypatch.setattr(D.urllib.request, "urlopen", fake_urlopen)
    payload["data"] = b'["tampered"]'
    with pytest.raises(D.DataUnavailableError, match="SHA-256"):
        D.banking77_labels()
    assert not (empty_cache / "banking77" / "categories.json").exists()

    payload["data"] = categories.read_bytes()
    labels = D.banking77_labels()
    assert len(labels) == 77
    assert (empty_cache / "banking77" / "categories.json").is_file()
    assert not [p for p in empty_cache.rglob("*.part")]


def test_remote_files_are_pinned() -> None:
    for rel, remote in D.REMOTE_FILES.items():
        assert remote.url.startswith("https://raw.githubusercontent.com/")
        assert remote.url.endswith(Path(rel).name)
        assert D.BANKING77_COMMIT in remote.url or D.CLINC150_COMMIT in remote.url
        assert len(remote.sha256) == 64


def test_fingerprint(shared_only: None) -> None:
    fp = D.fingerprint(["banking77/categories.json"])
    assert fp["banking77/categories.json"]["sha256"] == D.REMOTE_FILES["banking77/categories.json"].sha256
