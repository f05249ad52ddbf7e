"""Checkpoint I/O: load ours, official IDEA-Research, Hugging Face and TAO weights into one model; key maps.

Our state dict uses the official key names, except inside a Swin backbone where timm's names are kept
(`backbone.0.body.layers_1.downsample` is official `backbone.0.layers.0.downsample`). Keys the architecture never
uses (BERT's pooler and position-id buffer, the denoising label embedding, Swin buffers, BatchNorm counters) are
ignored and listed as such. Everything is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from grounding_dino.config import structural_keys

from .backbone import native_swin_key, official_swin_key

StateDict = Dict[str, Tensor]
TAO_PREFIX = "model.model."
# Never used by the architecture: safe to drop from any source.
UNUSED = re.compile(r"(^bert\.pooler\.|^bert\.embeddings\.position_ids$|^label_enc\.|relative_position_index$|"
                    r"\.attn_mask$|num_batches_tracked$|^backbone\.0\.norm$|^backbone\.0\.norm\.)")
# Settings that change parameter shapes or how the weights are read (marked in grounding_dino/config.py); a checkpoint
# must agree on all of them. Two are not compared as values: log_scale is compared by kind (a learnable scale's start
# value is not structural), and text_encoder_type names a folder that differs between machines holding the same
# encoder, so the text encoder's weight shapes and a packed file's declared encoder (_external_text_encoder) decide.
STRUCTURAL_KEYS = tuple(k[len("model."):] for k in structural_keys() if k.startswith("model."))
_COMPARED_APART = ("log_scale", "text_encoder_type")


@dataclass
class LoadReport:
    format: str                                   # ours | official | tao | hf
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)   # "key: checkpoint shape vs model shape"
    ignored: List[str] = field(default_factory=list)      # unused by the architecture, dropped on purpose

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face (GroundingDinoForObjectDetection) -> official

_HF_BACKBONE = r"^model\.backbone\.conv_encoder\.model\."
_HF_BACKBONE_RULES: List[Tuple[str, str]] = [
    (_HF_BACKBONE + r"_backbone\.", "backbone.0.body."),
    (_HF_BACKBONE + r"(swin\.)?embeddings\.patch_embeddings\.projection\.", "backbone.0.patch_embed.proj."),
    (_HF_BACKBONE + r"(swin\.)?embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (_HF_BACKBONE + r"(swin\.)?encoder\.layers\.", "backbone.0.layers."),
    (_HF_BACKBONE + r"hidden_states_norms\.stage(\d+)\.", lambda m: f"backbone.0.norm{int(m.group(1)) - 1}."),
    (_HF_BACKBONE + r"(swin\.)?layernorm\.", "backbone.0.norm."),
    (r"^model\.text_backbone\.", "bert."),
]
# Inside Swin blocks only (BERT has attention.self.query too).
_HF_SWIN_RULES: List[Tuple[str, str]] = [
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(self\.|relative_position_bias\.)relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"\.attention\.self\.relative_position_index$", ".attn.relative_position_index"),
    (r"\.attention\.(self\.query|q_proj)\.", ".attn.qkv@q."),
    (r"\.attention\.(self\.key|k_proj)\.", ".attn.qkv@k."),
    (r"\.attention\.(self\.value|v_proj)\.", ".attn.qkv@v."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"(blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
_HF_MODEL_RULES: List[Tuple[str, str]] = [
    (r"^model\.text_projection\.", "feat_map."),
    (r"^model\.input_proj_vision\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (r"^model\.reference_points\.", "transformer.refpoint_embed."),
    (r"^model\.enc_output\.", "transformer.enc_output."),
    (r"^model\.enc_output_norm\.", "transformer.enc_output_norm."),
    (r"^model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.", r"transformer.encoder.layers.\1."),
    (r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.", r"transformer.encoder.text_layers.\1."),
    (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.", r"transformer.encoder.fusion_layers.\1."),
    (r"^model\.decoder\.layers\.", "transformer.decoder.layers."),
    (r"^model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"^model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."),
    # inside encoder layers
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(encoder\.(layers|text_layers)\.\d+)\.fc1\.", r"\1.linear1."),
    (r"(encoder\.(layers|text_layers)\.\d+)\.fc2\.", r"\1.linear2."),
    (r"(text_layers\.\d+)\.layer_norm_before\.", r"\1.norm1."),
    (r"(text_layers\.\d+)\.layer_norm_after\.", r"\1.norm2."),
    (r"(fusion_layers\.\d+)\.vision_param$", r"\1.gamma_v"),
    (r"(fusion_layers\.\d+)\.text_param$", r"\1.gamma_l"),
    (r"(fusion_layers\.\d+)\.layer_norm_vision\.", r"\1.layer_norm_v."),
    (r"(fusion_layers\.\d+)\.layer_norm_text\.", r"\1.layer_norm_l."),
    (r"(fusion_layers\.\d+\.attn)\.vision_proj\.", r"\1.v_proj."),
    (r"(fusion_layers\.\d+\.attn)\.text_proj\.", r"\1.l_proj."),
    (r"(fusion_layers\.\d+\.attn)\.values_vision_proj\.", r"\1.values_v_proj."),
    (r"(fusion_layers\.\d+\.attn)\.values_text_proj\.", r"\1.values_l_proj."),
    (r"(fusion_layers\.\d+\.attn)\.out_vision_proj\.", r"\1.out_v_proj."),
    (r"(fusion_layers\.\d+\.attn)\.out_text_proj\.", r"\1.out_l_proj."),
    # inside decoder layers
    (r"(decoder\.layers\.\d+)\.encoder_attn_text_layer_norm\.", r"\1.catext_norm."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_text\.", r"\1.ca_text."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.fc1\.", r"\1.linear1."),
    (r"(decoder\.layers\.\d+)\.fc2\.", r"\1.linear2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    # dense attentions: HF splits q/k/v, the official nn.MultiheadAttention packs them in in_proj
    (r"((text_layers|decoder\.layers)\.\d+\.(self_attn|ca_text))\.(query|key|value)\.(weight|bias)$",
     lambda m: f"{m.group(1)}.in_proj_{m.group(5)}@{m.group(4)[0]}"),
]


def convert_hf_state_dict(sd: StateDict) -> StateDict:
    """A Hugging Face GroundingDinoForObjectDetection state dict (transformers 4.x or 5.x) -> official key names."""
    renamed: StateDict = {}
    for key, value in sd.items():
        for pattern, repl in _HF_BACKBONE_RULES:
            key = re.sub(pattern, repl, key)
        rules = _HF_SWIN_RULES if key.startswith("backbone.0.layers.") else _HF_MODEL_RULES
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    return _complete_shared_heads(_pack_qkv(renamed))


def _pack_qkv(sd: StateDict) -> StateDict:
    """Join 'X@q', 'X@k', 'X@v' (…qkv@q.weight or …in_proj_weight@q) into one tensor X in q, k, v order."""
    out, parts = {}, {}
    for key, value in sd.items():
        match = re.match(r"^(.*)@([qkv])(.*)$", key)
        if match:
            parts.setdefault(match.group(1) + match.group(3), {})[match.group(2)] = value
        else:
            out[key] = value
    for key, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face checkpoint: {key} has only the {sorted(qkv)} parts of query/key/value.")
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], 0)
    return out


def _complete_shared_heads(sd: StateDict) -> StateDict:
    """HF ties (and saves once) the box head the official model registers under bbox_embed.N and the decoder."""
    out = dict(sd)
    for key, value in sd.items():
        for a, b in (("transformer.decoder.bbox_embed.", "bbox_embed."), ("bbox_embed.", "transformer.decoder.bbox_embed.")):
            if key.startswith(a):
                out.setdefault(b + key[len(a):], value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ours <-> official <-> TAO

def _is_swin(model_or_name) -> bool:
    name = model_or_name if isinstance(model_or_name, str) else model_or_name.cfg.backbone
    return name.startswith("swin")


def to_official(sd: StateDict, backbone: str) -> StateDict:
    """Our state dict -> official key names (only Swin backbone names differ)."""
    return {official_swin_key(k): v for k, v in sd.items()} if _is_swin(backbone) else dict(sd)


def from_official(sd: StateDict, backbone: str) -> StateDict:
    return {native_swin_key(k): v for k, v in sd.items()} if _is_swin(backbone) else dict(sd)


def to_tao(sd: StateDict, backbone: str) -> StateDict:
    """Our state dict -> TAO's Lightning layout: official names, backbone under backbone.0.body., model.model. prefix."""
    return {TAO_PREFIX + k.replace("backbone.0.", "backbone.0.body.", 1): v
            for k, v in to_official(sd, backbone).items()}


