"""The train action: a Lightning run built from the spec's train section.

`run_training` is what `grounding_dino.actions.run_action("train", spec)` runs, for the CLI, jobs and AutoML
trials alike. Under DDP, Lightning relaunches the same command line once per extra
local rank, so everything here runs in every rank; files are written by global rank 0 only. Several nodes each run
the same command (train.num_nodes set) under a launcher that tells Lightning where to meet: MASTER_ADDR, MASTER_PORT
and NODE_RANK, or torchrun, SLURM's srun, LSF, MPI (README "Scaling out").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                   TorchElasticEnvironment)
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy

from grounding_dino.actions import ActionRun
from grounding_dino.callbacks import (
    AtomicCheckpointIO,
    GDinoCheckpoint,
    ReproducibleEpochs,
    RngState,
    StatusLogger,
)
from grounding_dino.config import ExperimentConfig, TrainConfig, WandbConfig
from grounding_dino.data import build_dataloader
from grounding_dino.errors import UserError
from grounding_dino.lightning_module import GroundingDINOModule, check_resumable, freeze
from grounding_dino.model.checkpoint import (Checkpoint, load_file, load_weights, read_checkpoint,
                                             settle_model_config)
from grounding_dino.precision import resolve
from grounding_dino.preemption import PreemptionCheckpoint

log = logging.getLogger(__name__)

PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def _devices(train: TrainConfig):
    """(accelerator, devices): the GPUs in gpu_ids on CUDA; on CPU, num_gpus processes (DDP over gloo)."""
    if not torch.cuda.is_available():
        return "cpu", train.num_gpus
    if len(train.gpu_ids) == train.num_gpus:
        return "gpu", list(train.gpu_ids)
    if list(train.gpu_ids) == [0]:  # the default: take the first num_gpus GPUs
        return "gpu", list(range(train.num_gpus))
    raise ValueError(f"train.gpu_ids {list(train.gpu_ids)} lists {len(train.gpu_ids)} GPUs but train.num_gpus is "
                     f"{train.num_gpus}: make them agree")


def _strategy(train: TrainConfig, accelerator: str, devices):
    processes = (len(devices) if isinstance(devices, list) else devices) * train.num_nodes
    if train.distributed_strategy == "fsdp":
        if accelerator != "gpu":
            raise ValueError("train.distributed_strategy 'fsdp' needs CUDA GPUs and none is visible here; "
                             "use 'ddp' on CPU")
        return FSDPStrategy(state_dict_type="full")
    return "ddp" if processes > 1 else "auto"


# The cluster managers Lightning detects by itself, in the order it tries them (AcceleratorConnector), with the
# variable each one takes the node's rank from; the first detected brings its own address and port. Without one,
# Lightning's LightningEnvironment reads MASTER_ADDR, MASTER_PORT and NODE_RANK (or GROUP_RANK).
MANAGED_ENVIRONMENTS = ((TorchElasticEnvironment, "GROUP_RANK"), (SLURMEnvironment, "SLURM_NODEID"),
                        (LSFEnvironment, None), (MPIEnvironment, None))


def check_nodes(train: TrainConfig) -> None:
    """Raise UserError for a multi-node launch whose nodes cannot meet. Unchecked, node 0 of a run started without
    an address waits for the others until the process-group timeout (30 minutes), and a node started with a
    NODE_RANK but train.num_nodes 1 trains alone, as a second run writing into node 0's results folder."""
    env = os.environ
    managed = next(((kind, variable) for kind, variable in MANAGED_ENVIRONMENTS if kind.detect()), None)
    if managed is None:
        name = next((name for name in ("NODE_RANK", "GROUP_RANK") if name in env), None)
    else:
        name = managed[1] if managed[1] in env else None
    if name is not None:
        try:
            node_rank = int(env[name])
        except ValueError:
            raise UserError(f"{name}={env[name]!r} is not a node rank: set it to 0 on the first node, 1 on the "
                            "second, and so on") from None
        if not 0 <= node_rank < train.num_nodes:
            raise UserError(f"{name}={node_rank} but train.num_nodes is {train.num_nodes}, so node ranks run 0.."
                            f"{train.num_nodes - 1}. Fix: set train.num_nodes to the number of nodes, the same on "
                            "every node")
    if train.num_nodes == 1 or managed is not None:
        return
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in env] + ([] if name else ["NODE_RANK"])
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"train.num_nodes is {train.num_nodes} but {', '.join(missing)} {verb} not set, so the nodes "
                        "cannot find each other. Fix: on every node set MASTER_ADDR (node 0's address), MASTER_PORT "
                        "(a free port there) and NODE_RANK (0 on node 0, 1 on the next, ...), or start the nodes "
                        "with torchrun or srun (README.md, \"Scaling out\")")


def _loggers(results_dir: Path, wandb: WandbConfig) -> list[Logger]:
    loggers: list[Logger] = [TensorBoardLogger(save_dir=str(results_dir), name="tensorboard", version="")]
    if wandb.enable:
        try:
            from lightning.pytorch.loggers import WandbLogger

            # TAO's defaults write "" for unset entity, group and run id; wandb reads "" as a name.
            loggers.append(WandbLogger(project=wandb.project, entity=wandb.entity or None, tags=list(wandb.tags),
                                       name=wandb.name, id=wandb.run_id or None, group=wandb.group or None,
                                       save_code=wandb.save_code, reinit=wandb.reinit,
                                       sync_tensorboard=wandb.sync_tensorboard, save_dir=str(results_dir)))
        except ModuleNotFoundError as err:
            raise ValueError("wandb.enable is true but the wandb package is not installed: "
                             "pip install wandb, or set wandb.enable false") from err
    return loggers


