"""Helpers shared by the job entrypoints (``train_intent``, ``evaluate``, ``tune_intent``).

- output folders: ``--output`` or ``$COACT_RESULTS_DIR/<job>/<timestamp>`` (default ``<repo>/results``,
  git-ignored). Under ``ray job submit`` the repository is an uploaded copy in Ray's temp dir: pass an
  absolute ``--output`` or ``COACT_RESULTS_DIR`` (and ``COACT_MODELS_DIR``) through the runtime env.
- seeding and torch threads;
- the intent data: exactly the training set and split ``cluster.prepare`` uses (BANKING77 train + CLINC150
  oos_train + other-domain CLINC queries, stratified 10% validation, seed 0), the BANKING77 test split and
  the CLINC150 out-of-scope test queries;
- sentence embeddings cached in ``<models>/cache`` under the same keys as ``cluster.prepare`` (so the
  prepared embeddings are reused).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.artifacts import write_json  # noqa: F401 - the jobs write through C.write_json
from coact.cluster.runtime import quiet_env

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- environment and output

def apply_preset(args, preset: dict[str, Any]) -> None:
    """Fill the options the user left unset (None) from a preset (defaults or --smoke)."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def logger(job: str):
    def log(msg: str) -> None:
        print(f"[{job}] {msg}", file=sys.stderr, flush=True)

    return log


