"""Opt-in experiment tracking: each epoch's log row sent to TensorBoard or MLflow as it is written.

``workbook train --track tensorboard`` writes TensorBoard event files to ``OUT/tensorboard``
(open them with ``tensorboard --logdir OUT``); ``--track mlflow`` logs the run's settings and the
same curves to MLflow's tracking store (``$MLFLOW_TRACKING_URI``, by default ``./mlruns``).  Off
by default.  Both take the rows the training loop hands its per-epoch hook, so the curves are
``log.csv``'s numbers; a resumed run sends only the epochs not sent before.  A tracker whose
library is not installed stops the command before training with one line saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from data_prep.errors import WorkbookError

TRACKERS = ("tensorboard", "mlflow")
#: The log columns sent as curves (``log.csv``), under these names.
CURVES = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
          "val_acc": "accuracy/val", "lr": "lr"}
#: The folder of the TensorBoard event files inside the run folder.
TENSORBOARD_DIR = "tensorboard"


class TrackingError(WorkbookError, ImportError):
    """A tracker was asked for whose library is not installed, or an unknown tracker."""


def check(kind: str | None) -> None:
    """Raise :class:`TrackingError` now, before any work, when tracker ``kind`` cannot run."""
    if kind is None:
        return
    if kind not in TRACKERS:
        raise TrackingError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")
    if importlib.util.find_spec(kind) is None:  # located, not imported: both take seconds to import
        raise TrackingError(MISSING[kind])


MISSING = {"tensorboard": "--track tensorboard needs the tensorboard package: pip install \".[track]\" (or pip "
                          "install -r requirements-track.txt)",
           "mlflow": "--track mlflow needs MLflow: pip install mlflow, or use --track tensorboard"}


class Tracker:
    """Sends the new rows of the log to one tracker; call it with the whole log after every epoch,
    then :meth:`close`."""

    def __init__(self, kind: str, out_dir: Path | str, params: Mapping[str, Any]) -> None:
        self.kind, self.sent = kind, 0
        if kind == "tensorboard":
            check(kind)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR))
            self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        elif kind == "mlflow":
            check(kind)
            import mlflow

            self.mlflow = mlflow
            mlflow.start_run(run_name=Path(out_dir).name)
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        else:
            raise TrackingError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")

    def __call__(self, log: pd.DataFrame) -> None:
        for row in log.iloc[self.sent:].to_dict("records"):
            step = int(row["epoch"])
            values = {name: float(row[column]) for column, name in CURVES.items() if column in row}
            if self.kind == "tensorboard":
                for name, value in values.items():
                    self.writer.add_scalar(name, value, step)
                self.writer.flush()
            else:
                self.mlflow.log_metrics({name.replace("/", "_"): v for name, v in values.items()}, step=step)
        self.sent = len(log)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.mlflow.end_run()


def chain(*hooks: Callable[[pd.DataFrame], None] | None) -> Callable[[pd.DataFrame], None] | None:
    """One per-epoch hook calling each of ``hooks`` (None ones left out), or None when there are none."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None

    def call(log: pd.DataFrame) -> None:
        for hook in present:
            hook(log)

    return call
