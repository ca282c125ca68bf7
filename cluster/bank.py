"""The utterance bank built from the real models: held-out BANKING77 / CLINC150 texts read once by the intent
model, the finding heads and the act classifier, cached under ``<models>/cache``. The simulator
(``coact.graphs.policy.simulator``) reads the bank as arrays and never loads a model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.artifacts import EmbeddingCache
from coact.graphs.policy.dialogue import split_requests
from coact.graphs.policy.domain import DomainPack
from coact.graphs.policy.simulator import ACT_NAMES, BANK_FORMAT, UtteranceBank

CONTENT_ONLY = "content-only"


def acts_model_version(root: Path) -> str:
    """The act classifier folder's version, or ``CONTENT_ONLY`` when the models folder has none."""
    from coact.actors.models import read_meta

    if not (root / "acts" / "meta.json").is_file():
        return CONTENT_ONLY
    return str(read_meta(root / "acts").get("version", "unversioned"))


def read_bank_acts(root: Path, texts: list[str], embed: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """The acts (n, len(ACT_NAMES)) and content (n,) of ``texts`` as new messages (no question pending).

    The one place the bank reads acts: ``actors.acts.read_acts`` over the act classifier of ``root/acts``
    when it is built, else "content only" (every act 0, content 1: a BANKING77 / CLINC150 query is a request,
    not a conversation act). ``embed(texts, encoder_path, max_length)`` gives the embeddings the act model
    reads. Returns (acts, content, version)."""
    version = acts_model_version(root)
    n = len(texts)
    if version == CONTENT_ONLY:
        return np.zeros((n, len(ACT_NAMES)), np.float32), np.ones(n, np.float32), version
    from coact.actors.acts import ActClassifier, read_acts
    from coact.actors.models import minilm_path

    clf = ActClassifier(root / "acts")
    enc = clf.meta.get("encoder") or {}
    emb = embed(texts, enc.get("path") or str(minilm_path()), int(clf.meta.get("max_length", 64)))
    reading = read_acts(clf, emb, pending=False)
    cols = [reading.names.index(a) for a in ACT_NAMES]
    return reading.acts[:, cols].astype(np.float32), reading.content.astype(np.float32), version


def finding_prior_of(heads: Any) -> np.ndarray:
    """The finding prior the ReasonerActor puts on the wire for these heads (``actors.nlu.reason``): the prior
    the heads' outputs assume, ``FindingHeads.effective_prior`` (0.5 for class-balanced heads)."""
    return np.asarray(heads.effective_prior, dtype=np.float64)


def bank_cache_key(models_dir: str | Path, pack: DomainPack) -> str:
    """Content key: bank format, the intent, finding and act model versions (the findings' whole meta, so a
    corrected prior is seen), the pack's goal states and titles, and how messages are split into parts.
    Reading it needs only the models' meta.json files and the pack (no data, no model)."""
    from coact.actors.models import read_meta
    from coact.graphs.policy import dialogue

    root = Path(models_dir)
    goal = next(v for v in pack.variables if v.name == pack.intent_variable)
    blob = json.dumps({
        "format": BANK_FORMAT,
        "intent": read_meta(root / "intent").get("version"),
        "findings": read_meta(root / "findings"),
        "acts": acts_model_version(root),
        "goal_states": pack.states_of(goal),
        "titles": [i.title for i in pack.intents],
        "out_of_scope": pack.out_of_scope_label,
        "split": [dialogue._SPLIT.pattern, dialogue.MIN_PART_WORDS],
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

def bank_cache_path(models_dir: str | Path, pack: DomainPack) -> Path:
    return Path(models_dir) / "cache" / f"utterance-bank-{pack.name}-{bank_cache_key(models_dir, pack)}.npz"

def build_bank(models_dir: str | Path, pack: DomainPack, refresh: bool = False, log: Any = None) -> UtteranceBank:
    """Load the cached bank for this models folder and pack, or embed and classify the held-out texts once
    (about half a minute on two cores) and cache them under ``<models_dir>/cache/``."""
    path = bank_cache_path(models_dir, pack)
    if path.is_file() and not refresh:
        try:
            return UtteranceBank.load(path)
        except (OSError, ValueError, KeyError):
            pass  # a torn or stale file: rebuild it
    bank = _compute(Path(models_dir), pack, log=log)
    bank.meta["key"] = path.stem.rsplit("-", 1)[-1]
    bank.save(path)
    for stale in path.parent.glob(f"utterance-bank-{pack.name}-*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return bank

def _compute(root: Path, pack: DomainPack, log: Any = None) -> UtteranceBank:
    from coact.actors import models as M
    from coact.actors.intent_models import load_intent_model
    from coact.cluster import datasets as D

    say = log or (lambda _m: None)
    goal_var = next(v for v in pack.variables if v.name == pack.intent_variable)
    goal_states = pack.states_of(goal_var)
    index = {s: i for i, s in enumerate(goal_states)}
    oos = pack.out_of_scope_label

    pairs = [(t, y, "banking77/test") for t, y in D.load_banking77("test") if y in index]
    pairs += [(t, oos, "clinc150/oos_test") for t, _ in D.load_clinc150("oos_test")]
    missing = [s for s in goal_states if not any(y == s for _, y, _ in pairs)]
    if missing:
        raise ValueError(f"no held-out texts for goal states {missing[:5]} (pack {pack.name})")
    texts = [t for t, _, _ in pairs]
    parts = [(p, i) for i, t in enumerate(texts) for p in split_requests(t)]
    part_texts = [p for p, _ in parts]
    titles = [i.title for i in pack.intents]

    import torch

    torch.set_num_threads(int(os.environ.get("COACT_TORCH_THREADS", "2")))
    clf = load_intent_model(root / "intent")
    heads = M.FindingHeads(root / "findings")
    enc_path = (clf.meta.get("encoder") or {}).get("path") or str(M.minilm_path())
    max_length = int(clf.meta.get("max_length", 64))
    say(f"utterance bank: {len(texts)} held-out texts (+{len(part_texts)} parts, {len(titles)} titles), "
        f"encoder {enc_path}")
    caches: dict[str, EmbeddingCache] = {}

    def cache(path: str) -> EmbeddingCache:  # the held-out texts' embeddings are those `coact prepare` cached
        if path not in caches:
            caches[path] = EmbeddingCache(root / "cache", path, log=say)
        return caches[path]

    main = cache(enc_path)
    emb = np.concatenate([
        main.embed("banking77-test", [t for t, _, s in pairs if s == "banking77/test"], max_length),
        main.embed("clinc-oos-test", [t for t, _, s in pairs if s != "banking77/test"], max_length),
    ])
    extra = main.encoder().embed(part_texts + titles, batch_size=32, max_length=max_length)

    def embed(batch: list[str], path: str, length: int) -> np.ndarray:
        if (path, length) == (enc_path, max_length) and batch == texts:
            return emb
        return cache(path).encoder().embed(batch, batch_size=32, max_length=length)

    f_meta = heads.meta.get("encoder") or {}
    f_path, f_len = f_meta.get("path") or enc_path, int(heads.meta.get("max_length", max_length))
    acts, content, acts_version = read_bank_acts(root, texts, embed)
    say(f"utterance bank: acts read by {acts_version}")
    return UtteranceBank(
        goal_states=goal_states, texts=np.asarray(texts, dtype=str),
        goal=np.array([index[y] for _, y, _ in pairs]), source=np.array([s for _, _, s in pairs], dtype=str),
        intent_labels=list(clf.labels), intent_probs=clf.predict_proba_texts(texts, emb).astype(np.float32),
        class_prior=np.asarray(clf.priors, dtype=np.float64), finding_names=list(heads.names),
        finding_probs=heads.predict(embed(texts, f_path, f_len)).astype(np.float32),
        finding_prior=finding_prior_of(heads), acts=acts, content=content,
        part_texts=np.asarray(part_texts, dtype=str), part_of=np.asarray([i for _, i in parts], dtype=np.int64),
        part_probs=clf.predict_proba_texts(part_texts, extra[:len(part_texts)]).astype(np.float32)
        if part_texts else np.zeros((0, len(clf.labels)), np.float32),
        title_names=[i.name for i in pack.intents],
        title_probs=clf.predict_proba_texts(titles, extra[len(part_texts):]).astype(np.float32),
        meta={"format": BANK_FORMAT, "pack": pack.name, "out_of_scope_label": oos,
              "intent_version": clf.version, "findings_version": heads.version, "acts_version": acts_version,
              "encoder": enc_path, "models_dir": str(root), "n": len(texts), "parts": len(part_texts)},
    )
