"""COCO sources as records: a training source (names from its categories) and the val/test/calibration format.

grounding_dino.formats reads and checks the file (the reader preflight and `skillbank data` use too); this module
adds what training and evaluation need on top: some categories, 0..N-1 ids for evaluation, existing images.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from ..formats import FormatError, check_coco, coco_categories, load_coco, normalize_name
from .errors import BoxAudit, DataError
from .odvg import raise_missing
from .records import Record


def coco_records(
    json_file: str, image_dir: str, audit: BoxAudit, source: int, contiguous_ids: bool
) -> Tuple[List[Record], List[str]]:
    """Records (labels = position of the category in id order) and the category names in id order.

    `contiguous_ids` requires ids 0..N-1, which val/test/calibration need: predicted labels index the category
    list and COCO evaluation matches them by id.
    """
    try:
        data = load_coco(json_file)
        categories = coco_categories(data, json_file)
        _check_ids([c["id"] for c in categories], json_file, contiguous_ids)  # the fix when ids are off
        check_coco(data, json_file)
    except FormatError as e:
        raise DataError(_message(e)) from None
    index_of = {cat["id"]: i for i, cat in enumerate(categories)}
    names = [normalize_name(cat["name"]) for cat in categories]

    records: Dict[int, Record] = {}
    boxes: Dict[int, list] = {}
    labels: Dict[int, list] = {}
    missing: List[str] = []
    for img in data["images"]:
        path = os.path.join(image_dir, img["file_name"])
        if not os.path.isfile(path):
            missing.append(f"{path} (image id {img['id']})")
        records[img["id"]] = {"file": path, "height": int(img["height"]), "width": int(img["width"]),
                              "image_id": img["id"], "where": f"file {json_file} image id {img['id']}",
                              "phrases": None, "source": source}
        boxes[img["id"]], labels[img["id"]] = [], []
    raise_missing(missing, image_dir)

    for i, ann in enumerate(data["annotations"]):
        if ann.get("iscrowd", 0):
            continue  # crowd regions are neither matched nor penalised; COCO evaluation reads them from coco_gt
        record = records[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        where = f"file {json_file} annotation id {ann.get('id', f'#{i}')} (image id {ann['image_id']})"
        clean = audit.clean((x, y, x + w, y + h), record["width"], record["height"], where)
        if clean is not None:
            boxes[ann["image_id"]].append(clean)
            labels[ann["image_id"]].append(index_of[ann["category_id"]])

    for image_id, record in records.items():
        record["boxes"] = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
        record["labels"] = np.asarray(labels[image_id], dtype=np.int64)
    return list(records.values()), names


def _message(error: FormatError) -> str:
    if error.section == "annotations":  # annotations are named by id, as the box summary names them
        entry = error.entry_id if error.entry_id is not None else f"#{error.index}"
        return f"file {error.path} annotation id {entry} ({error.json_path}): {error.problem}"
    return f"file {error}"


def _check_ids(ids: List[int], json_file: str, contiguous_ids: bool) -> None:
    if not ids:
        raise DataError(f"file {json_file}: 'categories' is empty")
    if contiguous_ids and ids != list(range(len(ids))):
        raise DataError(
            f"file {json_file}: category ids must be 0-based and contiguous (0..{len(ids) - 1}) for val/test/"
            f"calibration, got {_short(ids)}; renumber them in 'categories' and 'annotations'"
        )


def _short(ids: List[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:8]))}, ...]"