def from_tao(sd: StateDict, backbone: str) -> StateDict:
    return from_official({k.replace("backbone.0.body.", "backbone.0.", 1): v for k, v in sd.items()}, backbone)


# ---------------------------------------------------------------------------------------------------------------
# loading

def _unwrap(obj) -> Tuple[StateDict, dict]:
    """(state dict, the dict around it) of a loaded file: Lightning/TAO 'state_dict', official 'model', or flat."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict of tensors, got {type(obj).__name__}")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner, obj
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"no state dict found (top-level keys: {sorted(obj)[:10]}); expected 'state_dict', 'model' or "
                     f"a flat dict of tensors")


def _strip_prefix(sd: StateDict) -> Tuple[StateDict, str]:
    """Drop the wrapper prefix ('module.', Lightning's 'model.', TAO's 'model.model.') in front of the model keys."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    for prefix in (TAO_PREFIX, "model.", ""):
        if prefix + "transformer.level_embed" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, ""


def detect_and_convert(sd: StateDict, backbone: str) -> Tuple[StateDict, str]:
    """Any supported layout -> ours, with the name of the layout found."""
    if any(k.startswith(("model.backbone.conv_encoder.", "model.text_backbone.")) for k in sd):
        return from_official(convert_hf_state_dict(sd), backbone), "hf"
    sd, prefix = _strip_prefix(sd)
    keys = list(sd)
    tao_body = any(re.match(r"backbone\.0\.body\.(body\.|layers\.\d|norm\d)", k) for k in keys)
    if tao_body:
        return from_tao(sd, backbone), "tao"
    # Lightning saves our model under 'model.'; a bare official-named dict is the official layout.
    fmt = {"": "official", "model.": "ours", TAO_PREFIX: "tao"}[prefix]
    if _is_swin(backbone) and any(re.match(r"backbone\.0\.(layers\.\d|patch_embed)", k) for k in keys):
        return from_official(sd, backbone), fmt
    return sd, fmt


