"""Checkpoint I/O: load ours, official IDEA-Research, Hugging Face and TAO weights into one model; key maps.

Our state dict uses the official key names, except inside a Swin backbone where timm's names are kept
(`backbone.0.body.layers_1.downsample` is official `backbone.0.layers.0.downsample`). Keys the architecture never
uses (BERT's pooler and position-id buffer, the denoising label embedding, Swin buffers, BatchNorm counters) are
ignored and listed as such.

Every checkpoint file is read by `load_file` (torch.load(weights_only=True), or safetensors), and every weights
source a spec names (train.pretrained_model_path, evaluate/inference/export.checkpoint, quantize.model_path) by
`read_checkpoint`: a file, a transformers GroundingDino folder, or a Hugging Face id of either. `settle_model_config`
then takes the model settings the checkpoint carries (ours: model_config; HF: config.json; official and TAO files:
read off the tensor shapes) where the spec leaves them at their defaults, and refuses a spec that contradicts them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from grounding_dino.config import ModelConfig, structural_keys

from . import hub
from .backbone import BACKBONES, native_swin_key, official_swin_key, swin_shapes
from .text import MINILM, is_grounding_dino_folder

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------
# reading files, folders and hub ids

# torch.save's legacy (pre-zip) format is a pickle stream; every pickle protocol >= 2 starts with this opcode.
_PICKLE_PROTO = b"\x80"
REFUSED = ("the file holds Python objects, not tensors (torch.load weights_only); re-save its state_dict with "
           "torch.save(model.state_dict(), path)")
SOURCE_KINDS = ("a checkpoint file (.pth/.ckpt/.pt/.safetensors), a transformers GroundingDino folder (config.json + "
                "model.safetensors), or a Hugging Face id such as IDEA-Research/grounding-dino-tiny or "
                "org/name/file.pth")


def load_file(path: Union[str, Path], key: str, *, mmap: bool = False) -> Any:
    """The one reader of checkpoint files: safetensors, or torch.load(weights_only=True), whose refusal of a
    pickle that holds Python objects becomes one line naming the file and the fix. Every other failure is a
    ValueError naming `key`, the file and what it is instead."""
    path = str(path)
    unreadable = f"{key}: {path} is not a readable checkpoint"
    fix = "re-copy the file, or give another checkpoint"
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path)
        except SafetensorError as err:
            raise ValueError(f"{unreadable} (safetensors: {err}); {fix}") from None
    size = Path(path).stat().st_size
    if size == 0:
        raise ValueError(f"{key}: {path} is an empty file, not a checkpoint; {fix}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            if fh.read(1) != _PICKLE_PROTO:
                raise ValueError(f"{unreadable}: it is neither a torch.save archive nor a legacy torch.save pickle "
                                 f"(a truncated copy or another kind of file); {fix}")
        mmap = False  # only the zip format can be memory-mapped; a legacy file is read whole
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch names the class or function it will not build ("Unsupported global: GLOBAL argparse.Namespace",
        # "unsupported GLOBAL posix.getcwd whose module posix is blocked"); other unpickling failures are damaged files.
        reason = _unpickler_reason(err)
        if "global" in reason.lower():
            raise ValueError(f"{key}: {path}: refused: {REFUSED}") from None
        raise ValueError(f"{unreadable} (a truncated copy or another kind of file: {reason}); {fix}") from None
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError) as err:
        # a damaged archive or pickle stream fails inside torch's unpickler with whatever it was reading
        first = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{unreadable} ({first}); {fix}") from None


def _unpickler_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].strip()
        if "GLOBAL" in line:
            return line
    # torch's opening line is advice to load unsafely, which is not the reason
    return "unreadable pickle" if not lines or lines[0].startswith("Weights only load failed") else lines[0]


def read_hf_weights(folder: Union[str, Path], key: str) -> StateDict:
    """The weights of a transformers model folder: model.safetensors, its shards, or pytorch_model.bin (+ shards)."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return load_file(folder / single, key)
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(load_file(folder / shard, key))
            return sd
    raise FileNotFoundError(f"{key}: {folder} has no model.safetensors or pytorch_model.bin (nor their shards)")


@dataclass
class Checkpoint:
    """What a weights source holds. `settings` are the model settings it carries (ours: model_config; HF:
    config.json), `inferred` those read off tensor shapes (official and TAO files carry none)."""

    source: str                    # as the spec gave it
    key: str                       # the spec key it came from, for messages
    state_dict: StateDict          # as stored (any layout); load_weights converts it
    outer: dict                    # the dict around the state dict: model_config, tao_model, text_encoder, ...
    settings: Dict[str, Any] = field(default_factory=dict)
    inferred: Dict[str, Any] = field(default_factory=dict)


