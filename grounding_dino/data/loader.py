"""Batching: pad images to a common size with a padding mask, and the DataLoader built from the spec."""
from __future__ import annotations

import functools
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import ExperimentConfig
from .build import build_dataset


def collate_fn(batch: List[tuple], pad_size: Optional[Tuple[int, int]] = None):
    """(images [B,3,Hp,Wp], pixel_mask [B,Hp,Wp] True on padding, targets). Images sit in the top-left corner.

    Hp×Wp is the batch maximum, or `pad_size` when given (grown to the batch maximum should an image exceed it).
    """
    images, targets = zip(*batch)
    hp = max(img.shape[1] for img in images)
    wp = max(img.shape[2] for img in images)
    if pad_size is not None:
        hp, wp = max(hp, pad_size[0]), max(wp, pad_size[1])
    padded = images[0].new_zeros((len(images), 3, hp, wp))
    mask = torch.ones((len(images), hp, wp), dtype=torch.bool)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return padded, mask, list(targets)


class EpochShuffleSampler(Sampler[int]):
    """A seeded shuffle per epoch that also tells the dataset the epoch (Lightning calls set_epoch each epoch)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.dataset)


def build_dataloader(
    cfg: ExperimentConfig,
    split: str,
    *,
    tokenizer=None,
    shuffle: Optional[bool] = None,
    sampler: Optional[Sampler] = None,
    train: Optional[bool] = None,
    input_size: Optional[Tuple[int, int]] = None,
    batch_size: Optional[int] = None,
) -> DataLoader:
    """DataLoader over build_dataset(cfg, split): dataset.batch_size (or `batch_size`), dataset.workers, padding
    per dataset.augmentation.fixed_padding. Training shuffles by default with EpochShuffleSampler.

    Under DDP Lightning swaps in its own sampler, so the training loop calls dataset.set_epoch(epoch) itself.
    """
    dataset = build_dataset(cfg, split, tokenizer=tokenizer, train=train, input_size=input_size)
    shuffle = split == "train" if shuffle is None else shuffle
    if sampler is None and shuffle:
        sampler = EpochShuffleSampler(dataset, cfg.train.seed)
    workers = cfg.dataset.workers
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.dataset.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate_fn, pad_size=dataset.pad_size),
        pin_memory=cfg.dataset.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0 and split == "train",
    )