def results_root() -> Path:
    env = os.environ.get("COACT_RESULTS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "results"


def output_dir(job: str, output: str | Path | None = None) -> Path:
    """``output`` (created) or a fresh ``<results>/<job>/<YYYYmmdd-HHMMSS>`` folder; absolute."""
    if output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = results_root() / job / stamp
        n = 1
        while out.exists():
            n += 1
            out = results_root() / job / f"{stamp}-{n}"
    else:
        out = Path(output)
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def set_threads(n: int | None = None) -> int:
    """torch intra-op threads: ``n``, else ``$COACT_TORCH_THREADS``, else 2 (the machine is shared)."""
    import torch

    n = int(n or os.environ.get("COACT_TORCH_THREADS", "2"))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------- data

@dataclass
class IntentData:
    """Intent training data: ``texts[i]`` has label index ``y[i]``; ``train_idx``/``val_idx`` split it."""

    texts: list[str]
    y: np.ndarray
    labels: list[str]
    out_of_scope_label: str
    train_idx: np.ndarray
    val_idx: np.ndarray
    source: list[str]
    name: str = "intent"  # cache name of this text list's embeddings
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def out_of_scope_index(self) -> int:
        return self.labels.index(self.out_of_scope_label)

    def priors(self) -> dict[str, float]:
        counts = np.bincount(self.y, minlength=self.num_labels).astype(float)
        return {label: float(c / counts.sum()) for label, c in zip(self.labels, counts, strict=True)}

    def subset(self, train_per_class: int | None, val_per_class: int | None, seed: int = 0) -> IntentData:
        """At most ``*_per_class`` examples of each label in each split (all when None), re-indexed."""
        if train_per_class is None and val_per_class is None:
            return self
        tr = per_class(self.train_idx, self.y, train_per_class, seed)
        va = per_class(self.val_idx, self.y, val_per_class, seed + 1)
        keep = np.concatenate([tr, va])
        return IntentData(
            texts=[self.texts[i] for i in keep], y=self.y[keep], labels=self.labels,
            out_of_scope_label=self.out_of_scope_label, train_idx=np.arange(len(tr)),
            val_idx=np.arange(len(tr), len(keep)), source=[self.source[i] for i in keep],
            name=f"{self.name}-sub{train_per_class}-{val_per_class}-s{seed}",
            meta={**self.meta, "train_per_class": train_per_class, "val_per_class": val_per_class, "subset_seed": seed},
        )


def per_class(idx: np.ndarray, y: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """A seeded sample of at most ``k`` indices per label from ``idx`` (sorted); all when ``k`` is None."""
    if k is None:
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    out = []
    for label in np.unique(y[idx]):
        members = idx[y[idx] == label]
        out.append(members if len(members) <= k else rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=int)


def intent_labels(domain: str = "banking") -> tuple[list[str], str]:
    """(the 77 BANKING77 intents + the pack's out-of-scope label, that label)."""
    from coact.cluster import datasets as D
    from coact.graphs.policy.domain import load_pack

    oos = load_pack(domain).out_of_scope_label
    return D.banking77_labels() + [oos], oos


def load_intent_data(domain: str = "banking") -> IntentData:
    """The training set and stratified train/validation split of ``cluster.prepare`` (the same assembly)."""
    from coact.cluster import prepare as P

    labels, oos_label = intent_labels(domain)
    index = {label: i for i, label in enumerate(labels)}
    ts = P.intent_training_set(oos_label)
    n_bank = ts["n_banking77"]
    return IntentData(
        texts=ts["texts"], y=np.array([index[i] for i in ts["intents"]]), labels=labels,
        out_of_scope_label=oos_label, train_idx=ts["train_idx"], val_idx=ts["val_idx"], source=ts["source"],
        name="intent-train",
        meta={"banking77_train": n_bank, "out_of_scope": len(ts["texts"]) - n_bank, "val_fraction": P.VAL_FRACTION,
              "split_seed": P.SEED, "ood_per_clinc_intent": P.OOD_PER_INTENT, "n_bank": n_bank},
    )


def load_test_data(labels: list[str], limit: int | None = None, oos_limit: int | None = None,
                   seed: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
    """(BANKING77 test texts, their label indices in ``labels``, CLINC150 oos_test texts).

    ``limit``/``oos_limit``: a seeded stratified sample of that many in-scope / out-of-scope queries
    (quick runs); None means the full splits (3,080 and 1,000).
    """
    from coact.cluster import datasets as D

    index = {label: i for i, label in enumerate(labels)}
    test = D.load_banking77("test")
    texts = [t for t, _ in test]
    y = np.array([index[lab] for _, lab in test])
    oos = [t for t, _ in D.load_clinc150("oos_test")]
    if limit is not None and limit < len(texts):
        per = max(1, int(np.ceil(limit / len(np.unique(y)))))
        keep = per_class(np.arange(len(texts)), y, per, seed)[:limit]
        texts, y = [texts[i] for i in keep], y[keep]
    if oos_limit is not None and oos_limit < len(oos):
        keep = np.sort(np.random.default_rng(seed).choice(len(oos), size=oos_limit, replace=False))
        oos = [oos[i] for i in keep]
    return texts, y, oos


# ---------------------------------------------------------------- embeddings

def encoder_fingerprint() -> str:
    from coact.actors import models as M

    return M.folder_fingerprint(M.minilm_path())


def cached_embeddings(name: str, texts: list[str], max_length: int = 64, models: str | Path | None = None,
                      log=None) -> np.ndarray:
    """(n, 384) MiniLM sentence embeddings of ``texts`` from ``<models>/cache`` (``artifacts.EmbeddingCache``,
    the cache ``coact prepare`` fills: its 'banking77-train', 'oos-train', 'banking77-test', 'clinc-oos-test'
    are found again at max length 64). The jobs embed on CPU."""
    from coact.actors import models as M
    from coact.cluster.artifacts import embedding_cache

    folder = (Path(models) if models is not None else M.models_dir()) / "cache"
    return embedding_cache(folder.resolve(), None, "cpu").embed(name, texts, max_length, log=log)


def intent_embeddings(data: IntentData, max_length: int = 64, models: str | Path | None = None,
                      log=None) -> np.ndarray:
    """Embeddings aligned with ``data.texts``; the full prepared set at length 64 hits prepare's cache."""
    n_bank = data.meta.get("n_bank")
    if data.name == "intent-train" and n_bank is not None:
        return np.concatenate([
            cached_embeddings("banking77-train", data.texts[:n_bank], max_length, models, log),
            cached_embeddings("oos-train", data.texts[n_bank:], max_length, models, log),
        ])
    return cached_embeddings(data.name, data.texts, max_length, models, log)


def utterance_bank(domain: str, models_dir: Path | None, log: Any = None) -> tuple[Any, Any, Path]:
    """The domain pack, the simulator's utterance bank for it and the models folder (built if needed)."""
    quiet_env()
    from coact.cluster.bank import build_bank
    from coact.graphs.policy.domain import load_pack

    pack = load_pack(domain)
    if models_dir is not None:
        models = Path(models_dir).expanduser().resolve()
    else:
        from coact.cluster.prepare import ensure_models

        models = ensure_models(domain)
    return pack, build_bank(models, pack, log=log), models
