"""COCO JSON: training source (names from its categories) and the val/test/calibration format."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np

from .captions import normalize_name
from .errors import BoxAudit, DataError
from .odvg import raise_missing
from .records import Record


def read_coco(
    json_file: str, image_dir: str, audit: BoxAudit, source: int, contiguous_ids: bool
) -> Tuple[List[Record], List[str]]:
    """Records (labels = position of the category in id order) and the category names in id order.

    `contiguous_ids` requires ids 0..N-1, which val/test/calibration need: predicted labels index the category
    list and COCO evaluation matches them by id.
    """
    data = _load(json_file)
    categories = _categories(data, json_file, contiguous_ids)
    index_of = {cat["id"]: i for i, cat in enumerate(categories)}
    names = [normalize_name(cat["name"]) for cat in categories]

    records: Dict[int, Record] = {}
    boxes: Dict[int, list] = {}
    labels: Dict[int, list] = {}
    missing: List[str] = []
    for i, img in enumerate(data["images"]):
        where = f"file {json_file} images[{i}]"
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
            raise DataError(f"{where}: needs 'id', 'file_name', 'width' and 'height'")
        if img["id"] in records:
            raise DataError(f"{where}: image id {img['id']} appears twice")
        path = os.path.join(image_dir, img["file_name"])
        if not os.path.isfile(path):
            missing.append(f"{path} (image id {img['id']})")
        records[img["id"]] = {"file": path, "height": int(img["height"]), "width": int(img["width"]),
                              "image_id": img["id"], "where": f"file {json_file} image id {img['id']}",
                              "phrases": None, "source": source}
        boxes[img["id"]], labels[img["id"]] = [], []
    raise_missing(missing, image_dir)

    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"file {json_file} annotation id {ann_id}"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise DataError(f"{where}: needs 'image_id', 'category_id' and 'bbox'")
        if ann["image_id"] not in records:
            raise DataError(f"{where}: image id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in index_of:
            raise DataError(f"{where}: category id {ann['category_id']!r} is not in 'categories'")
        if ann.get("iscrowd", 0):
            continue  # crowd regions are neither matched nor penalised; COCO evaluation reads them from coco_gt
        record = records[ann["image_id"]]
        box = ann["bbox"]
        if not _four_numbers(box):
            raise DataError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {box!r}")
        xyxy = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
        clean = audit.clean(xyxy, record["width"], record["height"], f"{where} (image id {ann['image_id']})")
        if clean is not None:
            boxes[ann["image_id"]].append(clean)
            labels[ann["image_id"]].append(index_of[ann["category_id"]])

    for image_id, record in records.items():
        record["boxes"] = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
        record["labels"] = np.asarray(labels[image_id], dtype=np.int64)
    return list(records.values()), names


def _load(json_file: str) -> Dict[str, Any]:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"file {json_file} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise DataError(f"file {json_file}: a COCO file needs 'images', 'annotations' and 'categories' lists")
    return data


def _categories(data: Dict[str, Any], json_file: str, contiguous_ids: bool) -> List[Dict[str, Any]]:
    categories = data["categories"]
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str) \
                or not normalize_name(cat["name"]):
            raise DataError(f"file {json_file} categories[{i}]: needs an integer 'id' and a non-empty 'name'")
    if not categories:
        raise DataError(f"file {json_file}: 'categories' is empty")
    categories = sorted(categories, key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise DataError(f"file {json_file}: category ids repeat: {ids}")
    if contiguous_ids and ids != list(range(len(ids))):
        raise DataError(
            f"file {json_file}: category ids must be 0-based and contiguous (0..{len(ids) - 1}) for val/test/"
            f"calibration, got {_short(ids)}; renumber them in 'categories' and 'annotations'"
        )
    return categories


def _four_numbers(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and v == v for v in box)


def _short(ids: List[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:8]))}, ...]"
