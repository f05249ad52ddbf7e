"""Image + box transforms driven by dataset.augmentation, in the style of DETR's transforms.

Every transform takes (PIL image, target, rng) and returns (image, target); the target holds "boxes" (float32
[N,4] absolute xyxy) and "labels" (int64 [N]). All randomness comes from the rng the dataset derives from
(seed, epoch, index), so an item is the same whatever worker loads it.

`reachable(h, w)` returns the output shapes (h, w) that bound what a transform can produce from an h×w input;
the loader pads batches to the largest of them when fixed_padding is on. Resizing is monotonic in the aspect
ratio, so the tallest and the widest candidates are enough.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import AugmentationConfig, ConfigError

Shape = Tuple[int, int]


def resized_shape(h: int, w: int, short: int, max_size: Optional[int]) -> Shape:
    """Shorter side to `short`, unless that makes the longer side exceed `max_size` (DETR's rule)."""
    lo, hi = min(h, w), max(h, w)
    if max_size is not None and hi / lo * short > max_size:
        short = int(round(max_size * lo / hi))
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def resize(image: Image.Image, target: dict, shape: Shape):
    h, w = shape
    if (w, h) == image.size:
        return image, target
    scale = np.array([w / image.width, h / image.height] * 2, dtype=np.float32)
    image = image.resize((w, h), Image.BILINEAR)
    return image, {**target, "boxes": target["boxes"] * scale}


def crop(image: Image.Image, target: dict, top: int, left: int, h: int, w: int):
    """Crop, clip boxes to the crop, and drop boxes left with no area."""
    image = image.crop((left, top, left + w, top + h))
    boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], dtype=np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def reachable(self, h: int, w: int) -> Set[Shape]:
        shapes = {(h, w)}
        for t in self.transforms:
            shapes = set().union(*(t.reachable(*s) for s in shapes))
        return shapes


class RandomHorizontalFlip:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image, target, rng):
        if rng.random() >= self.p:
            return image, target
        boxes = target["boxes"].copy()
        boxes[:, [0, 2]] = image.width - target["boxes"][:, [2, 0]]
        return image.transpose(Image.FLIP_LEFT_RIGHT), {**target, "boxes": boxes}

    def reachable(self, h, w):
        return {(h, w)}


class RandomResize:
    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target, rng):
        short = self.sizes[rng.integers(len(self.sizes))]
        return resize(image, target, resized_shape(image.height, image.width, short, self.max_size))

    def reachable(self, h, w):
        return {resized_shape(h, w, s, self.max_size) for s in self.sizes}


class FixedResize:
    """A caller-chosen input size (e.g. the 960×544 of an exported model); aspect ratio is not kept."""

    def __init__(self, width: int, height: int):
        self.shape = (height, width)

    def __call__(self, image, target, rng):
        return resize(image, target, self.shape)

    def reachable(self, h, w):
        return {self.shape}


class RandomSizeCrop:
    """A crop with sides drawn from [min_size, max_size], never larger than the image."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def _range(self, side: int) -> Tuple[int, int]:
        return min(self.min_size, side), min(side, self.max_size)

    def __call__(self, image, target, rng):
        (h_lo, h_hi), (w_lo, w_hi) = self._range(image.height), self._range(image.width)
        h, w = int(rng.integers(h_lo, h_hi + 1)), int(rng.integers(w_lo, w_hi + 1))
        top, left = int(rng.integers(image.height - h + 1)), int(rng.integers(image.width - w + 1))
        return crop(image, target, top, left, h, w)

    def reachable(self, h, w):
        (h_lo, h_hi), (w_lo, w_hi) = self._range(h), self._range(w)
        return {(h_hi, w_lo), (h_lo, w_hi), (h_hi, w_hi)}


class RandomSelect:
    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng):
        return (self.first if rng.random() < self.p else self.second)(image, target, rng)

    def reachable(self, h, w):
        return self.first.reachable(h, w) | self.second.reachable(h, w)


class LargeScaleJitter:
    """fixed_random_crop: scale so the image fits (0.1..2.0)·size square, then a random crop of at most size²."""

    def __init__(self, size: int, min_scale: float = 0.1, max_scale: float = 2.0):
        self.size, self.min_scale, self.max_scale = size, min_scale, max_scale

    def _scaled(self, h: int, w: int, scale: float) -> Shape:
        factor = self.size * scale / max(h, w)
        return max(1, round(h * factor)), max(1, round(w * factor))

    def __call__(self, image, target, rng):
        shape = self._scaled(image.height, image.width, rng.uniform(self.min_scale, self.max_scale))
        image, target = resize(image, target, shape)
        h, w = min(shape[0], self.size), min(shape[1], self.size)
        top, left = int(rng.integers(shape[0] - h + 1)), int(rng.integers(shape[1] - w + 1))
        return crop(image, target, top, left, h, w)

    def reachable(self, h, w):
        big_h, big_w = self._scaled(h, w, self.max_scale)
        return {(min(big_h, self.size), min(big_w, self.size))}


class Normalize:
    """PIL RGB → float tensor [3,H,W], scaled to 0..1 and standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, target, rng):
        # Channels-first copy before the float math: arithmetic on the permuted view is several times slower.
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())
        return pixels.float().div_(255).sub_(self.mean).div_(self.std), target

    def reachable(self, h, w):
        return {(h, w)}


def build_transforms(aug: AugmentationConfig, train: bool, input_size: Optional[Shape] = None) -> Compose:
    """Train: flip → {multi-scale | resize → crop → multi-scale} or large-scale jitter. Eval: the test resize,
    or `input_size` (width, height) when given. Both end with normalisation."""
    _check(aug)
    normalize = Normalize(aug.input_mean, aug.input_std)
    if not train:
        if input_size is not None:
            return Compose([FixedResize(*input_size), normalize])
        return Compose([RandomResize([aug.test_random_resize], aug.random_resize_max_size), normalize])
    flip = RandomHorizontalFlip(aug.horizontal_flip_prob)
    if aug.fixed_random_crop:
        return Compose([flip, LargeScaleJitter(aug.fixed_random_crop), normalize])
    multiscale = RandomResize(aug.scales, aug.random_resize_max_size)
    crop_branch = Compose([
        RandomResize(aug.train_random_resize),
        RandomSizeCrop(aug.train_random_crop_min, aug.train_random_crop_max),
        multiscale,
    ])
    return Compose([flip, RandomSelect(multiscale, crop_branch), normalize])


def _check(aug: AugmentationConfig) -> None:
    key = "dataset.augmentation"
    for name in ("scales", "train_random_resize"):
        sizes: List[int] = getattr(aug, name)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ConfigError(f"{key}.{name}", f"needs one or more positive sizes, got {sizes!r}")
    if aug.train_random_crop_min > aug.train_random_crop_max:
        raise ConfigError(f"{key}.train_random_crop_min",
                          f"{aug.train_random_crop_min} exceeds train_random_crop_max {aug.train_random_crop_max}")
    for name in ("input_mean", "input_std"):
        if len(getattr(aug, name)) != 3:
            raise ConfigError(f"{key}.{name}", f"needs 3 values (R, G, B), got {getattr(aug, name)!r}")
    if any(s <= 0 for s in aug.input_std):
        raise ConfigError(f"{key}.input_std", f"values must be positive, got {aug.input_std!r}")
