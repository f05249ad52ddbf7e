"""`Detector`: text-prompted detection in one Python call, the way the inference action and the demo run it.

    from grounding_dino import Detector
    detector = Detector.load("model.pth", threshold=0.3)      # or an .onnx export, or a Hugging Face id
    result = detector.predict("street.jpg", ["person", "helmet"])
    result.boxes, result.scores, result.labels, result.phrases
    detector.annotate("street.jpg", result, "street_annotated.jpg")

`Detector.load` reads the model as the evaluate and inference actions do (predictor.load_predictor: our .pth,
official, TAO or transformers weights, a hub id, an .onnx file on ONNX Runtime, a TensorRT .engine with the deploy
extra). The settings a checkpoint does not carry come from `spec` (a spec dict or YAML file, as the CLI takes) and the
keyword options of OPTIONS. Images are resized and normalised as in evaluation; each image's result does not depend
on the other images of the batch nor on their prompts (Predictor.detect).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml
from PIL import Image

from grounding_dino.config import ExperimentConfig, load_experiment
from grounding_dino.data.captions import normalize_name
from grounding_dino.data.images import read_image
from grounding_dino.data.loader import collate_fn
from grounding_dino.data.transforms import build_transforms
from grounding_dino.draw import draw_detections, phrase_colors
from grounding_dino.predictor import Predictor, PromptChunk, load_predictor, split_prompt

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Prompt = Union[str, Sequence[str]]

# Detector.load's keyword options and the spec keys they set.
OPTIONS: Dict[str, str] = {
    "threshold": "inference.conf_threshold",
    "num_select": "model.num_select",
    "one_label_per_box": "inference.one_label_per_box",
    "batch_size": "inference.batch_size",
    "text_encoder_type": "model.text_encoder_type",
    "max_text_len": "model.max_text_len",
    "resize": "dataset.augmentation.test_random_resize",
    "max_size": "dataset.augmentation.random_resize_max_size",
    "input_width": "inference.input_width",
    "input_height": "inference.input_height",
    "gpu_ids": "inference.gpu_ids",
    "color_map": "inference.color_map",
    "outline_width": "inference.outline_width",
}
SAVE_OPTIONS = {"JPEG": {"quality": 95}}


@dataclass(eq=False)  # arrays have no single truth value to compare by
class Prediction:
    """One image's detections, best first: boxes [N, 4] xyxy in the image's pixels, scores [N], labels [N] (index
    into `names`, the image's prompt phrases) and phrases [N] (the label's phrase); image_size is the image's
    (width, height), EXIF orientation applied."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    phrases: List[str]
    names: Tuple[str, ...] = field(default=())
    image_size: Tuple[int, int] = field(default=(0, 0))

    def __len__(self) -> int:
        return len(self.scores)

    def to_supervision(self):
        """This result as `supervision.Detections` (class_id = label, data["class_name"] = phrase); needs the
        `supervision` package."""
        try:
            import supervision
        except ImportError as err:
            raise ImportError("to_supervision needs the supervision package: pip install supervision") from err
        return supervision.Detections(xyxy=self.boxes.astype(np.float32), confidence=self.scores.astype(np.float32),
                                      class_id=self.labels.astype(int),
                                      data={"class_name": np.array(self.phrases, dtype=str)})


def prompt_phrases(prompt: Prompt) -> Tuple[str, ...]:
    """The phrases of a prompt: a list of phrases, or one string of comma-separated phrases ("person, helmet")."""
    phrases = prompt.split(",") if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in phrases):
        raise ValueError(f"a prompt is a list of phrases or a comma-separated string, got {prompt!r}")
    names = tuple(normalize_name(p) for p in phrases)
    if not names or not all(names):
        raise ValueError(f"the prompt needs one or more non-empty phrases, got {prompt!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"the prompt repeats a phrase: {list(names)}")
    return names


def open_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path (EXIF orientation applied, as in training), a PIL image or an HxW / HxWx3
    uint8 array (RGB)."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be uint8 HxW or HxWx3 (RGB), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"an image is a path, a PIL image or a numpy array, got {type(image).__name__}")


def prepare(image: Image.Image, transforms) -> Tuple[torch.Tensor, torch.Tensor]:
    """(normalised tensor [3,H,W], original size (height, width)) of an RGB image under the eval transforms."""
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64)}
    tensor, _ = transforms(image, empty, np.random.default_rng(0))  # eval transforms draw nothing at random
    return tensor, torch.tensor([image.height, image.width])


