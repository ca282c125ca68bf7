"""Data loaders for the public data sets the models are trained and evaluated on.

Where the data comes from, first match wins:

1. ``COACT_DATA_DIR``: a local folder laid out like ``../shared/data`` (``banking77/train.csv``, ...).
   Nothing is downloaded into it; a missing file is an error naming the file.
2. ``<repo>/../shared/data`` when that folder exists (CI and developer machines).
3. A cache folder (``COACT_CACHE_DIR``, default ``~/.cache/coact/data``) into which the public
   originals are downloaded, at pinned commits and checked against their SHA-256, on first use.

The data is never copied into the repository. Loaders return plain lists of ``(text, label)`` tuples, except
``load_sgd_user_turns`` (the Schema-Guided-Dialogue sample's user turns, with their dialogue acts and those of
the system turn before them: ``SgdUserTurn``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

BANKING77_REPO = "PolyAI-LDN/task-specific-datasets"
BANKING77_COMMIT = "57ec275d8078af65b7731c2a98be812d844a6d6b"
CLINC150_REPO = "clinc/oos-eval"
CLINC150_COMMIT = "828f8093932c8fe6ca7936c3d2e52903b1c523de"


@dataclass(frozen=True)
class RemoteFile:
    local: str  # path relative to the data folder
    url: str
    sha256: str


def _raw(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


REMOTE_FILES: dict[str, RemoteFile] = {
    f.local: f
    for f in (
        RemoteFile("banking77/train.csv", _raw(BANKING77_REPO, BANKING77_COMMIT, "banking_data/train.csv"),
                   "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b"),
        RemoteFile("banking77/test.csv", _raw(BANKING77_REPO, BANKING77_COMMIT, "banking_data/test.csv"),
                   "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d"),
        RemoteFile("banking77/categories.json",
                   _raw(BANKING77_REPO, BANKING77_COMMIT, "banking_data/categories.json"),
                   "53261da888122daf2d120d925458631d9619e15d82e56052e7a42e535ce32b63"),
        RemoteFile("clinc150/data_full.json", _raw(CLINC150_REPO, CLINC150_COMMIT, "data/data_full.json"),
                   "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"),
        RemoteFile("clinc150/domains.json", _raw(CLINC150_REPO, CLINC150_COMMIT, "data/domains.json"),
                   "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a"),
    )
}

# Schema-Guided Dialogue (DSTC8): multi-turn dialogues with the user's and the system's dialogue acts. Only
# the shard with the banking (Banks_1) dialogues is used; it trains and evaluates the conversation-act
# classifier. Kept apart from REMOTE_FILES (the intent data) so that the intent build's inputs stay the same.
SGD_REPO = "google-research-datasets/dstc8-schema-guided-dialogue"
SGD_COMMIT = "e852981ae34990f4358979625854259302feaa78"
SGD_SAMPLE = "sgd_dialogue_sample/train/dialogues_097.json"
SGD_FILES: dict[str, RemoteFile] = {
    SGD_SAMPLE: RemoteFile(SGD_SAMPLE, _raw(SGD_REPO, SGD_COMMIT, "train/dialogues_097.json"),
                           "ac32e0ccd38e439655ef8a6fc5436e5d14c5dbcf44faeb1fac48b17e3a7bad34"),
}
# System acts after which the user's turn answers something: a question (REQUEST), a confirmation (CONFIRM) or
# an offer (OFFER, OFFER_INTENT). REQ_MORE ("anything else?") is not one: it closes a task, as a finished case does.
SGD_PENDING_SYSTEM_ACTS: frozenset[str] = frozenset({"REQUEST", "CONFIRM", "OFFER", "OFFER_INTENT"})

BANKING77_SPLITS = ("train", "test")
CLINC150_SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test")

# CLINC150 intents outside the banking/credit-card domains that a bank assistant should NOT treat as
# out of scope: they overlap BANKING77 intents (exchange rates, going abroad, a lost phone, salary
# deposits) or are dialogue-control turns the pack handles itself (yes/no/greeting/thanks/goodbye).
BANK_ADJACENT_CLINC_INTENTS: frozenset[str] = frozenset({
    "exchange_rate", "travel_notification", "find_phone", "direct_deposit",
    "yes", "no", "maybe", "cancel", "greeting", "goodbye", "thank_you",
})


class DataUnavailableError(FileNotFoundError):
    """A data file is neither present locally nor downloadable; the message says how to fix it."""


def _shared_data_dir() -> Path:
    return REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    base = os.environ.get("COACT_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "coact"
    return root / "data"


def _source() -> tuple[Path, str]:
    """(folder, kind) where kind is 'env', 'shared' or 'cache' (only the cache is downloaded into)."""
    env = os.environ.get("COACT_DATA_DIR")
    if env:
        return Path(env).expanduser(), "env"
    shared = _shared_data_dir()
    if shared.is_dir():
        return shared, "shared"
    return cache_dir(), "cache"


def data_dir() -> Path:
    """The folder data files are read from (see the module docstring for the order)."""
    return _source()[0]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(remote: RemoteFile, dest: Path, timeout: float = 60.0) -> Path:
    """Download one pinned public file to ``dest`` (atomically), verifying its SHA-256."""
    if os.environ.get("COACT_OFFLINE", "").lower() in {"1", "true", "yes"}:
        raise DataUnavailableError(
            f"{dest} is missing and COACT_OFFLINE is set, so {remote.url} was not downloaded. "
            "Point COACT_DATA_DIR at a folder holding the data (laid out like ../shared/data)."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
            while chunk := resp.read(1 << 16):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"{dest} is missing and downloading it from {remote.url} failed ({e}); are you offline? "
            "Point COACT_DATA_DIR at a folder holding the data (laid out like ../shared/data)."
        ) from e
    digest = file_sha256(tmp)
    if digest != remote.sha256:
        tmp.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"downloaded {remote.url} has SHA-256 {digest}, expected {remote.sha256}; not using it"
        )
    os.replace(tmp, dest)
    return dest


def data_file(relpath: str) -> Path:
    """Path of a data file (e.g. ``banking77/train.csv``), downloading it into the cache if needed."""
    folder, kind = _source()
    path = folder / relpath
    if path.is_file():
        return path
    if kind != "cache":
        where = "COACT_DATA_DIR" if kind == "env" else "the shared data folder"
        raise DataUnavailableError(
            f"data file {path} not found ({where} {folder} does not hold {relpath}). "
            "Unset COACT_DATA_DIR to use ../shared/data or the download cache."
        )
    remote = REMOTE_FILES.get(relpath) or SGD_FILES.get(relpath)
    if remote is None:
        raise DataUnavailableError(f"data file {path} not found and no public source is known for {relpath}")
    return download(remote, path)


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------- BANKING77

@lru_cache(maxsize=8)
def _read_banking77(key: tuple[str, int, int]) -> tuple[tuple[str, str], ...]:
    with open(key[0], newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
            raise ValueError(f"{key[0]}: expected a CSV with header 'text,category', got {reader.fieldnames}")
        return tuple((row["text"], row["category"]) for row in reader)


def load_banking77(split: str = "train") -> list[tuple[str, str]]:
    """BANKING77 ``(text, intent)`` pairs; ``split`` is 'train' (10,003) or 'test' (3,080)."""
    if split not in BANKING77_SPLITS:
        raise ValueError(f"BANKING77 split must be one of {BANKING77_SPLITS}, got {split!r}")
    return list(_read_banking77(_file_key(data_file(f"banking77/{split}.csv"))))


def banking77_labels() -> list[str]:
    """The 77 BANKING77 intent names, in categories.json order."""
    with open(data_file("banking77/categories.json"), encoding="utf-8") as f:
        return list(json.load(f))


# ---------------------------------------------------------------- CLINC150

@lru_cache(maxsize=4)
def _read_json(key: tuple[str, int, int]) -> dict:
    with open(key[0], encoding="utf-8") as f:
        return json.load(f)


def load_clinc150(split: str = "train") -> list[tuple[str, str]]:
    """CLINC150 "full" ``(text, intent)`` pairs: train/val/test (in scope) or oos_train/oos_val/oos_test
    (label 'oos')."""
    if split not in CLINC150_SPLITS:
        raise ValueError(f"CLINC150 split must be one of {CLINC150_SPLITS}, got {split!r}")
    data = _read_json(_file_key(data_file("clinc150/data_full.json")))
    return [(str(text), str(label)) for text, label in data[split]]


def clinc_domains() -> dict[str, list[str]]:
    """CLINC150 domain -> its 15 intents."""
    data = _read_json(_file_key(data_file("clinc150/domains.json")))
    return {k: list(v) for k, v in data.items()}


def clinc_out_of_domain(
    split: str = "train",
    exclude_domains: Iterable[str] = ("banking", "credit_cards"),
    exclude_intents: Iterable[str] = BANK_ADJACENT_CLINC_INTENTS,
) -> list[tuple[str, str]]:
    """In-scope CLINC150 queries from other domains (weather, travel, cooking, ...): out of scope for a
    bank assistant. Labels stay the CLINC intent names; intents in ``exclude_intents`` (bank-adjacent or
    dialogue-control ones, see ``BANK_ADJACENT_CLINC_INTENTS``) are left out."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"clinc_out_of_domain split must be train, val or test, got {split!r}")
    domains = clinc_domains()
    excluded_domains = set(exclude_domains)
    unknown = excluded_domains - set(domains)
    if unknown:
        raise ValueError(f"unknown CLINC150 domains {sorted(unknown)}; known: {sorted(domains)}")
    dropped = set(exclude_intents)
    keep = {i for d, intents in domains.items() if d not in excluded_domains for i in intents} - dropped
    return [(t, y) for t, y in load_clinc150(split) if y in keep]


