"""The LightningModule: Grounding DINO + set criterion for training, post-processing + COCO mAP for validation.

Batches come from `grounding_dino.data.collate_fn` as (images, pixel_mask, targets); each target carries its
caption and the character span of every phrase, so text tokens and positive maps are built here, with the model's
own tokenizer.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from grounding_dino.config import ExperimentConfig, ModelConfig, OptimConfig
from grounding_dino.errors import UserError
from grounding_dino.evaluation import CocoEvaluator
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import config_conflicts
from grounding_dino.model.criterion import SetCriterion, weighted_total
from grounding_dino.model.postprocess import post_process
from grounding_dino.model.text import WEIGHT_FILES, build_bert, is_grounding_dino_folder, resolve_text_encoder
from grounding_dino.predictor import PromptChunk, TorchPredictor

# Marks our checkpoints the way TAO marks its own.
TAO_MODEL = "grounding_dino"


class NonFiniteLoss(UserError, FloatingPointError):
    """A training loss that is NaN or infinite (train.skip_nonfinite_steps false)."""


def nonfinite_loss_message(step: int, epoch: int, losses: Dict[str, float], image_ids: Sequence[int],
                           lr: float) -> str:
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    good = {k: v for k, v in losses.items() if math.isfinite(v)}
    terms = ", ".join(f"{k}={v}" for k, v in bad.items()) or "none (the weighted sum overflowed)"
    finite = ", ".join(f"{k}={v:.4g}" for k, v in good.items())
    return (f"training loss is not finite at step {step} (epoch {epoch}): non-finite terms {terms}"
            + (f"; finite terms {finite}" if finite else "") + f"; images in the batch: ids {list(image_ids)}. "
            f"Fix: lower train.optim.lr (now {lr:g}), keep train.clip_grad_norm > 0, check those images' boxes "
            "(width and height above 0, inside the image), or set train.skip_nonfinite_steps true to skip such steps")


def freeze(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Stop gradients for parameters whose name is a prefix or starts with `prefix.`; returns the frozen names."""
    names = [name for name, _ in model.named_parameters()]
    frozen = []
    for i, prefix in enumerate(prefixes):
        prefix = prefix.rstrip(".")
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"train.freeze[{i}] = {prefix!r} matches no parameter; names start with one of {tops} "
                "(e.g. backbone.0, bert, transformer.encoder)"
            )
        frozen.extend(hits)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    # Lightning keeps the modes it finds at fit start, so the newly frozen parts go to eval mode now (see
    # GroundingDINO.train).
    model.train(model.training)
    return sorted(set(frozen))


def param_groups(model: nn.Module, model_cfg: ModelConfig, optim: OptimConfig) -> List[dict]:
    """AdamW groups: backbone names (prefixes) at lr_backbone, linear-projection names (substrings) at
    lr x lr_linear_proj_mult, everything else at lr. Frozen parameters are left out; empty groups are dropped."""
    groups: Dict[str, dict] = {
        "base": {"name": "base", "params": [], "lr": optim.lr},
        "backbone": {"name": "backbone", "params": [], "lr": optim.lr_backbone},
        "linear_proj": {"name": "linear_proj", "params": [], "lr": optim.lr * optim.lr_linear_proj_mult},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(name == p or name.startswith(p.rstrip(".") + ".") for p in model_cfg.backbone_names):
            groups["backbone"]["params"].append(param)
        elif any(s in name for s in model_cfg.linear_proj_names):
            groups["linear_proj"]["params"].append(param)
        else:
            groups["base"]["params"].append(param)
    kept = [g for g in groups.values() if g["params"]]
    if not kept:
        raise ValueError("every parameter is frozen (train.freeze / model.train_backbone): nothing to train")
    return kept


SCHEDULERS: Dict[str, Callable[[torch.optim.Optimizer, OptimConfig], torch.optim.lr_scheduler.LRScheduler]] = {
    "MultiStep": lambda opt, o: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(o.lr_steps),
                                                                     gamma=o.lr_decay),
    "StepLR": lambda opt, o: torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_step_size, gamma=o.lr_decay),
}


