"""Lightning callbacks of a training run: TAO-named atomic checkpoints, status.json lines, RNG state for resume."""
from __future__ import annotations

import errno
import math
import os
import random
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from grounding_dino.errors import UserError
from grounding_dino.layout import (CHECKPOINT_STEM, LATEST_LINK, STATUS_FILE, parse_checkpoint_name,
                                   replace_atomically, stale_temp_files)
from grounding_dino.status import StatusWriter

# Write errors that mean the disk (or the process's file-size limit, RLIMIT_FSIZE) has no room for the file.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class CheckpointNotSaved(UserError):
    """A checkpoint that was refused or could not be written; the previous one and the latest link are intact."""


def _tensors(node: Any, prefix: str):
    """(dotted name, tensor) of every tensor in a nested checkpoint structure."""
    if isinstance(node, torch.Tensor):
        yield prefix, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{prefix}[{i}]")


def nonfinite_tensors(checkpoint: dict) -> tuple[list[str], int]:
    """(names of the floating-point tensors holding NaN or Inf, count of floating-point tensors checked) among the
    weights and the optimizer state of a Lightning checkpoint."""
    bad, total = [], 0
    for part in ("state_dict", "optimizer_states"):
        for name, tensor in _tensors(checkpoint.get(part), part):
            if tensor.is_floating_point() or tensor.is_complex():
                total += 1
                if not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    return bad, total


def _checkpoint_bytes(checkpoint: dict) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(checkpoint, ""))


def _is_no_space(error: BaseException) -> bool:
    """True when `error` or an error it was raised from is a full disk. torch.save reports a failed write as a
    RuntimeError from its zip writer; the OSError is its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _refusal(path, bad: list[str], total: int) -> str:
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (f"not saving checkpoint {os.path.basename(path)}: {len(bad)} of {total} tensors hold NaN or Inf ({shown}); "
            "the weights diverged. The previous checkpoint and gdino_model_latest.pth are kept. Fix: lower "
            "train.optim.lr, keep train.clip_grad_norm > 0, and check the training boxes")

def _symlink_atomically(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point `link` at `target` (relative link) by renaming a fresh link over the old one: readers always find
    a link, unlike Lightning's remove-then-create."""
    relative = os.path.relpath(target, os.path.dirname(link))
    replace_atomically(link, lambda tmp: (os.remove(tmp), os.symlink(relative, tmp)))


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file in the checkpoint's folder, fsync, then rename (Lightning's own save goes
    through fsspec, whose temp file may live on another filesystem, so the final move is not atomic)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")

        bad, total = nonfinite_tensors(checkpoint)
        if bad:
            raise CheckpointNotSaved(_refusal(path, bad, total))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        try:
            replace_atomically(path, write)
        except Exception as err:
            if not _is_no_space(err):
                raise
            folder = os.path.dirname(os.path.abspath(path))
            megabytes = math.ceil(_checkpoint_bytes(checkpoint) / 1e6)
            raise CheckpointNotSaved(
                f"no space left in {folder} (checkpoint needs about {megabytes} MB); the previous checkpoint and "
                "gdino_model_latest.pth are kept. Fix: free space there, point results_dir at a larger disk, or "
                "set train.checkpoint_keep_last to keep fewer checkpoints"
            ) from None


