"""Plots of sweep results (PNG), shared by the sweep job and notebooks/scaling.ipynb."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # without a display matplotlib falls back to Agg; a notebook keeps its own backend
import pandas as pd

STAGES = ("intent", "reasoner", "decision", "responder")


def _by_config(df: pd.DataFrame):
    for label, g in df.groupby("config", sort=False):
        yield label, g.sort_values("concurrency")


def throughput_latency(df: pd.DataFrame) -> plt.Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, g in _by_config(df):
        a.plot(g["concurrency"], g["throughput_tps"], "o-", label=label)
        line, = b.plot(g["concurrency"], g["latency_ms_p50"] / 1000, "o-", label=f"{label} p50")
        b.plot(g["concurrency"], g["latency_ms_p99"] / 1000, "s--", color=line.get_color(), label=f"{label} p99")
    a.set(xlabel="concurrent users (closed loop)", ylabel="turns / s", title="Throughput", xscale="log")
    b.set(xlabel="concurrent users (closed loop)", ylabel="latency (s)", title="End-to-end latency p50 / p99",
          xscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=6)
    fig.tight_layout()
    return fig


def stage_breakdown(df: pd.DataFrame) -> plt.Figure:
    """Mean ms per stage split into model compute, batch wait and the rest (queue + hop), per point."""
    rows = df.sort_values(["config", "concurrency"])
    labels = [f"{r.config}\nc={r.concurrency}" for r in rows.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    bottom = pd.Series(0.0, index=rows.index)
    for stage in STAGES:
        total = rows[f"{stage}_ms_mean"].fillna(0)
        compute = rows[f"{stage}_batch_exec_ms_mean"].fillna(rows[f"{stage}_replica_ms_mean"]).fillna(0).clip(upper=total)
        wait = rows[f"{stage}_batch_wait_ms_mean"].fillna(0).clip(upper=total - compute)
        rest = (total - compute - wait).clip(lower=0)
        for part, val, hatch in (("compute", compute, ""), ("batch wait", wait, ".."), ("queue+hop", rest, "//")):
            ax.bar(range(len(rows)), val, bottom=bottom, hatch=hatch, label=f"{stage} {part}",
                   color=f"C{STAGES.index(stage)}", alpha=1.0 if part == "compute" else 0.5, edgecolor="k", lw=0.3)
            bottom = bottom + val
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("mean ms per turn (ingress-measured)")
    ax.set_title("Where a turn's time goes (compute and batch wait from Serve's metrics)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def batch_sizes(df: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, g in _by_config(df):
        for stage, marker in (("reasoner", "o-"), ("responder", "s--")):
            ax.plot(g["concurrency"], g[f"{stage}_batch_size_mean"], marker, label=f"{label} {stage}")
    ax.set(xlabel="concurrent users", ylabel="mean batch size formed", title="Batch sizes (Serve metrics)",
           xscale="log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def predicted_vs_measured(check: pd.DataFrame) -> plt.Figure:
    """The capacity model's p99 against the measured p99 at every sweep point (capacity.check_against)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, g in check.groupby("config", sort=False):
        ax.scatter(g["measured_p99_s"], g["predicted_p99_s"], label=label)
        for r in g.itertuples():
            ax.annotate(f"c={r.concurrency}", (r.measured_p99_s, r.predicted_p99_s), fontsize=6)
    hi = float(max(check["measured_p99_s"].max(), check["predicted_p99_s"].max())) * 1.1
    ax.plot([0, hi], [0, hi], "k-", lw=0.8, label="exact")
    ax.plot([0, hi], [0, 2 * hi], "k:", lw=0.6, label="2x / 0.5x")
    ax.plot([0, hi], [0, hi / 2], "k:", lw=0.6)
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="measured p99 (s)", ylabel="predicted p99 (s)",
           title="Capacity model vs measured")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def sweep_plots(points_csv: Path, out: Path) -> list[Path]:
    df = pd.read_csv(points_csv)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in (("throughput_latency", throughput_latency), ("stage_breakdown", stage_breakdown),
                     ("batch_sizes", batch_sizes)):
        fig = fn(df)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
