"""The small CPU config shared by the benchmarks, built both as our model and as Hugging Face's peer.

Both get: 256 px synthetic shapes (16 colour x shape classes), a random-init timm resnet18 whose normalisation layers
train, hidden 128, 2+2 layers, 100 queries, 4 feature levels, max_text_len 256, the frozen pretrained MiniLM text
encoder. Hugging Face freezes its backbone's BatchNorm (and the ResNet stem); with random init that zeroes every
residual branch, so the peer gets trainable BatchNorm back here to make the comparison about the rest of the model.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
HIDDEN, LAYERS, FFN, HEADS, QUERIES, TEXT_LEN, IMAGE = 128, 2, 512, 8, 100, 256, 256


def synthetic_data(root: Path, num_train: int = 600, num_val: int = 100, seed: int = 0) -> dict:
    from grounding_dino.data.synthetic import generate

    marker = root / "paths.json"
    if marker.is_file():
        import json

        return json.loads(marker.read_text())
    paths = generate(str(root), num_train=num_train, num_val=num_val, image_size=IMAGE, max_objects=6, seed=seed,
                     colors=COLORS, shapes=SHAPES)
    import json

    marker.write_text(json.dumps(paths))
    return paths


def experiment_spec(paths: dict, results_dir: str, **train_overrides) -> dict:
    """Our spec for the small config (plain dict, as a user would write it)."""
    size = {"scales": [224, 256, 288], "train_random_resize": [256], "train_random_crop_min": 192,
            "train_random_crop_max": 256, "random_resize_max_size": 320, "test_random_resize": IMAGE,
            "fixed_padding": False}
    train = {"num_epochs": 100, "checkpoint_interval": 1000, "validation_interval": 1000, "seed": 0,
             "activation_checkpoint": False, "freeze": ["bert"], "optim": {"lr": 2e-4, "lr_backbone": 2e-4,
                                                                          "lr_steps": [1000]}}
    train.update(train_overrides)
    return {
        "results_dir": results_dir,
        "model": {"backbone": "resnet_18", "return_interm_indices": [1, 2, 3], "num_feature_levels": 4,
                  "hidden_dim": HIDDEN, "nheads": HEADS, "enc_layers": LAYERS, "dec_layers": LAYERS,
                  "dim_feedforward": FFN, "num_queries": QUERIES, "num_select": 100, "max_text_len": TEXT_LEN,
                  "text_encoder_type": "minilm", "log_scale": "auto", "class_embed_bias": True,
                  "backbone_norm": "trainable"},
        "dataset": {
            "train_data_sources": [{"image_dir": paths["train_image_dir"], "json_file": paths["train_json_file"],
                                    "label_map": paths["label_map"]}],
            "val_data_sources": {"image_dir": paths["val_image_dir"], "json_file": paths["val_json_file"]},
            "batch_size": 4, "workers": 0, "augmentation": size,
        },
        "train": train,
    }


def build_ours(spec: dict):
    from grounding_dino.config import load_experiment
    from grounding_dino.lightning_module import freeze
    from grounding_dino.model import build_model
    from grounding_dino.model.criterion import SetCriterion

    cfg = load_experiment(spec)
    model = build_model(cfg.model)
    freeze(model, cfg.train.freeze)  # the spec's ["bert"], as training does
    model.backbone[0].use_channels_last()  # as the training module does
    return cfg, model, SetCriterion.from_config(cfg.model)


def _unfreeze_batch_norm(module: nn.Module) -> None:
    """Swap HF's frozen BatchNorm for a trainable one with the same statistics."""
    for name, child in module.named_children():
        if type(child).__name__.endswith("FrozenBatchNorm2d"):
            bn = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            module._modules[name] = bn
        else:
            _unfreeze_batch_norm(child)


def build_hf(seed: int = 0):
    """Hugging Face's GroundingDinoForObjectDetection in the same small config, MiniLM weights loaded and frozen."""
    from transformers import BertConfig, BertModel, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers.models.timm_backbone import TimmBackboneConfig

    from grounding_dino.model.text import resolve_text_encoder

    folder = resolve_text_encoder("minilm")
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=TimmBackboneConfig(backbone="resnet18", out_indices=[2, 3, 4]),
        text_config=BertConfig.from_pretrained(folder),
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, num_queries=QUERIES, max_text_len=TEXT_LEN,
        num_feature_levels=4, dropout=0.0, auxiliary_loss=True, disable_custom_kernels=True,
    )
    model = GroundingDinoForObjectDetection(config)
    text = BertModel.from_pretrained(folder, add_pooling_layer=False)
    missing, unexpected = model.model.text_backbone.load_state_dict(text.state_dict(), strict=False)
    if [k for k in missing if "pooler" not in k] or unexpected:
        raise RuntimeError(f"MiniLM weights do not fit HF's text backbone: missing {missing}, unexpected {unexpected}")
    _unfreeze_batch_norm(model.model.backbone)
    for p in model.model.backbone.parameters():
        p.requires_grad_(True)
    for p in model.model.text_backbone.parameters():
        p.requires_grad_(False)
    return model


def hf_labels(targets):
    """HF's training labels: class_labels index the phrases of each image's prompt, boxes normalised cxcywh."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def attach_positive_maps(tokenizer, targets):
    for t in targets:
        phrase_maps = tokenizer.positive_map(t["caption"], t["spans"])
        t["positive_map"] = phrase_maps[t["labels"]]
    return targets