def build_trainer(cfg: ExperimentConfig, results_dir: Path, callbacks: Sequence[Callback] = ()) -> Trainer:
    train = cfg.train
    accelerator, devices = _devices(train)
    unit = {"epoch": "every_n_epochs", "step": "every_n_train_steps"}[train.checkpoint_interval_unit]
    torch.backends.cudnn.benchmark = train.cudnn.benchmark
    precision, why = resolve(train.precision, "cuda" if accelerator == "gpu" else "cpu")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"train: precision {precision} ({why})")
    return Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=train.num_nodes,
        strategy=_strategy(train, accelerator, devices),
        precision=PRECISION[precision],
        max_epochs=train.num_epochs,
        check_val_every_n_epoch=train.validation_interval,
        gradient_clip_val=train.clip_grad_norm or None,
        gradient_clip_algorithm="norm",
        deterministic=train.cudnn.deterministic or None,
        fast_dev_run=1 if train.is_dry_run else False,
        num_sanity_val_steps=0,
        default_root_dir=str(results_dir),
        logger=_loggers(results_dir, cfg.wandb),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            GDinoCheckpoint(results_dir, keep_last=train.checkpoint_keep_last, **{unit: train.checkpoint_interval}),
            RngState(),
            ReproducibleEpochs(train.seed),
            StatusLogger(results_dir, train.num_epochs, precision),
            LearningRateMonitor(logging_interval="epoch"),
            PreemptionCheckpoint(),
            *callbacks,
        ],
    )


def build_module(cfg: ExperimentConfig, resume_checkpoint: Optional[dict] = None,
                 pretrained: Optional[Checkpoint] = None) -> GroundingDINOModule:
    """The module with train.pretrained_model_path loaded and train.freeze applied. When resuming, the checkpoint
    (read lazily, weights untouched) decides how the backbone was built and Lightning restores the weights.
    `pretrained` is train.pretrained_model_path already read (read here when not given); `cfg` must already carry
    the model settings the checkpoint decides (settled_config)."""
    if resume_checkpoint is not None:
        check_resumable(resume_checkpoint, cfg.model)
        pretrained_backbone = resume_checkpoint.get("backbone_pretrained", False)
        return _frozen(GroundingDINOModule(cfg, backbone_pretrained=pretrained_backbone), cfg)
    module = GroundingDINOModule(cfg, backbone_pretrained=bool(cfg.train.pretrained_model_path))
    if cfg.train.pretrained_model_path:
        if pretrained is None:
            pretrained = read_checkpoint(cfg.train.pretrained_model_path, "train.pretrained_model_path")
        report = load_weights(module.model, pretrained)
        log.info("loaded train.pretrained_model_path %s: %s", cfg.train.pretrained_model_path, report)
    return _frozen(module, cfg)


def settled_config(cfg: ExperimentConfig, checkpoint: Optional[Checkpoint]) -> ExperimentConfig:
    """`cfg` with the structural model settings of `checkpoint` where the spec leaves them at their defaults."""
    if checkpoint is None:
        return cfg
    return dataclasses.replace(cfg, model=settle_model_config(cfg.model, checkpoint))


def _frozen(module: GroundingDINOModule, cfg: ExperimentConfig) -> GroundingDINOModule:
    frozen = freeze(module.model, cfg.train.freeze)
    if frozen:
        log.info("train.freeze froze %d parameter tensors", len(frozen))
    return module


def run_training(cfg: ExperimentConfig, run: ActionRun, callbacks: Sequence[Callback] = ()) -> None:
    """Train as the spec says. Extra Lightning callbacks (e.g. an AutoML pruner) may be passed."""
    resume = cfg.train.resume_training_checkpoint_path
    if resume and not os.path.isfile(resume):
        raise FileNotFoundError(f"train.resume_training_checkpoint_path {resume} does not exist")
    results_dir = run.results_dir
    seed_everything(cfg.train.seed, workers=True)
    if resume:
        # mmap: only the small metadata is read here; Lightning loads the checkpoint for real in fit()
        saved = load_file(resume, "train.resume_training_checkpoint_path", mmap=True)
        if isinstance(saved, dict) and isinstance(saved.get("model_config"), dict):
            saved_checkpoint = Checkpoint(resume, "train.resume_training_checkpoint_path", {}, saved,
                                          dict(saved["model_config"]))
            cfg = settled_config(cfg, saved_checkpoint)
        module = build_module(cfg, saved)
        del saved
    else:
        pretrained = (read_checkpoint(cfg.train.pretrained_model_path, "train.pretrained_model_path")
                      if cfg.train.pretrained_model_path else None)
        cfg = settled_config(cfg, pretrained)
        module = build_module(cfg, pretrained=pretrained)
        del pretrained
    trainer = build_trainer(cfg, results_dir, callbacks)
    tokenizer = module.model.tokenizer
    with warnings.catch_warnings():
        # Frozen parts train in eval mode on purpose (GroundingDINO.train); Lightning's warning about them is noise.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(
            module,
            train_dataloaders=build_dataloader(cfg, "train", tokenizer=tokenizer),
            val_dataloaders=build_dataloader(cfg, "val", tokenizer=tokenizer),
            ckpt_path=resume or None,
        )