def config_conflicts(saved_model_config: dict, cfg) -> List[str]:
    """Structural model settings in which a checkpoint's saved config and `cfg` disagree, as readable lines."""
    current = dataclasses.asdict(cfg)
    lines = []
    for key in STRUCTURAL_KEYS:
        if key in _COMPARED_APART:
            continue
        if key in saved_model_config and saved_model_config[key] != current[key]:
            lines.append(f"model.{key}: checkpoint {saved_model_config[key]!r}, spec {current[key]!r}")
    from .head import parse_log_scale

    saved_scale = parse_log_scale(saved_model_config.get("log_scale"))
    kinds = [type(s).__name__ if not isinstance(s, str) else s for s in (saved_scale, parse_log_scale(cfg.log_scale))]
    if "log_scale" in saved_model_config and kinds[0] != kinds[1]:
        lines.append(f"model.log_scale: checkpoint {saved_model_config['log_scale']!r}, spec {cfg.log_scale!r}")
    return lines


def load_weights(model: nn.Module, source: Union[str, Path, dict], *, strict: bool = True) -> LoadReport:
    """Load ours / official / Hugging Face / TAO weights into `model` (a GroundingDINO).

    strict: any missing, unexpected or mis-shaped key (and any structural config conflict) raises ValueError
    listing them; otherwise the matching tensors load and the report lists the rest.
    """
    where = str(source) if not isinstance(source, dict) else "<state dict>"
    obj = torch.load(source, map_location="cpu", weights_only=True) if not isinstance(source, dict) else source
    try:
        raw, outer = _unwrap(obj)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if "model_config" in outer and hasattr(model, "cfg"):
        conflicts = config_conflicts(outer["model_config"], model.cfg)
        if conflicts and strict:
            raise ValueError(f"{where} was trained with other model settings; set these in the spec:\n  "
                             + "\n  ".join(conflicts))
    sd, fmt = detect_and_convert(raw, model.cfg.backbone)
    if "model_config" in outer:
        fmt = "ours"
    external = _external_text_encoder(outer, model, where)
    own = model.state_dict()
    report = LoadReport(format=fmt)
    report.ignored = sorted(k for k in sd if UNUSED.search(k) and k not in own)
    sd = {k: v for k, v in sd.items() if k not in report.ignored}
    _fill_shared(sd, own)
    report.unexpected = sorted(set(sd) - set(own))
    # A packed file declares that the text-encoder weights it lacks are those the model was built with.
    report.missing = sorted(k for k in set(own) - set(sd) if not UNUSED.search(k)
                            and not (external and k.startswith("bert.")))
    usable = {}
    for key in set(sd) & set(own):
        if sd[key].shape == own[key].shape:
            usable[key] = sd[key]
        else:
            report.mismatched.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {tuple(own[key].shape)}")
    report.mismatched.sort()
    if strict and not report.ok:
        raise ValueError(_describe(where, report))
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _external_text_encoder(outer: dict, model: nn.Module, where: str) -> bool:
    """True when the file declares (key 'text_encoder') that it leaves out the text encoder's weights, all of them
    or the frozen part; the model must then use that same encoder, whose weights it loaded when it was built."""
    declared = outer.get("text_encoder")
    if declared is None:
        return False
    if declared != model.cfg.text_encoder_type:
        raise ValueError(f"{where} takes its text-encoder weights from {declared!r} (it stores at most the "
                         f"layers it trained), but model.text_encoder_type is {model.cfg.text_encoder_type!r}; set "
                         f"model.text_encoder_type: {declared}")
    return True


def _fill_shared(sd: StateDict, own: StateDict) -> None:
    """A module registered under several names (the shared heads) needs only one of its names in the file."""
    groups: Dict[tuple, List[str]] = {}
    for key, value in own.items():
        if value.numel():
            groups.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    for names in groups.values():
        present = [n for n in names if n in sd]
        if present:
            for name in names:
                sd.setdefault(name, sd[present[0]])


def _describe(where: str, report: LoadReport, limit: int = 20) -> str:
    lines = [f"{where} ({report.format} layout) does not fit this model:"]
    for title, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                        ("shape mismatch", report.mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
    lines.append("Check model.backbone, hidden_dim, layer counts, max_text_len, log_scale/class_embed_bias against "
                 "the checkpoint, or load with strict=False.")
    return "\n".join(lines)


def native_checkpoint(model: nn.Module) -> dict:
    """What we save: the state dict under 'model' plus the ModelConfig it was built with."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)}
