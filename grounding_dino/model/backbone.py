"""Image backbones from timm (never downloaded): a registry of the spec's names, feature levels, norm handling.

Native parameter names are `backbone.0.body.<timm name>` (plus `backbone.0.norm{i}` for Swin's per-level
LayerNorms, as in the official model); `official_swin_key`/`native_swin_key` translate the Swin names.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import PositionEmbeddingSineHW

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    kwargs: Dict = field(default_factory=dict)
    stage_offset: int = 0        # timm feature index of the stride-4 stage
    swin: bool = False           # NHWC outputs, per-level LayerNorms, official Swin key names


# Any input size, and shifted windows even on maps no larger than a window, as the official Swin does.
_SWIN = dict(dynamic_img_size=True, strict_img_size=False, always_partition=True)
BACKBONES: Dict[str, BackboneSpec] = {
    "swin_tiny_224_1k": BackboneSpec("swin_tiny_patch4_window7_224", _SWIN, swin=True),
    # TAO's Swin-B 224 uses depths 2-2-12-2, so its checkpoints need that depth.
    "swin_base_224_22k": BackboneSpec("swin_base_patch4_window7_224", {**_SWIN, "depths": (2, 2, 12, 2)}, swin=True),
    "swin_base_384_22k": BackboneSpec("swin_base_patch4_window12_384", _SWIN, swin=True),
    "swin_large_224_22k": BackboneSpec("swin_large_patch4_window7_224", _SWIN, swin=True),
    "swin_large_384_22k": BackboneSpec("swin_large_patch4_window12_384", _SWIN, swin=True),
    "resnet_50": BackboneSpec("resnet50", stage_offset=1),
    "resnet_34": BackboneSpec("resnet34", stage_offset=1),
    "resnet_18": BackboneSpec("resnet18", stage_offset=1),
    "resnet_10t": BackboneSpec("resnet10t", stage_offset=1),
}


@functools.lru_cache(maxsize=None)
def swin_shapes() -> Dict[Tuple[int, Tuple[int, ...], int], str]:
    """(embed_dim, depths, window_size) -> our Swin backbone name, read off the timm models themselves (built on
    the meta device: no memory, no weights), so checkpoints and HF configs map to names without a second table."""
    shapes = {}
    for name, spec in BACKBONES.items():
        if spec.swin:
            with torch.device("meta"):
                body = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs)
            table = body.layers[0].blocks[0].attn.relative_position_bias_table.shape[0]
            window = (round(table ** 0.5) + 1) // 2
            shapes[(body.patch_embed.proj.weight.shape[0], tuple(len(layer.blocks) for layer in body.layers),
                    window)] = name
    return shapes


def official_swin_key(key: str) -> str:
    """Native Swin key (timm, downsample at the start of a stage) -> official (downsample at the end of the previous)."""
    key = re.sub(r"^backbone\.0\.body\.layers_(\d+)\.downsample",
                 lambda m: f"backbone.0.layers.{int(m.group(1)) - 1}.downsample", key)
    key = re.sub(r"^backbone\.0\.body\.layers_(\d+)\.", r"backbone.0.layers.\1.", key)
    return key.replace("backbone.0.body.", "backbone.0.", 1)


def native_swin_key(key: str) -> str:
    """Official Swin key -> native."""
    key = re.sub(r"^backbone\.0\.layers\.(\d+)\.downsample",
                 lambda m: f"backbone.0.body.layers_{int(m.group(1)) + 1}.downsample", key)
    key = re.sub(r"^backbone\.0\.layers\.(\d+)\.", r"backbone.0.body.layers_\1.", key)
    return key.replace("backbone.0.patch_embed.", "backbone.0.body.patch_embed.", 1)


def freeze_batch_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics (DETR's choice)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for buf in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buf).copy_(getattr(child, buf).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


class Backbone(nn.Module):
    """A timm feature extractor returning the requested stages with their padding masks."""

    def __init__(self, name: str, stages: List[int], train_backbone: bool, freeze_norm: bool):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"model.backbone: unknown '{name}' (known: {', '.join(BACKBONES)}).")
        if not stages or min(stages) < 0 or max(stages) > 3:
            raise ValueError(f"model.return_interm_indices: backbone stages are 0..3 (4 = extra level), got {stages}.")
        self.spec = BACKBONES[name]
        self.stages = stages
        self.body = timm.create_model(self.spec.timm_name, pretrained=False, features_only=True,
                                      out_indices=tuple(s + self.spec.stage_offset for s in stages),
                                      **self.spec.kwargs)
        self.num_channels = self.body.feature_info.channels()
        if self.spec.swin:
            for stage, channels in zip(stages, self.num_channels):
                self.add_module(f"norm{stage}", nn.LayerNorm(channels))
        if freeze_norm:
            freeze_batch_norm(self.body)
        self.channels_last = False
        if not train_backbone:
            self.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> List[Tuple[Tensor, Tensor]]:
        out = []
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for stage, feature in zip(self.stages, self.body(images)):
            if self.spec.swin:
                feature = getattr(self, f"norm{stage}")(feature).permute(0, 3, 1, 2)
            level_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:])[0].bool()
            out.append((feature, level_mask))
        return out

    def use_channels_last(self) -> None:
        """Run the convolutions channels-last, which training does: faster on CPU (oneDNN) and GPU (tensor cores),
        and the transformer then flattens the maps to tokens without a copy. Evaluation and export keep the default
        layout, whose results match ONNX Runtime's most closely. Swin is channels-last by construction."""
        if not self.spec.swin:
            self.body.to(memory_format=torch.channels_last)
            self.channels_last = True

    def load_pretrained(self, path: str) -> None:
        """Backbone-only weights (official Swin / timm / torchvision names, optionally under 'model' or 'state_dict')."""
        from .checkpoint import load_file  # checkpoint.py imports this module

        state = load_file(path, "model.pretrained_backbone_path")
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        to_native = native_swin_key if self.spec.swin else (lambda k: k.replace("backbone.0.", "backbone.0.body.", 1))
        mapped = {}
        for key, value in state.items():
            key = re.sub(r"^(module\.)?(backbone\.0\.)?(body\.)?", "", key)
            mapped[to_native("backbone.0." + key)[len("backbone.0."):]] = value
        own = self.state_dict()
        usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(usable) - {k for k in own if k.endswith("num_batches_tracked")})
        if not usable:
            raise ValueError(f"model.pretrained_backbone_path: no tensor of {path} fits backbone "
                             f"'{self.spec.timm_name}' (first keys: {list(state)[:5]}).")
        self.load_state_dict(usable, strict=False)
        log.info("Loaded %d backbone tensors from %s; %d left at init: %s", len(usable), path, len(missing),
                 missing[:10])


class Joiner(nn.Sequential):
    """backbone.0 = the feature extractor, backbone.1 = the sine position encoding (official layout)."""

    def forward(self, images: Tensor, mask: Tensor):
        features = self[0](images, mask)
        return features, [self[1](m).to(f.dtype) for f, m in features]


def build_backbone(cfg, pretrained: bool) -> Joiner:
    """The backbone of ModelConfig `cfg`; `pretrained` says its weights will come from a checkpoint afterwards."""
    stages = [i for i in cfg.return_interm_indices if i < 4]
    if cfg.backbone_norm == "auto":
        freeze_norm = pretrained or bool(cfg.pretrained_backbone_path)
    else:
        freeze_norm = cfg.backbone_norm == "frozen"
    backbone = Backbone(cfg.backbone, stages, cfg.train_backbone, freeze_norm)
    if cfg.pretrained_backbone_path:
        backbone.load_pretrained(cfg.pretrained_backbone_path)
    return Joiner(backbone, PositionEmbeddingSineHW(cfg.hidden_dim // 2, cfg.pe_temperatureH, cfg.pe_temperatureW))