class GroundingDINOModule(LightningModule):
    """backbone_pretrained: the backbone's weights come from a checkpoint (model.backbone_norm 'auto' then freezes
    its norm layers). It is saved in every checkpoint so a resumed run rebuilds the same network."""

    def __init__(self, cfg: ExperimentConfig, *, backbone_pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.backbone_pretrained = backbone_pretrained
        self.model = build_model(cfg.model, activation_checkpoint=cfg.train.activation_checkpoint,
                                 backbone_pretrained=backbone_pretrained)
        # Here, before any distributed wrapper sees the parameters (DDP keeps views of them).
        self.model.backbone[0].use_channels_last()
        self.criterion = SetCriterion.from_config(cfg.model)
        self.evaluator: CocoEvaluator | None = None
        # train.skip_nonfinite_steps bookkeeping: this epoch's and the run's skipped steps, the first one's message
        self._skip_step = False
        self.skipped_steps = 0
        self.skipped_total = 0
        self.first_skip: Optional[str] = None
        self._text_keys_from_source: Optional[Set[str]] = None

    # ------------------------------------------------------------------------------------------------ batches
    def _text_and_maps(self, targets: List[dict]):
        """Tokens for the batch's captions and, per image, the positive map of every phrase [P_i, max_text_len]."""
        tokenizer = self.model.tokenizer
        text = {k: v.to(self.device) for k, v in tokenizer([t["caption"] for t in targets]).items()}
        maps = [tokenizer.positive_map(t["caption"], t["spans"]).to(self.device) for t in targets]
        for target, phrase_maps in zip(targets, maps):
            target["positive_map"] = phrase_maps[target["labels"]]
        return text, maps

    def _losses(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        return weighted_total(losses, self.criterion.weight_dict), losses

    def _log_terms(self, prefix: str, losses: Dict[str, torch.Tensor], batch_size: int) -> None:
        weights = self.criterion.weight_dict
        for name, value in losses.items():
            self.log(f"{prefix}_{name}", value.detach() * weights[name], on_step=False, on_epoch=True,
                     sync_dist=True, batch_size=batch_size)

    def training_step(self, batch, batch_idx):
        images, pixel_mask, targets = batch
        text, _ = self._text_and_maps(targets)
        outputs = self.model(images, pixel_mask, text)
        loss, losses = self._losses(outputs, targets)
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            # every rank must take the same decision, or the skipping ranks wait forever for the others' gradients
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._skip_step = not finite
        if not finite:
            weights = self.criterion.weight_dict
            terms = {k: float(v.detach()) * weights[k] for k, v in losses.items()}
            message = nonfinite_loss_message(self.global_step, self.current_epoch, terms,
                                             [int(t["image_id"]) for t in targets], self.cfg.train.optim.lr)
            if not self.cfg.train.skip_nonfinite_steps:
                raise NonFiniteLoss(message)
            self.skipped_steps += 1
            self.skipped_total += 1
            if self.first_skip is None:
                self.first_skip = message
            # backward still runs (under DDP every rank must join the gradient all-reduce); the gradients are
            # dropped in on_before_optimizer_step
            return loss
        size = len(targets)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        self.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=size)
        if self.cfg.train.verbose:
            self._log_terms("train", losses, size)
        return loss

    def on_train_epoch_start(self) -> None:
        self.skipped_steps = 0
        self.first_skip = None

    def on_train_epoch_end(self) -> None:
        if self.skipped_steps:
            rank_zero_warn(f"train.skip_nonfinite_steps: skipped {self.skipped_steps} step(s) with a non-finite loss "
                           f"in epoch {self.current_epoch}; the first: {self.first_skip}")

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._skip_step:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler skips a step with non-finite gradients itself, and needs them to see it
        # AdamW leaves a parameter without a gradient untouched: no update, no weight decay, no moment change
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        dataset = self.trainer.val_dataloaders.dataset
        self.evaluator = CocoEvaluator(dataset.coco_gt, eval_class_ids=self.cfg.dataset.eval_class_ids)

    def validation_step(self, batch, batch_idx):
        images, pixel_mask, targets = batch
        text, maps = self._text_and_maps(targets)
        outputs = self.model(images, pixel_mask, text)
        loss, losses = self._losses(outputs, targets)
        size = len(targets)
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        if self.cfg.train.verbose:
            self._log_terms("val", losses, size)
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets])
        fsdp = type(self.trainer.strategy).__name__ == "FSDPStrategy"
        if bool(pixel_mask.any()) and not fsdp:
            # Scored as evaluate and inference score (Predictor.detect): each image unpadded, so val mAP does not
            # depend on which images share a batch. The loss above keeps the padded forward training sees. Not
            # under FSDP: its forward gathers weights collectively, so every rank must run as many forwards, and
            # the number of image sizes differs between ranks.
            prompts = [[PromptChunk(tuple(t["phrases"]), 0, t["caption"], m)] for t, m in zip(targets, maps)]
            detections = TorchPredictor(self.model, self.device).detect(images, pixel_mask, orig_sizes, prompts,
                                                                        self.cfg.model.num_select)
        else:
            detections = post_process(outputs["pred_logits"], outputs["pred_boxes"], maps, orig_sizes,
                                      num_select=self.cfg.model.num_select)
        self.evaluator.update([int(t["image_id"]) for t in targets], detections)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.gather()  # every rank then scores the same detections, so no broadcast is needed
        metrics = self.evaluator.summarize()
        # NaN for a metric the val set cannot score (it warned why): status.json writes it as null with a reason
        # and AutoML ranks it last
        for name in ("mAP", "mAP50"):
            value = metrics[name]
            self.log(f"val_{name}", math.nan if value is None else value, prog_bar=True, sync_dist=False)
        self.evaluator = None

    # ------------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optim = self.cfg.train.optim
        optimizer = torch.optim.AdamW(param_groups(self.model, self.cfg.model, optim), lr=optim.lr,
                                      weight_decay=optim.weight_decay)
        scheduler = SCHEDULERS[optim.lr_scheduler](optimizer, optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and type(self.trainer.strategy).__name__ == "FSDPStrategy":
            # Lightning's FSDP precision plugin refuses norm clipping; the FSDP module computes the global norm.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tao_model"] = TAO_MODEL
        checkpoint["model_config"] = dataclasses.asdict(self.cfg.model)
        checkpoint["backbone_pretrained"] = self.backbone_pretrained
        # A frozen text encoder still holding the weights of model.text_encoder_type is left out of every
        # checkpoint (bert-base alone is 440 MB); the file names the encoder instead, as a packed model does, and
        # every loader (resume, evaluate, export) takes those weights from it.
        dropped = self.text_keys_from_source()
        if dropped:
            for key in dropped:
                checkpoint["state_dict"].pop(key, None)
            checkpoint["text_encoder"] = self.cfg.model.text_encoder_type

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        declared = checkpoint.get("text_encoder")
        if declared is None:
            return
        if declared != self.cfg.model.text_encoder_type:
            raise ValueError(f"train.resume_training_checkpoint_path takes its text-encoder weights from {declared!r}"
                             f" but model.text_encoder_type is {self.cfg.model.text_encoder_type!r}; set "
                             f"model.text_encoder_type: {declared}")
        # the model was built from that encoder, so its own tensors are the ones the file left out
        own = self.state_dict()
        state = checkpoint["state_dict"]
        for key, value in own.items():
            if key.startswith("model.bert.") and key not in state:
                state[key] = value

    def text_keys_from_source(self) -> Set[str]:
        """The state-dict keys of frozen text-encoder parameters equal to those model.text_encoder_type loads (none
        when the encoder starts from random init, which no loader could rebuild). Frozen tensors never change, so
        this is computed once."""
        if self._text_keys_from_source is None:
            frozen = {name for name, p in self.model.bert.named_parameters() if not p.requires_grad}
            keys: Set[str] = set()
            # FSDP flattens the parameters, so their names no longer match the source's
            if frozen and type(self.trainer.strategy).__name__ != "FSDPStrategy":
                folder = resolve_text_encoder(self.cfg.model.text_encoder_type)
                if is_grounding_dino_folder(folder) or any((Path(folder) / n).is_file() for n in WEIGHT_FILES):
                    source = build_bert(folder).state_dict()
                    own = self.model.bert.state_dict()
                    keys = {f"model.bert.{name}" for name in frozen
                            if name in source and torch.equal(source[name], own[name].detach().cpu())}
            self._text_keys_from_source = keys
        return self._text_keys_from_source


def check_resumable(checkpoint: dict, cfg: ModelConfig) -> None:
    """Raise unless `checkpoint` is one of ours with the architecture of `cfg`."""
    saved = checkpoint.get("model_config")
    if checkpoint.get("tao_model") != TAO_MODEL or saved is None or "optimizer_states" not in checkpoint:
        raise ValueError("train.resume_training_checkpoint_path is not a training checkpoint written by this "
                         "trainer; start from its weights with train.pretrained_model_path instead")
    conflicts = config_conflicts(saved, cfg)
    if conflicts:
        raise ValueError("train.resume_training_checkpoint_path was trained with a different architecture: "
                         + "; ".join(conflicts) + ". Set these model.* keys to the checkpoint's values.")
