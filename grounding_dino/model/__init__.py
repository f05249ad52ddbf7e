"""Grounding DINO in PyTorch. `build_model(cfg)` makes the detector of a ModelConfig (imports torch lazily)."""


def build_model(cfg, *, activation_checkpoint: bool = False, backbone_pretrained: bool = False):
    """The detector of ModelConfig `cfg`.

    backbone_pretrained: weights will be loaded into the backbone afterwards (a full checkpoint); with
    model.backbone_norm 'auto' this freezes its BatchNorm statistics as for pretrained_backbone_path.
    """
    from .backbone import build_backbone
    from .groundingdino import GroundingDINO

    return GroundingDINO(cfg, build_backbone(cfg, backbone_pretrained), activation_checkpoint)


def __getattr__(name):
    if name == "GroundingDINO":
        from .groundingdino import GroundingDINO

        return GroundingDINO
    raise AttributeError(name)
