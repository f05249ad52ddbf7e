"""A Lightning callback that reports each validation to the Optuna trial and stops a pruned run.

Unlike optuna_integration's callback it does not raise from inside `fit` (which would skip the epoch's checkpoint
and end the run as a failure in status.json): it sets `trainer.should_stop`, so training ends cleanly, and the
caller marks the trial PRUNED. Under DDP only global rank 0 talks to the storage and broadcasts the decision.
The reported step is the number of epochs trained, the resource Hyperband counts.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from lightning.pytorch import Callback, LightningModule, Trainer


class PruningCallback(Callback):
    def __init__(self, trial, monitor: str, num_epochs: int):
        self.trial = trial
        self.monitor = monitor
        self.num_epochs = num_epochs
        self.history: List[Tuple[int, int, float]] = []  # (epochs trained, global step, value)
        self.pruned_at: Optional[int] = None
        self.is_global_zero = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.is_global_zero = trainer.is_global_zero

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"automl.metric {self.monitor!r} was not logged at validation; logged: "
                           f"{', '.join(sorted(trainer.callback_metrics))}")
        value = float(trainer.callback_metrics[self.monitor])
        epochs = trainer.current_epoch + 1
        self.history.append((epochs, trainer.global_step, value))
        prune = False
        if trainer.is_global_zero:
            self.trial.report(value, step=epochs)
            prune = self.trial.should_prune()
            verdict = ", pruned" if prune else ""
            print(f"[automl] trial {self.trial.number} epoch {epochs}/{self.num_epochs} "
                  f"{self.monitor}={value:.4f}{verdict}", flush=True)
        if trainer.strategy.broadcast(prune):
            self.pruned_at = epochs
            trainer.should_stop = True