def check_source(value: str, key: str) -> None:
    """Raise FileNotFoundError naming `key` unless `value` is an existing path or reads as a hub id."""
    if not Path(value).expanduser().exists() and not hub.looks_like_id(value, allow_file=True):
        raise hub.missing(value, key, SOURCE_KINDS)


def local_source(value: Union[str, Path], key: str) -> Path:
    """The local file or folder of a weights source, downloading a hub id through huggingface_hub."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    value = str(value)
    if hub.looks_like_id(value, allow_file=True):
        return Path(hub.file(value, key) if value.endswith(hub.FILE_SUFFIXES) else hub.snapshot(value, key))
    raise hub.missing(value, key, SOURCE_KINDS)


def read_checkpoint(source: Union[str, Path], key: str = "checkpoint", *, mmap: bool = False) -> Checkpoint:
    """Any weights source the spec may name (see SOURCE_KINDS), with the settings it carries."""
    path = local_source(source, key)
    where = f"{key} {source}"
    if path.is_dir():
        if not is_grounding_dino_folder(path):
            raise ValueError(f"{where}: the folder is not a transformers GroundingDino model (its config.json is "
                             f"missing or has another model_type); give {SOURCE_KINDS}")
        return Checkpoint(str(source), key, read_hf_weights(path, key), {}, hf_settings(path, str(source)))
    loaded = load_file(path, key, mmap=mmap)
    try:
        raw, outer = _unwrap(loaded)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    checkpoint = Checkpoint(str(source), key, raw, outer)
    if isinstance(outer.get("model_config"), dict):
        checkpoint.settings = dict(outer["model_config"])
    else:
        checkpoint.inferred = shape_settings(raw)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# the model settings a checkpoint carries

def hf_settings(folder: Union[str, Path], source: str) -> Dict[str, Any]:
    """Our model settings from a transformers GroundingDino config.json. The text encoder is the folder (or id)
    itself: it holds the tokenizer and the BERT weights (see text.build_bert)."""
    from transformers import GroundingDinoConfig

    where = f"{source} (config.json)"
    config = GroundingDinoConfig.from_pretrained(str(folder))
    unsupported = []
    if config.decoder_ffn_dim != config.encoder_ffn_dim:
        unsupported.append(f"decoder_ffn_dim {config.decoder_ffn_dim} != encoder_ffn_dim {config.encoder_ffn_dim}")
    if config.decoder_attention_heads != config.encoder_attention_heads:
        unsupported.append(f"decoder_attention_heads {config.decoder_attention_heads} != encoder_attention_heads "
                           f"{config.encoder_attention_heads}")
    if not config.decoder_bbox_embed_share or config.two_stage_bbox_embed_share:
        unsupported.append("box heads shared otherwise than the official model (decoder_bbox_embed_share true, "
                           "two_stage_bbox_embed_share false)")
    if config.position_embedding_type != "sine":
        unsupported.append(f"position_embedding_type {config.position_embedding_type!r}")
    backbone, stages = _hf_backbone(config, where)
    if unsupported:
        raise ValueError(f"{where}: this model has settings our Grounding DINO does not build: "
                         + "; ".join(unsupported))
    levels = config.num_feature_levels
    return {
        "backbone": backbone, "return_interm_indices": _interm_indices(stages, levels, where),
        "num_feature_levels": levels, "hidden_dim": config.d_model, "nheads": config.encoder_attention_heads,
        "enc_layers": config.encoder_layers, "dec_layers": config.decoder_layers,
        "dim_feedforward": config.encoder_ffn_dim, "enc_n_points": config.encoder_n_points,
        "dec_n_points": config.decoder_n_points, "num_queries": config.num_queries,
        "max_text_len": config.max_text_len, "two_stage_type": "standard" if config.two_stage else "no",
        "embed_init_tgt": config.embedding_init_target,
        "pe_temperatureH": config.positional_embedding_temperature,
        "pe_temperatureW": config.positional_embedding_temperature,
        "log_scale": None, "class_embed_bias": False, "text_encoder_type": source,
    }


def _hf_backbone(config, where: str) -> Tuple[str, List[int]]:
    """(our backbone name, its stages 0..3) of an HF config's Swin or timm backbone."""
    backbone = config.backbone_config
    if backbone is None or backbone.model_type not in ("swin", "timm_backbone"):
        kind = getattr(backbone, "model_type", getattr(config, "backbone", None))
        raise ValueError(f"{where}: backbone {kind!r} is not one we build (a Swin, or a timm backbone among "
                         f"{sorted(s.timm_name for s in BACKBONES.values() if not s.swin)})")
    if backbone.model_type == "swin":
        shape = (backbone.embed_dim, tuple(backbone.depths), backbone.window_size)
        name = swin_shapes().get(shape)
        if name is None:
            raise ValueError(f"{where}: no model.backbone has Swin embed_dim {shape[0]}, depths {list(shape[1])}, "
                             f"window_size {shape[2]} (known: {sorted(swin_shapes().values())})")
        # HF counts the stem as stage 0
        return name, [i - 1 for i in backbone.out_indices]
    by_timm = {spec.timm_name: (name, spec.stage_offset) for name, spec in BACKBONES.items() if not spec.swin}
    if backbone.backbone not in by_timm:
        raise ValueError(f"{where}: timm backbone {backbone.backbone!r} is not one we build (known: "
                         f"{sorted(by_timm)})")
    name, offset = by_timm[backbone.backbone]
    return name, [i - offset for i in backbone.out_indices]


