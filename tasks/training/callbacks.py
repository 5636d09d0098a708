"""Epoch callbacks, one behaviour each, as Keras's own are (``callbacks/early_stopping.py``).

Each keeps the state it needs to resume from a checkpoint (:meth:`state`, and a constructor
that takes it back), so a job killed at epoch 7 goes on at epoch 8 as if it had not stopped.
They work with any Keras model object: tests drive them with a list of losses and no training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import tf_keras

from tasks.training.weights import named_weights


class EpochLog(tf_keras.callbacks.Callback):
    """The history of every logged metric, plus each epoch's seconds, and the epochs done."""

    def __init__(self, history: dict[str, list[float]] | None = None, epoch: int = 0) -> None:
        super().__init__()
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.epoch = epoch
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        values = {k: float(v) for k, v in (logs or {}).items()}
        values["seconds"] = time.perf_counter() - self._started
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        self.epoch = epoch + 1

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "epoch": self.epoch}


class BestEpoch(tf_keras.callbacks.Callback):
    """Remembers the epoch with the lowest validation loss and, with ``keep_weights``, its
    weights by layer name (what ``--keep-best`` saves instead of the last epoch's)."""

    def __init__(
        self, keep_weights: bool, best_val_loss: float | None = None,
        best_epoch: int | None = None, weights: dict | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.keep_weights = keep_weights
        self.best_val_loss, self.best_epoch, self.weights = best_val_loss, best_epoch, weights

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("val_loss")
        if loss is None or (self.best_val_loss is not None and loss >= self.best_val_loss):
            return
        self.best_val_loss, self.best_epoch = float(loss), epoch + 1
        if self.keep_weights:
            self.weights = named_weights(self.model)

    def state(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch}


class StopWithoutProgress(tf_keras.callbacks.Callback):
    """Stops training after ``patience`` epochs without a lower validation loss."""

    def __init__(self, patience: int, best: float | None = None, waited: int = 0) -> None:
        super().__init__()
        self.patience, self.best, self.waited = patience, best, waited

    @property
    def done(self) -> bool:
        return self.waited >= self.patience

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("val_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.waited = float(loss), 0
        else:
            self.waited += 1
        if self.done:
            self.model.stop_training = True

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "waited": self.waited}


class ReportEveryEpoch(tf_keras.callbacks.Callback):
    """Calls ``report(epoch, logs)`` after the other callbacks have seen the epoch (put it
    last): the worker loop checkpoints there and tells Ray Train and the progress board."""

    def __init__(self, report: Callable[[int, dict[str, float]], None]) -> None:
        super().__init__()
        self.report = report

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.report(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})
