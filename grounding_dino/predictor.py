"""Predictor backends: one call, `predict(images, pixel_mask, text) -> (pred_logits, pred_boxes)`, whatever runs it.

Backends ("torch": the nn.Module, "onnx": an ONNX Runtime CPU session on the export contract, "tensorrt": registered
by grounding_dino.deploy) sit in a registry of lazy "module:Class" strings, so importing this module never imports
onnxruntime or tensorrt. `load_predictor(path_or_model, cfg)` picks the backend by file extension.

On top of `predict`, `Predictor.detect` turns a list of phrases of any length into detections: the phrases are
packed greedily into prompts of at most max_text_len tokens (`split_prompt`), every prompt runs over the batch,
and each image keeps the top num_select detections of the union, labels mapped back to the phrase's global index.
With one prompt this is exactly the validation path of training (same caption, positive map and post-processing).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn

from grounding_dino.config import ExperimentConfig
from grounding_dino.errors import UserError
from grounding_dino.data.captions import build_caption, normalize_name
from grounding_dino.data.tokens import TokenBudget
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import check_source, load_weights, read_checkpoint, settle_model_config
from grounding_dino.model.postprocess import post_process, top_k
from grounding_dino.precision import autocast, resolve
from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder

Detections = List[Dict[str, Tensor]]

# The export contract (docs/architecture.md, "Export"): input names in forward order, output names.
ONNX_INPUTS = ("inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask")
# A fixed-vocabulary export (export.fixed_captions) takes only `inputs`; this ONNX metadata entry holds its phrases,
# caption and token ids as JSON, and it also outputs PHRASE_SCORES [B,Q,P].
FIXED_VOCABULARY = "grounding_dino.fixed_vocabulary"
PHRASE_SCORES = "phrase_scores"
ONNX_OUTPUTS = ("pred_logits", "pred_boxes")

_BACKENDS: Dict[str, str] = {
    "torch": "grounding_dino.predictor:TorchPredictor",
    "onnx": "grounding_dino.predictor:OnnxPredictor",
    "tensorrt": "grounding_dino.deploy.predictor:TensorRTPredictor",
}
_EXTENSIONS: Dict[str, str] = {".pth": "torch", ".ckpt": "torch", ".pt": "torch", ".onnx": "onnx",
                               ".engine": "tensorrt"}


# ---------------------------------------------------------------------------------------------------------------
# prompts longer than the text encoder


@dataclass(frozen=True)
class PromptChunk:
    """Phrases [offset, offset + len(names)) of a prompt, as one caption with its positive map [P, max_text_len]."""

    names: Tuple[str, ...]
    offset: int
    caption: str
    positive_map: Tensor


def split_prompt(names: Sequence[str], tokenizer) -> List[PromptChunk]:
    """Pack `names` in order into captions of at most tokenizer.max_text_len tokens (a CaptionTokenizer).

    Raises ValueError naming a phrase that alone is longer than the limit, or one the tokenizer cannot locate.
    """
    names = [normalize_name(n) for n in names]
    if not names or not all(names):
        raise ValueError(f"the prompt needs one or more non-empty phrases, got {list(names)!r}")
    budget = TokenBudget.from_tokenizer(tokenizer, names)
    groups: List[List[str]] = []
    for name in names:
        if not budget.fits([name]):
            raise ValueError(f"phrase {name!r} needs {budget.count([name])} tokens, more than model.max_text_len "
                             f"{budget.limit}; shorten it")
        if groups and budget.fits(groups[-1] + [name]):
            groups[-1].append(name)
        else:
            groups.append([name])
    chunks, offset = [], 0
    for group in groups:
        caption, spans = build_caption(group)
        positive_map = tokenizer.positive_map(caption, spans)
        empty = [group[i] for i in range(len(group)) if not positive_map[i].any()]
        if empty:
            raise ValueError(f"phrases {empty} map to no token of the caption {caption!r}")
        chunks.append(PromptChunk(tuple(group), offset, caption, positive_map))
        offset += len(group)
    return chunks


def merge_detections(parts: Sequence[Dict[str, Tensor]], num_select: int) -> Dict[str, Tensor]:
    """One image's detections from several prompts: the top `num_select` of their union, best first."""
    scores = torch.cat([p["scores"] for p in parts])
    _, keep = top_k(scores, num_select)
    return {key: torch.cat([p[key] for p in parts])[keep] for key in ("scores", "labels", "boxes")}