def _set(spec: Dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        spec = spec.setdefault(key, {})
    spec[last] = value


class Detector:
    """A model, its input transforms and its inference settings (the spec's inference section)."""

    def __init__(self, predictor: Predictor, cfg: ExperimentConfig, section: str = "inference"):
        options = getattr(cfg, section)
        self.predictor = predictor
        self.cfg = cfg
        self.threshold = options.conf_threshold
        self.num_select = cfg.model.num_select
        self.one_label_per_box = getattr(options, "one_label_per_box", False)
        self.batch_size = options.batch_size if options.batch_size > 0 else cfg.dataset.batch_size
        self.input_size = predictor.image_size(options.input_width, options.input_height, section)
        self.transforms = build_transforms(cfg.dataset.augmentation, False, self.input_size)
        self.color_map = dict(getattr(options, "color_map", {}))
        phrase_colors((), self.color_map)  # a bad color is refused now, not at the first image that shows it
        self.outline_width = getattr(options, "outline_width", cfg.inference.outline_width)
        self._chunks: Dict[Tuple[str, ...], List[PromptChunk]] = {}

    @classmethod
    def load(cls, model: Union[str, Path], spec: Union[None, str, Path, Dict[str, Any]] = None,
             **options: Any) -> "Detector":
        """A Detector for `model`: a .pth/.ckpt checkpoint, an .onnx export, a TensorRT .engine, a transformers
        GroundingDino folder or a Hugging Face id. `spec`: a spec dict or YAML file for settings the model does not
        carry (an .onnx file needs model.text_encoder_type); `options` (OPTIONS) override it, e.g. threshold=0.3,
        resize=256 (shorter side), text_encoder_type="minilm"."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown Detector option(s) {unknown}; use {sorted(OPTIONS)} or a spec")
        if isinstance(spec, (str, Path)):
            spec = yaml.safe_load(Path(spec).read_text()) or {}
        data = copy.deepcopy(spec or {})
        for name, value in options.items():
            _set(data, OPTIONS[name], value)
        cfg = load_experiment(data)
        return cls(load_predictor(str(model), cfg, "inference"), cfg)

    def chunks(self, phrases: Tuple[str, ...]) -> List[PromptChunk]:
        """The prompt's captions of at most max_text_len tokens (split_prompt), built once per prompt."""
        if phrases not in self._chunks:
            self._chunks[phrases] = split_prompt(phrases, self.predictor.tokenizer)
        return self._chunks[phrases]

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], prompts: Union[Prompt, Sequence[Prompt]],
                threshold: Optional[float] = None) -> Union[Prediction, List[Prediction]]:
        """Detections of `prompts` in `images`, one Prediction per image (a list for a list of images).

        prompts: one prompt for every image (a list of phrases, or "person, helmet"), or one prompt per image as a
        list of lists of phrases ([["person"], ["car", "bus"]]). Detections scoring below `threshold` (default: the
        spec's inference.conf_threshold) are dropped.
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        per_image = _per_image(prompts, len(images))
        results: List[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            batch = [prepare(open_image(image), self.transforms) for image in images[start:start + self.batch_size]]
            tensors, pixel_mask, orig_sizes = collate_fn(batch)
            results += self.predict_batch(tensors, pixel_mask, torch.stack(orig_sizes),
                                          per_image[start:start + self.batch_size], threshold)
        return results[0] if single else results

    def predict_batch(self, images: torch.Tensor, pixel_mask: Optional[torch.Tensor], orig_sizes: torch.Tensor,
                      prompts: Sequence[Tuple[str, ...]], threshold: Optional[float] = None) -> List[Prediction]:
        """`predict` on prepared images (a padded batch of `prepare`d tensors, collate_fn), one phrase tuple
        (prompt_phrases) per image."""
        threshold = self.threshold if threshold is None else threshold
        detections = self.predictor.detect(images, pixel_mask, orig_sizes, [self.chunks(p) for p in prompts],
                                           self.num_select, self.one_label_per_box)
        results = []
        for names, found, (height, width) in zip(prompts, detections, orig_sizes.tolist()):
            keep = found["scores"] >= threshold
            labels = found["labels"][keep].cpu().numpy()
            results.append(Prediction(boxes=found["boxes"][keep].cpu().numpy(),
                                      scores=found["scores"][keep].cpu().numpy(), labels=labels,
                                      phrases=[names[label] for label in labels], names=names,
                                      image_size=(width, height)))
        return results

    def annotate(self, image: ImageInput, result: Prediction,
                 path: Union[None, str, Path] = None) -> Union[Image.Image, Path]:
        """`image` with `result` drawn (a box and a "phrase score" tag per detection, a stable color per phrase,
        inference.color_map first). Returns the PIL image, or writes it to `path` (format by extension) and
        returns the path."""
        colors = phrase_colors(result.names, self.color_map)
        found = [(box, phrase, score) for box, phrase, score in zip(result.boxes.tolist(), result.phrases,
                                                                    result.scores.tolist())]
        drawn = draw_detections(open_image(image), found, colors, self.outline_width)
        if path is None:
            return drawn
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_format = Image.registered_extensions().get(path.suffix.lower())
        drawn.save(path, format=image_format, **SAVE_OPTIONS.get(image_format, {}))
        return path


def _per_image(prompts: Union[Prompt, Sequence[Prompt]], count: int) -> List[Tuple[str, ...]]:
    """One phrase tuple per image from one shared prompt or a list of per-image prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)):
        return [prompt_phrases(prompts)] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images: give one prompt for all images or one per "
                         "image")
    return [prompt_phrases(p) for p in prompts]