# ---------------------------------------------------------------- Schema-Guided Dialogue


@dataclass(frozen=True)
class SgdUserTurn:
    """One user turn of an SGD dialogue, with the acts of the system turn it answers."""

    dialogue_id: str
    turn: int  # index of the turn in its dialogue (user turns are the even ones)
    utterance: str
    acts: tuple[str, ...]  # the user's dialogue acts (sorted, over all frames): INFORM, AFFIRM, NEGATE, ...
    system_acts: tuple[str, ...]  # the previous system turn's acts; () for the dialogue's first turn
    services: tuple[str, ...]

    @property
    def pending(self) -> bool:
        """The system had just asked, offered or asked to confirm something (``SGD_PENDING_SYSTEM_ACTS``)."""
        return bool(SGD_PENDING_SYSTEM_ACTS & set(self.system_acts))


def _turn_acts(turn: dict) -> tuple[str, ...]:
    return tuple(sorted({a["act"] for frame in turn.get("frames", []) for a in frame.get("actions", [])}))


@lru_cache(maxsize=4)
def _read_sgd(key: tuple[str, int, int]) -> tuple[SgdUserTurn, ...]:
    data = _read_json(key)
    if not isinstance(data, list) or not all(isinstance(d, dict) and "turns" in d for d in data):
        raise ValueError(f"{key[0]}: expected a JSON list of SGD dialogues (objects with 'dialogue_id' and 'turns')")
    out = []
    for dialogue in data:
        system: tuple[str, ...] = ()
        for i, turn in enumerate(dialogue["turns"]):
            if turn["speaker"] == "SYSTEM":
                system = _turn_acts(turn)
                continue
            out.append(SgdUserTurn(dialogue_id=str(dialogue["dialogue_id"]), turn=i, utterance=str(turn["utterance"]),
                                   acts=_turn_acts(turn), system_acts=system,
                                   services=tuple(dialogue.get("services", ()))))
    return tuple(out)


def load_sgd_user_turns(relpath: str = SGD_SAMPLE) -> list[SgdUserTurn]:
    """The user turns of an SGD dialogue shard (default: the Banks_1 sample), in dialogue order."""
    return list(_read_sgd(_file_key(data_file(relpath))))


def fingerprint(relpaths: Iterable[str] = tuple(REMOTE_FILES)) -> dict[str, dict]:
    """SHA-256 and size of each data file (for build manifests)."""
    out = {}
    for rel in relpaths:
        path = data_file(rel)
        out[rel] = {"sha256": _sha256_cached(_file_key(path)), "bytes": path.stat().st_size}
    return out


@lru_cache(maxsize=32)
def _sha256_cached(key: tuple[str, int, int]) -> str:
    return file_sha256(Path(key[0]))
