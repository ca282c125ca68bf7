"""Evaluate an intent model folder (either kind), in the manner of ``rasa test``.

- In scope: the BANKING77 test split (3,080 queries). ``accuracy``/``macro_f1`` are closed-set (argmax over the
  77 intents, the figure published BANKING77 results quote); ``*_78way`` count a query predicted out of scope
  as an error. Per-intent precision/recall/F1/support (closed set) and the most frequent confusions.
- Out of scope: the CLINC150 out-of-scope test queries (1,000) against the BANKING77 test queries. The score is
  the model's P(out of scope); AUROC, and the false-positive rate at 95% in-scope recall (the threshold that
  keeps 95% of the in-scope queries in scope: the share of out-of-scope queries it lets through). The same for
  the max-softmax-probability score (1 - max in-scope probability) for reference.
- Calibration of the 78-way distribution the decision policy consumes: expected calibration error (15 equal-
  width confidence bins) on the BANKING77 test split and on test + out-of-scope queries, NLL, Brier score.

Artefacts in ``--out`` (default ``results/evaluate/<timestamp>``): ``report.json``, ``confusion_matrix.png``
(78-way, row-normalised, test + out-of-scope queries), ``reliability.png``, ``errors.csv`` (every misclassified
query: in-scope queries predicted wrongly by the 78-way argmax, out-of-scope queries predicted in scope).

    python -m coact.cluster.jobs.evaluate --model models/intent
    python -m coact.cluster.jobs.evaluate --model models/intent-ft --out results/evaluate/ft
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from coact.cluster.jobs import common as C
from coact.cluster.runtime import quiet_env

JOB = "evaluate"
log = C.logger(JOB)
N_BINS = 15


# ---------------------------------------------------------------- metrics

def calibration_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, float]]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for k in range(n_bins):
        sel = which == k
        out.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "count": int(sel.sum()),
                    "confidence": float(conf[sel].mean()) if sel.any() else None,
                    "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return out


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """sum_b |B|/n * |acc(B) - conf(B)| over equal-width confidence bins."""
    n = len(conf)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in calibration_bins(conf, correct, n_bins) if b["count"]))


def fpr_at_recall(in_scores: np.ndarray, oos_scores: np.ndarray, recall: float = 0.95) -> tuple[float, float]:
    """(share of out-of-scope queries accepted as in scope, threshold) when the threshold on the out-of-scope
    score keeps ``recall`` of the in-scope queries in scope (a query is in scope when score <= threshold)."""
    thr = float(np.quantile(in_scores, recall, method="higher"))
    return float((oos_scores <= thr).mean()), thr


def oos_metrics(in_scores: np.ndarray, oos_scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.zeros(len(in_scores)), np.ones(len(oos_scores))])
    s = np.concatenate([in_scores, oos_scores])
    fpr, thr = fpr_at_recall(in_scores, oos_scores)
    return {"auroc": float(roc_auc_score(y, s)), "fpr_at_95_in_scope_recall": fpr, "threshold": thr}


def top_confusions(y: np.ndarray, pred: np.ndarray, labels: list[str], k: int = 20) -> list[dict[str, Any]]:
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(y.tolist(), pred.tolist(), strict=True):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"true": labels[t], "predicted": labels[p], "count": c} for (t, p), c in best]


# ---------------------------------------------------------------- plots

def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's) alone

    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig = Figure(figsize=(16, 15))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=5)
    ax.set_yticklabels(labels, fontsize=5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="share of the true label's queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_reliability(curves: dict[str, list[dict[str, float]]], eces: dict[str, float], path: Path,
                     title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 7))
    ax, axh = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    colors = ["tab:blue", "tab:orange"]
    width = 1.0 / N_BINS
    for (name, bins), color in zip(curves.items(), colors, strict=False):
        mids = [(b["lo"] + b["hi"]) / 2 for b in bins if b["count"]]
        acc = [b["accuracy"] for b in bins if b["count"]]
        conf = [b["confidence"] for b in bins if b["count"]]
        ax.plot(conf, acc, "o-", color=color, label=f"{name} (ECE {eces[name]:.3f})")
        axh.bar(mids, [b["count"] for b in bins if b["count"]], width=width * 0.9, alpha=0.5, color=color,
                label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    axh.set_yscale("log")
    axh.set_xlabel("confidence (max probability, 78-way)")
    axh.set_ylabel("queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- evaluation

def predict(model, texts: list[str], name: str, progress: bool = True) -> np.ndarray:
    if getattr(model, "needs_texts", False):
        return model.predict_proba_texts(texts, None, progress=f"classify {name}" if progress else False)
    emb = C.cached_embeddings(name, texts, model.encoder_max_length, log=log)
    return model.predict_proba_texts(texts, emb)


def evaluate(model_path: str | Path, out: str | Path | None = None, limit: int | None = None,
             oos_limit: int | None = None, seed: int = 0, progress: bool = True, threads: int | None = None,
             model: Any = None) -> dict[str, Any]:
    """Evaluate one model folder; write the artefacts into ``out`` and return the report (also report.json).

    ``limit``/``oos_limit`` evaluate on a seeded sample of the test queries (quick runs only).
    """
    import pandas as pd
    from sklearn.metrics import (
        classification_report,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    from coact.actors.intent_models import load_intent_model

    quiet_env()
    timer = C.Timer()
    out = C.output_dir(JOB, out)
    C.set_threads(threads)
    model_path = Path(model_path).expanduser().resolve()
    if model is None:
        model = load_intent_model(model_path)
    labels = list(model.labels)
    k = model.out_of_scope_index
    in_scope = [i for i in range(len(labels)) if i != k]
    texts, y, oos_texts = C.load_test_data(labels, limit=limit, oos_limit=oos_limit, seed=seed)
    sample = "" if limit is None and oos_limit is None else "-sample"
    log(f"evaluating {model_path} ({model.kind}, version {model.version}) on {len(texts)} BANKING77 test and "
        f"{len(oos_texts)} CLINC150 out-of-scope queries")
    t0 = C.Timer()
    P = predict(model, texts, "banking77-test" + sample, progress)
    Po = predict(model, oos_texts, "clinc-oos-test" + sample, progress)
    predict_s = t0()

    # in scope: closed set (77 intents) and open set (78-way)
    pred77 = np.array(in_scope)[P[:, in_scope].argmax(1)]
    pred78 = P.argmax(1)
    present = [i for i in in_scope if (y == i).any()]
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred77, labels=present, zero_division=0)
    per_intent = {labels[i]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                  for i, p, r, f, s in zip(present, prec, rec, f1, sup, strict=True)}
    report_text = classification_report(y, pred77, labels=present, target_names=[labels[i] for i in present],
                                        digits=4, zero_division=0)

    # out of scope
    p_oos_in, p_oos_out = P[:, k], Po[:, k]
    msp_in, msp_out = 1.0 - P[:, in_scope].max(1), 1.0 - Po[:, in_scope].max(1)
    oos = {"score": "p(out_of_scope)", **oos_metrics(p_oos_in, p_oos_out),
           "msp": oos_metrics(msp_in, msp_out),
           "oos_recall_78way": float((Po.argmax(1) == k).mean()),
           "in_scope_predicted_out_of_scope_rate": float((pred78 == k).mean()),
           "n_in_scope": len(texts), "n_out_of_scope": len(oos_texts)}

    # calibration (78-way distribution)
    conf_in, correct_in = P.max(1), (pred78 == y).astype(float)
    y_all = np.concatenate([y, np.full(len(oos_texts), k)])
    P_all = np.concatenate([P, Po])
    conf_all, correct_all = P_all.max(1), (P_all.argmax(1) == y_all).astype(float)
    eps = 1e-12
    calib = {
        "ece": expected_calibration_error(conf_in, correct_in),
        "ece_with_out_of_scope": expected_calibration_error(conf_all, correct_all),
        "nll": float(-np.log(P[np.arange(len(y)), y] + eps).mean()),
        "nll_with_out_of_scope": float(-np.log(P_all[np.arange(len(y_all)), y_all] + eps).mean()),
        "brier": float(((P - np.eye(len(labels))[y]) ** 2).sum(1).mean()),
        "mean_confidence": float(conf_in.mean()),
        "temperature": float(model.temperature),
        "n_bins": N_BINS,
        "bins": calibration_bins(conf_in, correct_in),
        "bins_with_out_of_scope": calibration_bins(conf_all, correct_all),
    }

    report: dict[str, Any] = {
        "model": {"path": str(model_path), "kind": model.kind, "version": model.version,
                  "max_length": int(model.encoder_max_length)},
        "data": {"in_scope": "BANKING77 test", "out_of_scope": "CLINC150 oos_test", "n_test": len(texts),
                 "n_oos_test": len(oos_texts), "sampled": bool(sample), "limit": limit, "oos_limit": oos_limit},
        "accuracy": float((pred77 == y).mean()),
        "macro_f1": float(f1_score(y, pred77, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, pred77, labels=present, average="weighted", zero_division=0)),
        "accuracy_78way": float((pred78 == y).mean()),
        "macro_f1_78way": float(f1_score(y, pred78, labels=present, average="macro", zero_division=0)),
        "per_intent": per_intent,
        "top_confusions": top_confusions(y, pred77, labels),
        "out_of_scope": oos,
        "calibration": calib,
        "classification_report_text": report_text,
        "seconds": {"predict": round(predict_s, 1)},
    }

    # errors.csv
    rows = []
    for i in np.flatnonzero(pred78 != y):
        rows.append({"source": "banking77_test", "text": texts[i], "true_label": labels[y[i]],
                     "predicted_label": labels[pred78[i]], "confidence": float(P[i].max()),
                     "p_true": float(P[i, y[i]]), "p_out_of_scope": float(P[i, k])})
    for i in np.flatnonzero(Po.argmax(1) != k):
        rows.append({"source": "clinc150_oos_test", "text": oos_texts[i], "true_label": labels[k],
                     "predicted_label": labels[int(Po[i].argmax())], "confidence": float(Po[i].max()),
                     "p_true": float(Po[i, k]), "p_out_of_scope": float(Po[i, k])})
    cols = ["source", "text", "true_label", "predicted_label", "confidence", "p_true", "p_out_of_scope"]
    pd.DataFrame(rows, columns=cols).to_csv(out / "errors.csv", index=False)

    cm = confusion_matrix(y_all, P_all.argmax(1), labels=list(range(len(labels))))
    name = model_path.name
    plot_confusion(cm, labels, out / "confusion_matrix.png",
                   f"{name}: 78-way confusion (BANKING77 test + CLINC150 out-of-scope), accuracy "
                   f"{report['accuracy_78way']:.4f}")
    plot_reliability({"BANKING77 test": calib["bins"], "+ out-of-scope queries": calib["bins_with_out_of_scope"]},
                     {"BANKING77 test": calib["ece"], "+ out-of-scope queries": calib["ece_with_out_of_scope"]},
                     out / "reliability.png", f"{name}: reliability (T={model.temperature:.2f})")
    report["seconds"]["total"] = round(timer(), 1)
    report["artefacts"] = {f: str(out / f) for f in ("report.json", "confusion_matrix.png", "reliability.png",
                                                     "errors.csv")}
    C.write_json(out / "report.json", report)
    log(f"accuracy {report['accuracy']:.4f} (78-way {report['accuracy_78way']:.4f}), macro-F1 "
        f"{report['macro_f1']:.4f}; out of scope: AUROC {oos['auroc']:.4f}, FPR@95% in-scope recall "
        f"{oos['fpr_at_95_in_scope_recall']:.4f}; ECE {calib['ece']:.4f} (with OOS "
        f"{calib['ece_with_out_of_scope']:.4f}); {len(rows)} errors; {report['seconds']['total']:.0f}s")
    return report


def summary_line(report: dict[str, Any]) -> str:
    o, c = report["out_of_scope"], report["calibration"]
    return (f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  (78-way accuracy "
            f"{report['accuracy_78way']:.4f}, macro-F1 {report['macro_f1_78way']:.4f})  OOS AUROC {o['auroc']:.4f}  "
            f"FPR@95 {o['fpr_at_95_in_scope_recall']:.4f}  ECE {c['ece']:.4f}  (with OOS {c['ece_with_out_of_scope']:.4f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coact.cluster.jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default <models>/intent)")
    p.add_argument("--out", "--output", dest="out", type=Path, default=None,
                   help="artefact folder (default results/evaluate/<timestamp>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a sample of N BANKING77 test queries")
    p.add_argument("--oos-limit", type=int, default=None, help="... and of N out-of-scope queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.model is None:
        from coact.actors import models as M

        args.model = M.intent_path()
    report = evaluate(args.model, args.out, limit=args.limit, oos_limit=args.oos_limit, seed=args.seed,
                      progress=args.progress, threads=args.threads)
    print(summary_line(report))
    print("most frequent confusions:")
    for c in report["top_confusions"][:10]:
        print(f"  {c['count']:3d}  {c['true']} -> {c['predicted']}")
    out = Path(report["artefacts"]["report.json"]).parent
    print(f"artefacts: {out}")
    for f in report["artefacts"].values():
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
