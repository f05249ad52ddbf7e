"""Preemption is a normal end of training: SIGTERM (a Kubernetes eviction, `skillbank job cancel`) or SIGUSR1
(SLURM's warning before the time limit, `#SBATCH --signal=USR1@90`) makes training save a checkpoint at the next
step boundary, point `gdino_model_latest.pth` at it, write a PREEMPTED status.json line (resumable) and stop. The
launcher (grounding_dino.actions.run_action) turns that into exit code 0, which a scheduler that requeues reads as
"ran as asked", and a job's worker records the job as `preempted`, which `skillbank job start` resumes.

The handlers replace Lightning's own for the length of the training loop: on SIGTERM Lightning kills the other DDP
ranks at once and stops without a checkpoint. Under DDP the ranks agree at every step (one all-reduce of a flag, as
Lightning does for its own SIGTERM check), so a signal that reaches one rank stops all of them after the same step,
and the collective save does not hang. A signal before the loop starts ends the process as the signal would.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from grounding_dino.actions import Preempted
from grounding_dino.callbacks import GDinoCheckpoint, StatusLogger
from grounding_dino.layout import LATEST_LINK

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCheckpoint(Callback):
    """Saves a checkpoint and stops training (raising actions.Preempted) at the first step boundary after SIGTERM
    or SIGUSR1."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its handlers when fit starts, before this hook, and puts back the ones from before fit
        # when fit ends, however it ends. signal.signal works in the main thread only (a fit run from another
        # thread keeps Lightning's handling).
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        asked = self.received is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked:
            return
        checkpoint = self._save(trainer)
        cause = self.received.name if self.received is not None else "a preemption signal to another rank"
        message = (f"Training preempted by {cause} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                   f"saved {checkpoint} ({LATEST_LINK} points at it). Resume: rerun with "
                   f"train.resume_training_checkpoint_path={checkpoint}, or `skillbank job start <id>` for a job.")
        status = next((c for c in trainer.callbacks if isinstance(c, StatusLogger)), None)
        if status is not None and status.writer is not None:
            status.writer.write("PREEMPTED", message, verbosity="WARNING", epoch=trainer.current_epoch,
                                step=trainer.global_step, signal=cause, checkpoint=checkpoint, resumable=True)
            status.writer.enabled = False  # its on_exception would add a FAILURE line for the Preempted below
        raise Preempted(message)

    @staticmethod
    def _save(trainer: Trainer) -> str:
        """The checkpoint of this step, saved and linked by the run's GDinoCheckpoint: its names, its atomic writes,
        its pruning, and its record of the step saved, so its save-on-exception does not save the step again."""
        saver = next(c for c in trainer.checkpoint_callbacks if isinstance(c, GDinoCheckpoint))
        candidates = saver._monitor_candidates(trainer)
        path = saver.format_checkpoint_name(candidates)
        saver._save_checkpoint(trainer, path)
        saver._save_last_checkpoint(trainer, candidates)
        return path
