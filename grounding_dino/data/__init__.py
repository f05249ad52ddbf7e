"""Data pipeline: ODVG/COCO sources as records, captions, augmentation, batching, and the synthetic shapes set.

The file formats themselves are read by grounding_dino.formats, which the SDK shares.

`DataError`, `DataWarning`, `build_caption` and the synthetic generator import without torch; the dataset and
loader names load torch on first use.
"""
from __future__ import annotations

import importlib

from ..formats import build_caption
from .errors import DataError, DataWarning

_LAZY = {
    "build_dataset": ".build",
    "GroundingDataset": ".dataset",
    "collate_fn": ".loader",
    "build_dataloader": ".loader",
}

__all__ = ["DataError", "DataWarning", "build_caption", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
