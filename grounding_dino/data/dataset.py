"""The dataset: an annotation record → (normalised image tensor, target with caption, phrases and spans)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..formats import build_caption
from .captions import sample_names
from .errors import DataError
from .images import NEITHER, open_rgb, read_image
from .records import Record
from .tokens import TokenBudget


class TrainCaptions:
    """Per image: the names of its boxes plus sampled negatives from its source's vocabulary, shuffled.

    Grounding records have no vocabulary, so their caption is their own unique phrases, shuffled.
    """

    def __init__(self, max_labels: int, budget: Optional[TokenBudget] = None, hard_negatives: bool = False):
        self.max_labels = max_labels
        self.budget = budget
        self.hard_negatives = hard_negatives

    def __call__(self, box_names: List[str], negatives: Sequence[str], rng) -> List[str]:
        fits = self.budget.fits if self.budget is not None else None
        return sample_names(box_names, negatives, self.max_labels, rng, fits, self.hard_negatives)


class EpochDraws:
    """Which record each dataset index reads in an epoch, under per-source sampling weights.

    A source of n images with weight w gives round(w * n) draws per epoch (at least one when w > 0): every image
    floor(w) times, plus a seeded random subset, different each epoch, for the fraction. The table depends only on
    (seed, epoch), so data-loader workers and DDP ranks agree on it without talking.
    """

    def __init__(self, sources: Sequence[int], weights: Sequence[float], seed: int):
        sources = np.asarray(sources, dtype=np.int64)
        self.members = [np.flatnonzero(sources == s) for s in range(len(weights))]
        self.counts = [0 if w == 0 or not len(m) else max(1, int(round(w * len(m))))
                       for w, m in zip(weights, self.members)]
        self.seed = seed
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return sum(self.counts)

    def table(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            parts = []
            for source, (members, count) in enumerate(zip(self.members, self.counts)):
                whole, rest = divmod(count, len(members)) if count else (0, 0)
                parts += [members] * whole
                if rest:
                    rng = np.random.default_rng([self.seed, epoch, source])
                    parts.append(np.sort(rng.choice(members, size=rest, replace=False)))
            self._cached = (epoch, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        return self._cached[1]


class GroundingDataset(Dataset):
    """Items are (image FloatTensor[3,H,W], target) with target keys boxes (normalised cxcywh), labels (index into
    phrases), phrases, caption, spans, image_id, orig_size (h, w) and size (h, w after the transforms).

    vocabularies: per source, the names that record labels index (None where records carry their own phrases).
    image_dir_keys: per source, the spec key of its image folder (named when an image cannot be read).
    phrases: a fixed caption for every image (val/test: all categories in id order); None samples one per image.
    pad_size: (h, w) the loader pads every batch to, or None to pad to the batch maximum.
    draws: per-epoch record choice under source sampling weights (training); None reads every record once.
    """

    def __init__(
        self,
        records: Sequence[Record],
        vocabularies: Sequence[Optional[Tuple[str, ...]]],
        image_dir_keys: Sequence[str],
        transforms,
        seed: int,
        captions: Optional[TrainCaptions] = None,
        phrases: Optional[List[str]] = None,
        pad_size: Optional[Tuple[int, int]] = None,
        coco_file: Optional[str] = None,
        draws: Optional[EpochDraws] = None,
    ):
        if (captions is None) == (phrases is None):
            raise ValueError("give exactly one of captions (sampled per image) and phrases (fixed caption)")
        self.records = records
        self.vocabularies = list(vocabularies)
        self.image_dir_keys = list(image_dir_keys)
        self.negatives = [tuple(sorted(set(v))) if v else () for v in self.vocabularies]
        self.transforms = transforms
        self.seed = seed
        self.captions = captions
        self.phrases = phrases
        self.pad_size = pad_size
        self.coco_file = coco_file
        self.draws = draws
        self._coco_gt = None
        # Shared memory, so workers forked before set_epoch (persistent_workers) still see the new epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Vary sampling and augmentation per epoch; call at the start of every training epoch."""
        self._epoch.fill_(int(epoch))

    @property
    def coco_gt(self):
        """The ground truth as a faster_coco_eval COCO object (val/test/calibration), loaded on first use."""
        if self.coco_file is None:
            raise AttributeError("coco_gt exists only for COCO val/test/calibration datasets")
        if self._coco_gt is None:
            from faster_coco_eval import COCO

            self._coco_gt = COCO(self.coco_file)
        return self._coco_gt

    def __len__(self) -> int:
        return len(self.records) if self.draws is None else len(self.draws)

    def __getitem__(self, index: int):
        epoch = int(self._epoch)
        record = self.records[index if self.draws is None else int(self.draws.table(epoch)[index])]
        rng = np.random.default_rng([self.seed, epoch, index])
        target = {"boxes": record["boxes"], "labels": record["labels"]}
        image, target = self.transforms(load_image(record, self.image_dir_keys[record["source"]]), target, rng)
        phrases, labels = self._caption_names(record, target["labels"], rng)
        caption, spans = build_caption(phrases)
        h, w = image.shape[-2:]
        return image, {
            "boxes": _normalized_cxcywh(target["boxes"], w, h),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "phrases": phrases,
            "caption": caption,
            "spans": spans,
            "image_id": int(record["image_id"]),
            "orig_size": torch.tensor([record["height"], record["width"]], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }

    def _caption_names(self, record: Record, labels: np.ndarray, rng) -> Tuple[List[str], List[int]]:
        if self.phrases is not None:
            return self.phrases, labels.tolist()
        own = record["phrases"] is not None
        table = record["phrases"] if own else self.vocabularies[record["source"]]
        box_names = [table[label] for label in labels]
        names = self.captions(box_names, () if own else self.negatives[record["source"]], rng)
        position = {name: i for i, name in enumerate(names)}
        return names, [position[name] for name in box_names]


def unreadable_reason(path: str) -> Optional[str]:
    """Why the image at `path` cannot be decoded, or None when it can."""
    try:
        read_image(path)
    except OSError as e:
        return str(e) or type(e).__name__
    return None


def load_image(record: Record, image_dir_key: str) -> Image.Image:
    """The record's image, RGB, oriented by the EXIF rule of grounding_dino.data.images against the annotation's
    width and height."""
    annotated = (record["width"], record["height"])
    try:
        image, rule = open_rgb(record["file"], annotated)
    except OSError as e:
        raise DataError(
            f"{image_dir_key}: cannot read image {record['file']} ({record['where']}): {e}. Fix: replace or remove "
            "the file, or set dataset.skip_bad_images=true to skip unreadable images"
        ) from None
    if rule == NEITHER:  # build_dataset warned about these
        return image.resize(annotated, Image.Resampling.BILINEAR)
    if image.size != annotated:
        raise DataError(
            f"{record['where']}: image {record['file']} is {image.width}x{image.height} pixels but the annotation "
            f"says {record['width']}x{record['height']} (width x height); fix the annotation's width/height"
        )
    return image


def _normalized_cxcywh(boxes: np.ndarray, w: int, h: int) -> torch.Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.unbind(-1)
    cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
    return cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