def valid_sizes(images: Tensor, pixel_mask: Optional[Tensor]) -> List[Tuple[int, int]]:
    """Each image's (height, width) inside its padded batch (collate_fn puts images in the top-left corner)."""
    if pixel_mask is None:
        return [tuple(images.shape[-2:])] * len(images)
    valid = ~pixel_mask.bool()
    return [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid]


# ---------------------------------------------------------------------------------------------------------------
# the interface


class Predictor(ABC):
    """A Grounding DINO that maps (images, pixel_mask, text) to token logits [B,Q,L] and cxcywh boxes [B,Q,4].

    tokenizer: the CaptionTokenizer of the model's text encoder.
    input_size: (width, height) every image must have, or None when any size (and padding) is accepted.
    pad_text: the backend takes text padded to max_text_len only.
    """

    name = "base"
    # What the backend computes in; an exported model or engine runs in the types it was built with.
    precision = "as built"

    def __init__(self, tokenizer, input_size: Optional[Tuple[int, int]] = None, pad_text: bool = False):
        self.tokenizer = tokenizer
        self.input_size = input_size
        self.pad_text = pad_text

    def image_size(self, width: Optional[int], height: Optional[int], section: str) -> Optional[Tuple[int, int]]:
        """The (width, height) images are resized to: the backend's fixed size, else the spec's `section`
        input_width/input_height, else None (aspect ratio kept)."""
        if (width is None) != (height is None):
            raise ValueError(f"{section}.input_width and {section}.input_height: set both or neither "
                             f"(got {width} and {height})")
        requested = (width, height) if width is not None else None
        if self.input_size is None:
            return requested
        if requested is not None and requested != self.input_size:
            raise ValueError(f"{section}.input_width/input_height {width}x{height} differ from the {self.name} "
                             f"model's fixed input {self.input_size[0]}x{self.input_size[1]}; remove them or set "
                             "them to the export size")
        return self.input_size

    @abstractmethod
    def predict(self, images: Tensor, pixel_mask: Optional[Tensor], text: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """images [B,3,H,W] normalised; pixel_mask [B,H,W] True on padding (or None); text from self.tokenizer."""

    def detect(self, images: Tensor, pixel_mask: Optional[Tensor], orig_sizes: Tensor,
               chunks: Union[Sequence[PromptChunk], Sequence[Sequence[PromptChunk]]], num_select: int,
               one_label_per_box: bool = False) -> Detections:
        """Per image {scores, labels (global phrase index), boxes xyxy in original pixels}, best first.

        chunks: one prompt (split_prompt's chunks) for every image, or a list with one prompt per image.
        one_label_per_box: each query keeps its best phrase only (per caption chunk: a prompt split into several
        captions runs each through the model, and each pass labels its own boxes).

        An image's detections do not depend on the rest of the batch: padding changes what the backbone's
        convolutions see near the image's edge, so the batch runs as groups of images of one size, cropped out of
        the padding, and each group with its images' own captions (text padding is masked exactly).
        """
        prompts = _per_image_prompts(chunks, len(images))
        sizes = valid_sizes(images, pixel_mask)
        parts: List[List[Dict[str, Tensor]]] = [[] for _ in images]
        for step in range(max(len(p) for p in prompts)):
            groups: Dict[Tuple[int, int], List[int]] = {}
            for i, prompt in enumerate(prompts):
                if step < len(prompt):
                    groups.setdefault(sizes[i], []).append(i)
            for (height, width), members in groups.items():
                index = torch.tensor(members)
                mine = [prompts[i][step] for i in members]
                text = self.tokenizer([c.caption for c in mine], pad_to_max=self.pad_text)
                logits, boxes = self.predict(images[index, :, :height, :width], None, text)
                found = post_process(logits, boxes, [c.positive_map for c in mine], orig_sizes[index],
                                     num_select=num_select, one_label_per_query=one_label_per_box)
                for i, chunk, detection in zip(members, mine, found):
                    detection["labels"] = detection["labels"] + chunk.offset
                    parts[i].append(detection)
        return [own[0] if len(own) == 1 else merge_detections(own, num_select) for own in parts]


def _per_image_prompts(chunks, batch: int) -> List[Sequence[PromptChunk]]:
    if chunks and isinstance(chunks[0], PromptChunk):
        return [chunks] * batch
    if len(chunks) != batch or not all(chunks):
        raise ValueError(f"{len(chunks)} prompts for a batch of {batch} images: pass one prompt for all of them or "
                         "one non-empty prompt per image")
    return list(chunks)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch


def _device(cfg: ExperimentConfig, section: str) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpu_ids = getattr(getattr(cfg, section), "gpu_ids", None) or [0]
    return torch.device(f"cuda:{gpu_ids[0]}")


def _precision(cfg: ExperimentConfig, section: str) -> str:
    """The spec's precision for `section` (quantize scores in fp32: it compares against the fp32 model)."""
    return getattr(getattr(cfg, section), "precision", "fp32")


class TorchPredictor(Predictor):
    """precision: fp32, bf16 or auto (grounding_dino.precision); `self.precision` is what runs, `self.why` why."""

    name = "torch"

    def __init__(self, model: nn.Module, device: Union[str, torch.device, None] = None, precision: str = "fp32"):
        super().__init__(model.tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.precision, self.why = resolve(precision, self.device.type)

    @classmethod
    def load(cls, path: str, cfg: ExperimentConfig, section: str = "evaluate") -> "TorchPredictor":
        """The model of the spec's model section with the weights of `path`: ours, official, TAO, a transformers
        GroundingDino folder, or a Hugging Face id of one (see checkpoint.read_checkpoint).

        Structural settings the checkpoint carries replace the spec's defaults; a spec that contradicts them is
        refused, naming the keys to change.
        """
        checkpoint = read_checkpoint(path, checkpoint_key(section))
        model_cfg = settle_model_config(cfg.model, checkpoint)
        # The checkpoint holds the backbone too, so model.pretrained_backbone_path is not read again. The norm layers
        # are built as in training (our checkpoints record it; other sources are pretrained weights), so the
        # numbers match training validation exactly.
        frozen_norm = checkpoint.outer.get("backbone_pretrained", True) or bool(cfg.model.pretrained_backbone_path)
        model = build_model(dataclasses.replace(model_cfg, pretrained_backbone_path=None),
                            backbone_pretrained=frozen_norm)
        load_weights(model, checkpoint)
        return cls(model, _device(cfg, section), _precision(cfg, section))

    @torch.inference_mode()
    def predict(self, images, pixel_mask, text):
        text = {k: v.to(self.device) for k, v in text.items()}
        mask = pixel_mask.to(self.device) if pixel_mask is not None else None
        with autocast(self.precision, self.device.type):
            out = self.model(images.to(self.device), mask, text)
        return out["pred_logits"].float(), out["pred_boxes"].float()


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime


def pad_text(text: Dict[str, Tensor], length: int) -> Dict[str, Tensor]:
    """Text inputs padded on the right to `length` tokens, as the tokenizer pads: id 0, not attended, position 0,
    and each padding token attending only to itself."""
    batch, current = text["input_ids"].shape
    if current > length:
        raise ValueError(f"text has {current} tokens but the model takes {length}")
    extra = length - current
    if extra == 0:
        return text
    out = {key: nn.functional.pad(text[key], (0, extra), value=0)
           for key in ("input_ids", "attention_mask", "position_ids", "token_type_ids")}
    mask = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)
    mask[:, :current, :current] = text["text_token_mask"]
    out["text_token_mask"] = mask
    return out


class OnnxPredictor(Predictor):
    """An exported model on ONNX Runtime (CPU). Its input size and text length are fixed by the export."""

    name = "onnx"

    def __init__(self, path: str, tokenizer):
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.fixed = json.loads(metadata[FIXED_VOCABULARY]) if FIXED_VOCABULARY in metadata else None
        expected = ["inputs"] if self.fixed else list(ONNX_INPUTS)
        if set(inputs) != set(expected) or not set(ONNX_OUTPUTS) <= set(outputs):
            raise ValueError(f"{path}: inputs {sorted(inputs)} and outputs {outputs} do not follow the export "
                             f"contract (inputs {expected}, outputs {list(ONNX_OUTPUTS)}); re-export it with the "
                             "export action")
        self.path = path
        batch, _, height, width = inputs["inputs"].shape
        if not all(isinstance(side, int) for side in (height, width)):
            raise ValueError(f"{path}: the image input has a dynamic size {inputs['inputs'].shape}; the export "
                             "contract fixes height and width")
        self.text_len = len(self.fixed["input_ids"]) if self.fixed else inputs["input_ids"].shape[1]
        if self.text_len != tokenizer.max_text_len:
            raise ValueError(f"{path} takes {self.text_len} text tokens but model.max_text_len is "
                             f"{tokenizer.max_text_len}; set model.max_text_len to {self.text_len}")
        self.batch = batch if isinstance(batch, int) else None
        super().__init__(tokenizer, input_size=(width, height), pad_text=True)

    @classmethod
    def load(cls, path: str, cfg: ExperimentConfig, section: str = "evaluate") -> "OnnxPredictor":
        tokenizer = CaptionTokenizer(resolve_text_encoder(cfg.model.text_encoder_type), cfg.model.max_text_len)
        return cls(path, tokenizer)

    def predict(self, images, pixel_mask, text):
        width, height = self.input_size
        if tuple(images.shape[-2:]) != (height, width):
            raise ValueError(f"the ONNX model takes {width}x{height} images, got {images.shape[-1]}x"
                             f"{images.shape[-2]}; resize inputs to the export size")
        if pixel_mask is not None and bool(pixel_mask.any()):
            raise ValueError("the ONNX model has no pixel mask: pass unpadded images of the export size")
        text = pad_text(text, self.text_len)
        if self.fixed and not bool((text["input_ids"] == torch.tensor(self.fixed["input_ids"])).all()):
            raise UserError(f"{self.path} is a fixed-vocabulary model for the phrases {self.fixed['phrases']} "
                            "(export.fixed_captions) and cannot score other phrases. Fix: prompt with exactly those "
                            "phrases in that order (for evaluate: categories of those names in id order), or use a "
                            "model exported without export.fixed_captions")
        feed = {"inputs": images.float(), "input_ids": text["input_ids"].long(),
                "attention_mask": text["attention_mask"].bool(), "position_ids": text["position_ids"].long(),
                "token_type_ids": text["token_type_ids"].long(), "text_token_mask": text["text_token_mask"].bool()}
        feed = {k: v.cpu().numpy() for k, v in feed.items() if not self.fixed or k == "inputs"}
        step = self.batch or len(images)
        logits, boxes = [], []
        for start in range(0, len(images), step):
            part = {k: v[start:start + step] for k, v in feed.items()}
            short = step - len(part["inputs"])
            if short:  # a fixed-batch export: fill the last slice with copies of its first item
                part = {k: _fill(v, step) for k, v in part.items()}
            out = dict(zip(ONNX_OUTPUTS, self.session.run(list(ONNX_OUTPUTS), part)))
            logits.append(torch.from_numpy(out["pred_logits"][:step - short]))
            boxes.append(torch.from_numpy(out["pred_boxes"][:step - short]))
        return torch.cat(logits), torch.cat(boxes)


def _fill(array, size: int):
    """`array` grown along axis 0 to `size` rows by repeating its first row."""
    return np.concatenate([array, np.repeat(array[:1], size - len(array), axis=0)])


# ---------------------------------------------------------------------------------------------------------------
# registry


def register_backend(name: str, target: str, extensions: Sequence[str] = ()) -> None:
    """Register (or replace) backend `name` as "module:Class" (a Predictor with `load(path, cfg, section)`), and
    route the given file extensions to it."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"backend target must look like 'package.module:Class', got {target!r}")
    _BACKENDS[name] = target
    for extension in extensions:
        _EXTENSIONS[extension.lower()] = name


def backend_for(path: Union[str, Path]) -> str:
    """The backend name of a model file, by extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; use one of {sorted(_EXTENSIONS)} "
                         f"({', '.join(f'{e} {b}' for e, b in sorted(_EXTENSIONS.items()))})")
    return _EXTENSIONS[suffix]