class GDinoCheckpoint(ModelCheckpoint):
    """Keeps checkpoints as `model_epoch_XXX_step_YYYYY.pth`, points `gdino_model_latest.pth` at the newest, and
    also saves (and links) one when training dies with an exception.

    keep_last > 0 deletes older checkpoints beyond the newest `keep_last`, never the one the latest link points at
    nor the one with the best `BEST_METRIC` among those saved right after a validation.
    """

    FILE_EXTENSION = ".pth"
    CHECKPOINT_NAME_LAST = "gdino_model_latest"
    BEST_METRIC = "val_mAP"

    def __init__(self, dirpath: str | os.PathLike, *, every_n_epochs: Optional[int] = None,
                 every_n_train_steps: Optional[int] = None, keep_last: int = 0):
        super().__init__(
            dirpath=dirpath,
            filename=CHECKPOINT_STEM,
            auto_insert_metric_name=False,
            save_top_k=-1,
            save_last="link",
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            # validation may not run every epoch (validation_interval), so never wait for it to save
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self.keep_last = keep_last
        self.scores: dict[str, float] = {}  # checkpoint file name -> BEST_METRIC of the validation just before it
        self._validated = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # The folder holds experiment.yaml and status.json before the first checkpoint, and a resumed run's
            # earlier checkpoints by design: Lightning's "exists and is not empty" would print on every run.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit":
            # Left by a save that was killed mid-write; never a complete file, so nothing is lost.
            for stale in stale_temp_files(self.dirpath):
                os.remove(stale)
                rank_zero_warn(f"removed {stale}, an unfinished checkpoint write of an earlier run")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._validated = True

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        value = trainer.callback_metrics.get(self.BEST_METRIC)
        if self._validated and value is not None and math.isfinite(float(value)):
            self.scores[os.path.basename(filepath)] = float(value)
        self._validated = False

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.keep_last and trainer.is_global_zero:
            self._prune()

    def _prune(self) -> None:
        folder = Path(self.dirpath)
        saved = sorted((parse_checkpoint_name(p.name), p) for p in folder.iterdir() if parse_checkpoint_name(p.name))
        keep = {p.name for _, p in saved[-self.keep_last:]}
        latest = folder / LATEST_LINK
        if latest.is_symlink():
            keep.add(os.path.basename(os.readlink(latest)))
        scored = {name: value for name, value in self.scores.items() if (folder / name).exists()}
        if scored:
            keep.add(max(scored, key=lambda name: (scored[name], parse_checkpoint_name(name))))
        for _, path in saved:
            if path.name not in keep:
                path.unlink()
                self.scores.pop(path.name, None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": dict(self.scores)}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.scores = dict(state_dict.pop("scores", {}))
        super().load_state_dict(state_dict)

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            _symlink_atomically(filepath, linkpath)
        trainer.strategy.barrier()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, CheckpointNotSaved):
            return  # the save that failed would fail again
        if trainer.global_step == 0 or trainer.global_step == self._last_global_step_saved:
            return  # nothing trained since the last checkpoint
        path = os.path.join(
            self.dirpath, CHECKPOINT_STEM.format(epoch=trainer.current_epoch, step=trainer.global_step)
        ) + self.FILE_EXTENSION
        try:
            if trainer.world_size > 1:
                # Other ranks may be dead or stuck, so skip Trainer.save_checkpoint's barriers; a sharded (FSDP)
                # state would need them to gather, so it is not saved.
                if type(trainer.strategy).__name__ == "FSDPStrategy":
                    rank_zero_warn("training failed under FSDP: no checkpoint is saved on exception")
                    return
                if trainer.is_global_zero:
                    trainer.strategy.checkpoint_io.save_checkpoint(
                        trainer._checkpoint_connector.dump_checkpoint(weights_only=False), path
                    )
                    _symlink_atomically(path, os.path.join(self.dirpath, LATEST_LINK))
                return
            trainer.save_checkpoint(path, weights_only=False)
        except CheckpointNotSaved as refused:
            # Raising here would hide the error that stopped training.
            rank_zero_warn(str(refused))
            return
        self._link_checkpoint(trainer, path, os.path.join(self.dirpath, LATEST_LINK))


class RngState(Callback):
    """Saves the Python, NumPy and torch RNG states in each checkpoint and restores them on resume, so a run
    resumed from a mid-epoch checkpoint (step interval, exception) continues the same random stream until the next
    epoch reseeds it (see ReproducibleEpochs)."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            # stored as a tensor: checkpoints are read with torch.load(weights_only=True), which refuses numpy arrays
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python, NumPy and torch from (seed, epoch, rank)."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    value = int(state[0]) << 32 | int(state[1])
    random.seed(value)
    np.random.seed(int(state[0]))
    torch.manual_seed(value)


class ReproducibleEpochs(Callback):
    """Makes epoch e of a resumed run draw exactly what epoch e of an uninterrupted run drew.

    * The global RNGs are reseeded from (seed, epoch, rank) at the first batch of every epoch, so random draws
      made before it (a DataLoader iterator's base seed, which depends on whether the iterator was created fresh,
      reused by persistent workers, or created during resume) cannot shift the model's random stream.
    * The dataset's epoch (augmentation and caption sampling) is set before each epoch's iterator is created;
      under DDP Lightning's DistributedSampler does not forward set_epoch to the dataset.
    * Lightning 2.6 creates the first training iterator of a resumed run before it sets the sampler epoch, and
      worker processes prefetch at creation, so that epoch would replay epoch 0's order (Lightning issue #21938).
      The iterator is created again once the epoch is set.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._first_epoch = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_epoch = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(trainer.current_epoch)
        if self._first_epoch and trainer.current_epoch > 0 and getattr(loader, "num_workers", 0) > 0:
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)  # private: Lightning has no public handle
            if fetcher is None:
                rank_zero_warn("cannot recreate the resumed epoch's data iterator: its order may replay epoch 0")
            else:
                iter(fetcher)
        self._first_epoch = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            seed_epoch(self.seed, trainer.current_epoch, trainer.global_rank)


