"""Experiment tracking for the training and tuning jobs: TensorBoard event files, optionally MLflow or W&B.

- ``train_intent`` writes its own curves with tensorboardX's ``SummaryWriter`` into ``<output>/tensorboard``
  (``EpochLogger``): ``train/loss`` and ``train/lr`` per optimiser step, ``epoch/*`` (train loss, validation
  accuracy, macro-F1, loss) per epoch, and ``best/*`` (the restored best epoch's validation metrics, the ones
  the job reports) once at the end, at the best epoch's step.
- The Tune jobs (``tune_intent``, ``tune_policy``) pass ``tune_callbacks(...)`` to ``RunConfig``: Ray Tune's
  ``TBXLoggerCallback`` writes one event file per trial into ``<output>/tune/<trial>/`` (tags
  ``ray/tune/<metric>``, one step per report), plus, when asked with ``--tracking mlflow`` / ``wandb``, Ray's
  ``MLflowLoggerCallback`` (a local ``file:<output>/mlruns`` store unless ``MLFLOW_TRACKING_URI`` is set) or
  ``WandbLoggerCallback`` (offline unless ``WANDB_MODE`` says otherwise). Neither is installed by default and
  neither talks to a network service by default.

``read_scalars`` reads the event files back (tensorboard's ``EventAccumulator``): the tests and the notebooks
use it. ``tensorboard --logdir <output>`` shows them all.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"  # train_intent's event files, under its --output
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")


def add_tracking_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking", choices=TRACKERS, default="tensorboard",
                        help="TensorBoard event files (default), plus MLflow (local file: store) or W&B (offline) "
                             "when that package is installed; 'none': no event files")


class EpochLogger:
    """TensorBoard scalars of one training run (tensorboardX ``SummaryWriter``); a no-op when ``logdir`` is None."""

    def __init__(self, logdir: Path | None) -> None:
        self.logdir = logdir
        self._writer = None
        if logdir is not None:
            from tensorboardX import SummaryWriter

            logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(logdir), flush_secs=10)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self._writer is not None:
            self._writer.add_scalar("train/loss", float(loss), step)
            self._writer.add_scalar("train/lr", float(lr), step)

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "epoch_seconds"):
            if key in metrics:
                self._writer.add_scalar(f"epoch/{key}", float(metrics[key]), epoch)
        self._writer.flush()

    def best(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The validation metrics the job reports (its best epoch's), at that epoch's step."""
        if self._writer is None:
            return
        for key in ("val_loss", "val_accuracy", "val_macro_f1"):
            self._writer.add_scalar(f"best/{key}", float(metrics[key]), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tune_callbacks(tracking: str, output: Path, experiment: str) -> list[Any]:
    """Ray Tune callbacks for ``RunConfig(callbacks=...)``: TensorBoard files per trial (explicitly, rather than
    relying on Tune adding its TBX logger when tensorboardX happens to be importable), and MLflow or W&B on request.
    ``tracking='none'`` still returns Tune's CSV and JSON loggers (the jobs read ``progress.csv`` back) and sets no
    TensorBoard logger."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    if tracking not in TRACKERS:
        raise ValueError(f"tracking must be one of {TRACKERS}, got {tracking!r}")
    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if tracking == "none":
        # Tune adds its default loggers (TBX among them) unless told not to.
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        return callbacks
    from ray.tune.logger import TBXLoggerCallback

    callbacks.append(TBXLoggerCallback())
    if tracking == "mlflow":
        _require("mlflow", "--tracking mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output / "mlruns").resolve().as_uri()
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False))
    elif tracking == "wandb":
        _require("wandb", "--tracking wandb")
        from ray.air.integrations.wandb import WandbLoggerCallback

        os.environ.setdefault("WANDB_MODE", "offline")  # never a network service unless the user says so
        callbacks.append(WandbLoggerCallback(project=experiment, dir=str(output)))
    return callbacks


def _require(module: str, flag: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{flag}: the {module!r} package is not installed (pip install {module})")


def event_dirs(root: Path) -> list[Path]:
    """The folders under ``root`` (itself included) that hold TensorBoard event files, sorted."""
    return sorted({p.parent for p in Path(root).rglob("events.out.tfevents.*")})


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``logdir`` (not its sub-folders): ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}