def _interm_indices(stages: List[int], levels: int, where: str) -> List[int]:
    """Our return_interm_indices: the backbone stages, then 4 for each level synthesised after them."""
    if not stages or min(stages) < 0 or max(stages) > 3 or levels < len(stages):
        raise ValueError(f"{where}: backbone stages {stages} with {levels} feature levels do not fit (stages are "
                         "0..3 and each needs a level)")
    return list(stages) + [4] * (levels - len(stages))


def shape_settings(sd: StateDict) -> Dict[str, Any]:
    """The structural settings the tensor shapes of an official, TAO or bare state dict reveal (a file without a
    model_config). Heads, sampling points, text length and the text encoder leave no shape of their own here."""
    sd, _ = _strip_prefix(sd)
    if any(k.startswith(("model.backbone.conv_encoder.", "model.text_backbone.")) for k in sd):
        return {}
    # One name for a backbone tensor whatever the layout: official, TAO (body.), ours (body., layers_N).
    body = {re.sub(r"^backbone\.0\.(body\.)*", "", k): v for k, v in sd.items() if k.startswith("backbone.0.")}
    out: Dict[str, Any] = {}
    backbone, channels = _shape_backbone(body)
    if "transformer.level_embed" in sd:
        out["num_feature_levels"], out["hidden_dim"] = sd["transformer.level_embed"].shape
    if "transformer.tgt_embed.weight" in sd:
        out["num_queries"] = sd["transformer.tgt_embed.weight"].shape[0]
    for name, pattern in (("enc_layers", r"^transformer\.encoder\.layers\.(\d+)\."),
                          ("dec_layers", r"^transformer\.decoder\.layers\.(\d+)\.")):
        found = [int(m.group(1)) for m in map(re.compile(pattern).match, sd) if m]
        if found:
            out[name] = max(found) + 1
    if "transformer.encoder.layers.0.linear1.weight" in sd:
        out["dim_feedforward"] = sd["transformer.encoder.layers.0.linear1.weight"].shape[0]
    out["class_embed_bias"] = any(re.match(r"^class_embed\.\d+\.bias$", k) for k in sd)
    if backbone is not None:
        out["backbone"] = backbone
        projections = sorted((int(m.group(1)), v.shape[1]) for k, v in sd.items()
                             for m in [re.match(r"^input_proj\.(\d+)\.0\.weight$", k)] if m and v.shape[-1] == 1)
        stages = [int(round(math.log2(c / channels))) for _, c in projections]
        if stages and "num_feature_levels" in out and all(0 <= s <= 3 for s in stages):
            out["return_interm_indices"] = list(stages) + [4] * (out["num_feature_levels"] - len(stages))
    return out


