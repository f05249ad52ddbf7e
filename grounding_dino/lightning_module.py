"""The LightningModule: Grounding DINO + set criterion for training, post-processing + COCO mAP for validation.

Batches come from `grounding_dino.data.collate_fn` as (images, pixel_mask, targets); each target carries its
caption and the character span of every phrase, so text tokens and positive maps are built here, with the model's
own tokenizer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn

from grounding_dino.config import ExperimentConfig, ModelConfig, OptimConfig
from grounding_dino.evaluation import CocoEvaluator
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import config_conflicts
from grounding_dino.model.criterion import SetCriterion, weighted_total
from grounding_dino.model.postprocess import post_process

# Marks our checkpoints the way TAO marks its own.
TAO_MODEL = "grounding_dino"


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
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (terms: "
                f"{ {k: round(v.item(), 4) for k, v in losses.items()} }); lower train.optim.lr, keep "
                "train.clip_grad_norm > 0, or use model.log_scale 'auto' with model.class_embed_bias true"
            )
        size = len(targets)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        self.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=size)
        if self.cfg.train.verbose:
            self._log_terms("train", losses, size)
        return loss

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
        detections = post_process(outputs["pred_logits"], outputs["pred_boxes"], maps, orig_sizes,
                                  num_select=self.cfg.model.num_select)
        self.evaluator.update([int(t["image_id"]) for t in targets], detections)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.gather()  # every rank then scores the same detections, so no broadcast is needed
        metrics = self.evaluator.summarize()
        self.log("val_mAP", metrics["mAP"], prog_bar=True, sync_dist=False)
        self.log("val_mAP50", metrics["mAP50"], prog_bar=True, sync_dist=False)
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