def _backend_class(name: str):
    target = _BACKENDS.get(name)
    if target is None:
        raise ValueError(f"no predictor backend {name!r} is registered (available: {sorted(_BACKENDS)}); "
                         "the TensorRT backend comes with grounding_dino.deploy and the 'deploy' extra")
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as err:
        raise ValueError(f"predictor backend {name!r} cannot load: importing {module_name} failed ({err}); install "
                         "the missing package") from err


def checkpoint_key(section: str) -> str:
    """The spec key holding the model of `section`, for messages."""
    return "quantize.model_path" if section == "quantize" else f"{section}.checkpoint"


def model_path(cfg: ExperimentConfig, section: str) -> str:
    """The model `section` (evaluate or inference) names: its checkpoint (a .pth/.onnx file, a transformers
    GroundingDino folder or a Hugging Face id) or its trt_engine."""
    options = getattr(cfg, section)
    given = {key: getattr(options, key) for key in ("checkpoint", "trt_engine") if getattr(options, key)}
    if len(given) != 1:
        raise ValueError(f"set exactly one of {section}.checkpoint (.pth checkpoint, .onnx model, GroundingDino "
                         f"folder or Hugging Face id) and {section}.trt_engine (TensorRT engine); got "
                         f"{given or 'neither'}")
    (key, path), = given.items()
    if key == "checkpoint":
        check_source(path, f"{section}.checkpoint")
    elif not Path(path).is_file():
        raise FileNotFoundError(f"{section}.{key}: {path} does not exist")
    return path


def load_predictor(path_or_model: Union[str, Path, nn.Module], cfg: ExperimentConfig,
                   section: str = "evaluate") -> Predictor:
    """A Predictor for a model in memory (torch) or a file (.pth/.ckpt/.pt torch, .onnx ONNX Runtime, .engine
    TensorRT); a folder or a Hugging Face id is a PyTorch model (see checkpoint.read_checkpoint). `section` names
    the spec section the path came from, for error messages and the GPU choice."""
    if isinstance(path_or_model, nn.Module):
        return TorchPredictor(path_or_model, _device(cfg, section), _precision(cfg, section))
    path = Path(path_or_model)
    if path.is_file():
        return _backend_class(backend_for(path)).load(str(path), cfg, section)
    if path.suffix.lower() in _EXTENSIONS and _EXTENSIONS[path.suffix.lower()] != "torch":
        raise FileNotFoundError(f"{section}: model file {path} does not exist")
    check_source(str(path_or_model), checkpoint_key(section))
    return TorchPredictor.load(str(path_or_model), cfg, section)
