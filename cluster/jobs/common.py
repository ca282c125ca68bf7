"""Helpers shared by the job entrypoints (``train_intent``, ``evaluate``, ``tune_intent``).

- output folders: ``--output`` or ``$COACT_RESULTS_DIR/<job>/<timestamp>`` (default ``<repo>/results``,
  git-ignored). Under ``ray job submit`` the repository is an uploaded copy in Ray's temp dir: pass an
  absolute ``--output`` or ``COACT_RESULTS_DIR`` (and ``COACT_MODELS_DIR``) through the runtime env.
- seeding and torch threads;
- attaching to Ray: reuse an initialised Ray, attach to the job's cluster under ``ray job submit``, or
  start a private local one bound to 127.0.0.1;
- the intent data: exactly the training set and split ``cluster.prepare`` uses (BANKING77 train + CLINC150
  oos_train + other-domain CLINC queries, stratified 10% validation, seed 0), the BANKING77 test split and
  the CLINC150 out-of-scope test queries;
- sentence embeddings cached in ``<models>/cache`` under the same keys as ``cluster.prepare`` (so the
  prepared embeddings are reused).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.local import quiet_env  # noqa: F401 - re-exported for the jobs

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


def write_json(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


# ---------------------------------------------------------------- ray

def inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Attach to Ray or start a local one; True when this call connected (the caller then shuts it down).

    - already initialised (a test fixture, a notebook): reuse it, return False, leave it running;
    - ``address`` given: attach to it;
    - inside ``ray job submit`` (``RAY_ADDRESS``/``RAY_JOB_ID`` set): ``ray.init()`` attaches to the job's cluster;
    - otherwise a fresh private local Ray bound to 127.0.0.1 without dashboard (``address="local"``: never
      attach to some other cluster started on this machine with ``ray start``).
    """
    import ray

    quiet_env()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    elif inside_ray_job():
        ray.init()
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus)
    return True


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
    """The training set and stratified train/validation split of ``cluster.prepare`` (same seed and order)."""
    from sklearn.model_selection import train_test_split

    from coact.cluster import datasets as D
    from coact.cluster import prepare as P

    labels, oos_label = intent_labels(domain)
    index = {label: i for i, label in enumerate(labels)}
    bank = D.load_banking77("train")
    oos = [(t, "oos") for t, _ in D.load_clinc150("oos_train")] + P._sample_per_intent(
        D.clinc_out_of_domain("train"), P.OOD_PER_INTENT, P.SEED)
    texts = [t for t, _ in bank] + [t for t, _ in oos]
    intents = [y for _, y in bank] + [oos_label] * len(oos)
    source = ["banking77"] * len(bank) + [f"clinc:{y}" for _, y in oos]
    idx = np.arange(len(texts))
    tr, va = train_test_split(idx, test_size=P.VAL_FRACTION, stratify=intents, random_state=P.SEED)
    return IntentData(
        texts=texts, y=np.array([index[i] for i in intents]), labels=labels, out_of_scope_label=oos_label,
        train_idx=np.sort(tr), val_idx=np.sort(va), source=source, name="intent-train",
        meta={"banking77_train": len(bank), "out_of_scope": len(oos), "val_fraction": P.VAL_FRACTION,
              "split_seed": P.SEED, "ood_per_clinc_intent": P.OOD_PER_INTENT,
              "n_bank": len(bank)},
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

_ENCODERS: dict[tuple[str, int], Any] = {}


def encoder_fingerprint() -> str:
    from coact.actors import models as M

    return M.folder_fingerprint(M.minilm_path())


def cache_dir(models: str | Path | None = None) -> Path:
    from coact.actors import models as M

    return (Path(models) if models is not None else M.models_dir()) / "cache"


def cached_embeddings(name: str, texts: list[str], max_length: int = 64, models: str | Path | None = None,
                      log=None) -> np.ndarray:
    """(n, 384) MiniLM sentence embeddings of ``texts``, cached in ``<models>/cache``.

    The cache key is ``cluster.prepare``'s (encoder fingerprint, max length, the texts), so the embeddings
    ``coact prepare`` computed at max length 64 are found again under their names ('banking77-train',
    'oos-train', 'banking77-test', 'clinc-oos-test'). Other lengths get an ``-L<n>`` name suffix.
    """
    from coact.actors import models as M
    from coact.cluster import prepare as P

    texts = [str(t) for t in texts]
    fp = encoder_fingerprint()
    key = P._hash(fp, int(max_length), texts, n=12)
    stem = name if int(max_length) == P.MAX_LENGTH else f"{name}-L{int(max_length)}"
    folder = cache_dir(models)
    path = folder / f"emb-{stem}-{key}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape == (len(texts), M.EMBED_DIM):
            return emb
    if log:
        log(f"embedding {len(texts)} texts ({stem}, max length {max_length}) -> {path}")
    enc_key = (str(M.minilm_path()), int(max_length))
    if enc_key not in _ENCODERS:
        _ENCODERS[enc_key] = M.TextEncoder(M.minilm_path(), max_length=int(max_length), device="cpu")
    emb = _ENCODERS[enc_key].embed(texts, batch_size=32, max_length=int(max_length), progress=f"embed {stem}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp.npy"
        np.save(tmp, emb)
        os.replace(tmp, path)
    except OSError:  # a read-only models folder: work without the cache
        pass
    return emb


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


def utterance_bank(domain: str, models_dir: Path | None) -> tuple[Any, Any, Path]:
    """The domain pack, the simulator's utterance bank for it and the models folder (built if needed)."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    from coact.cluster.bank import build_bank
    from coact.graphs.policy.domain import load_pack

    pack = load_pack(domain)
    if models_dir is not None:
        models = Path(models_dir).expanduser().resolve()
    else:
        from coact.cluster.prepare import ensure_models

        models = ensure_models(domain)
    return pack, build_bank(models, pack), models