def _shape_backbone(body: StateDict) -> Tuple[Optional[str], int]:
    """(backbone name, channels of its stage 0) from backbone tensors named without their layout prefix."""
    if "patch_embed.proj.weight" in body:
        blocks: Dict[int, int] = {}
        for k in body:
            m = re.match(r"^layers[._](\d+)\.blocks\.(\d+)\.", k)
            if m:
                blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
        table = body.get("layers.0.blocks.0.attn.relative_position_bias_table",
                         body.get("layers_0.blocks.0.attn.relative_position_bias_table"))
        if table is None:
            return None, 0
        embed = body["patch_embed.proj.weight"].shape[0]
        window = (round(table.shape[0] ** 0.5) + 1) // 2
        return swin_shapes().get((embed, tuple(blocks[i] for i in sorted(blocks)), window)), embed
    if "conv1.weight" in body or "conv1.0.weight" in body:
        if "conv1.0.weight" in body:
            return "resnet_10t", 64
        if "layer1.0.conv3.weight" in body:
            return "resnet_50", 256
        depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"^layer3\.(\d+)\.").match, body) if m), default=0)
        return {2: "resnet_18", 6: "resnet_34"}.get(depth), 64
    return None, 0


def _usable_text_encoder(value: str) -> bool:
    """A text encoder a checkpoint names that can be found on this machine (or fetched)."""
    return value == MINILM or Path(value).expanduser().is_dir() or hub.looks_like_id(value, allow_legacy=True)


def settle_model_config(cfg: ModelConfig, checkpoint: Checkpoint) -> ModelConfig:
    """`cfg` with the checkpoint's structural settings where `cfg` leaves them at their defaults (so the shipped
    base model or an HF model fine-tunes without hand-copied settings). A value the spec sets that contradicts the
    checkpoint is refused, all of them in one error naming key, checkpoint value and spec value."""
    defaults = ModelConfig()
    carried = {**checkpoint.inferred, **checkpoint.settings}
    adopted = {}
    for key in STRUCTURAL_KEYS:
        if key not in carried or getattr(cfg, key) != getattr(defaults, key) or carried[key] == getattr(cfg, key):
            continue
        if key == "text_encoder_type" and not _usable_text_encoder(carried[key]):
            raise ValueError(f"{checkpoint.key} {checkpoint.source} was trained with model.text_encoder_type "
                             f"{carried[key]!r}, which is not on this machine: set model.text_encoder_type to a "
                             "copy of that text encoder (a folder or a Hugging Face id)")
        adopted[key] = carried[key]
    settled = dataclasses.replace(cfg, **adopted) if adopted else cfg
    if adopted:
        log.info("%s %s: model settings taken from the checkpoint: %s", checkpoint.key, checkpoint.source,
                 ", ".join(f"{k}={v!r}" for k, v in adopted.items()))
    # Inferred stage lists are not compared: [1, 2, 3] with 4 levels and [1, 2, 3, 4] build the same weights.
    inferred = {k: v for k, v in checkpoint.inferred.items() if k != "return_interm_indices"}
    conflicts = config_conflicts({**inferred, **checkpoint.settings}, settled)
    if conflicts:
        raise ValueError(f"{checkpoint.key} {checkpoint.source} was trained with other model settings; set these "
                         "in the spec (or remove them to take the checkpoint's):\n  " + "\n  ".join(conflicts))
    return settled


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


def load_weights(model: nn.Module, source: Union[str, Path, dict, Checkpoint], *, strict: bool = True) -> LoadReport:
    """Load ours / official / Hugging Face / TAO weights into `model` (a GroundingDINO) from a Checkpoint, a loaded
    dict, or any source read_checkpoint reads.

    strict: any missing, unexpected or mis-shaped key (and any structural config conflict) raises ValueError
    listing them; otherwise the matching tensors load and the report lists the rest.
    """
    if isinstance(source, Checkpoint):
        checkpoint = source
    elif isinstance(source, dict):
        try:
            raw, outer = _unwrap(source)
        except ValueError as err:
            raise ValueError(f"<state dict>: {err}") from None
        checkpoint = Checkpoint("<state dict>", "checkpoint", raw, outer,
                                dict(outer["model_config"]) if isinstance(outer.get("model_config"), dict) else {})
    else:
        checkpoint = read_checkpoint(source)
    where = checkpoint.source if checkpoint.key == "checkpoint" else f"{checkpoint.key} {checkpoint.source}"
    outer = checkpoint.outer
    if checkpoint.settings and hasattr(model, "cfg"):
        conflicts = config_conflicts(checkpoint.settings, model.cfg)
        if conflicts and strict:
            raise ValueError(f"{where} was trained with other model settings; set these in the spec:\n  "
                             + "\n  ".join(conflicts))
    sd, fmt = detect_and_convert(checkpoint.state_dict, model.cfg.backbone)
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