class StatusLogger(Callback):
    """Writes TAO-style status.json lines (rank 0): STARTED, one RUNNING line per epoch with timing and KPIs,
    then SUCCESS or FAILURE."""

    VAL_KEYS = ("val_loss", "val_mAP", "val_mAP50")

    def __init__(self, results_dir: str | os.PathLike, num_epochs: int, precision: str = "fp32"):
        self.path = Path(results_dir) / STATUS_FILE
        self.num_epochs = num_epochs
        self.precision = precision  # what ran, train.precision "auto" resolved
        self.writer: Optional[StatusWriter] = None
        self._epoch_start = 0.0
        self._step_at_epoch_start = 0
        self._epoch_times: list[float] = []
        self._validated = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The rank is known only once the strategy has set up its environment, which precedes this hook.
        self.writer = StatusWriter(self.path, enabled=trainer.is_global_zero)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.writer.write("STARTED", "Starting training loop.", epoch=trainer.current_epoch,
                          max_epoch=self.num_epochs, max_step=trainer.estimated_stepping_batches,
                          precision=self.precision)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.monotonic()
        self._step_at_epoch_start = trainer.global_step
        self._validated = False

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = time.monotonic() - self._epoch_start
        steps = max(trainer.global_step - self._step_at_epoch_start, 1)
        self._epoch_times.append(elapsed)
        remaining = self.num_epochs - (trainer.current_epoch + 1)
        mean_epoch = sum(self._epoch_times) / len(self._epoch_times)
        metrics = trainer.callback_metrics
        # callback_metrics keep the last validation's values; report them only in the epoch that validated
        keys = ("train_loss",) + (self.VAL_KEYS if self._validated else ())
        kpi = {key: metrics[key] for key in keys if key in metrics}
        if trainer.optimizers:
            kpi["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        skipped = getattr(pl_module, "skipped_steps", 0)
        extra = {"skipped_nonfinite_steps": skipped} if skipped else {}
        self.writer.write(
            "RUNNING",
            f"Epoch {trainer.current_epoch} finished.",
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            max_epoch=self.num_epochs,
            max_step=trainer.estimated_stepping_batches,
            time_per_epoch=str(timedelta(seconds=elapsed)),
            time_per_step=str(timedelta(seconds=elapsed / steps)),
            eta=str(timedelta(seconds=mean_epoch * max(remaining, 0))),
            kpi=kpi,
            **extra,
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        skipped = getattr(pl_module, "skipped_total", 0)
        extra = {"skipped_nonfinite_steps": skipped} if skipped else {}
        self.writer.write("SUCCESS", "Training finished successfully.", epoch=trainer.current_epoch,
                          step=trainer.global_step, **extra)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.writer is None:  # failed before setup
            self.writer = StatusWriter(self.path, enabled=trainer.is_global_zero)
        reason = f"{type(exception).__name__}: {exception}" if str(exception) else type(exception).__name__
        self.writer.write("FAILURE", f"Training failed: {reason}",
                          verbosity="ERROR", epoch=trainer.current_epoch, step=trainer.global_step)
