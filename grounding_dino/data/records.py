"""Annotation records and the two ways to hold them (dataset.dataset_type).

A record is one image: {"file", "height", "width", "image_id", "where", "boxes" float32 [N,4] absolute xyxy,
"labels" int64 [N], "phrases" list[str] or None, "source" int}. `labels` index `phrases` when the record carries
its own phrases (grounding) and the source's vocabulary otherwise (detection, COCO).

`default` keeps a Python list. `serialized` pickles every record into one numpy byte buffer: forked data-loader
workers only read it, so the reference counting that touches every Python object never copies the pages.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, List, Sequence

import numpy as np

Record = Dict[str, Any]


class SerializedRecords(Sequence):
    def __init__(self, records: List[Record]):
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[index])]))


STORAGE = {"default": list, "serialized": SerializedRecords}


def store_records(records: List[Record], dataset_type: str) -> Sequence[Record]:
    if dataset_type not in STORAGE:
        raise ValueError(f"dataset.dataset_type must be one of {sorted(STORAGE)}, got {dataset_type!r}")
    return STORAGE[dataset_type](records)
