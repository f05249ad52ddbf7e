"""COCO detection JSON: images, annotations (bbox [x, y, width, height]) and categories."""
from __future__ import annotations

from typing import Any, Dict, List

from .captions import normalize_name
from .files import FormatError, is_box, load_json

LISTS = ("images", "annotations", "categories")


def read_coco(path: Any) -> Dict[str, Any]:
    """The file, fully checked: load_coco, coco_categories and check_coco."""
    data = load_coco(path)
    coco_categories(data, path)
    check_coco(data, path)
    return data


def load_coco(path: Any) -> Dict[str, Any]:
    """The file with its three lists present; their entries are not checked yet."""
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in LISTS):
        raise FormatError(path, "a COCO file needs 'images', 'annotations' and 'categories' lists")
    return data


def coco_categories(data: Dict[str, Any], path: Any) -> List[Dict[str, Any]]:
    """The categories in id order, each with an integer 'id' (no repeats) and a non-empty 'name'."""
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str) \
                or not normalize_name(cat["name"]):
            raise FormatError(path, "needs an integer 'id' and a non-empty 'name'", section="categories", index=i)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise FormatError(path, f"category ids repeat: {ids}")
    return categories


def check_coco(data: Dict[str, Any], path: Any) -> None:
    """Images (the four keys, unique ids) and annotations (the three keys, a 4-number bbox, known image and
    category ids) of a file whose categories coco_categories accepted."""
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
            raise FormatError(path, "needs 'id', 'file_name', 'width' and 'height'", section="images", index=i)
        if img["id"] in image_ids:
            raise FormatError(path, f"image id {img['id']} appears twice", section="images", index=i)
        image_ids.add(img["id"])
    category_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        def fail(problem: str):
            raise FormatError(path, problem, section="annotations", index=i,
                              entry_id=ann.get("id") if isinstance(ann, dict) else None)

        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            fail("needs 'image_id', 'category_id' and 'bbox'")
        if not is_box(ann["bbox"]):
            fail(f"bbox must be 4 numbers [x, y, width, height], got {ann['bbox']!r}")
        if ann["image_id"] not in image_ids:
            fail(f"image id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in category_ids:
            fail(f"category id {ann['category_id']!r} is not in 'categories'")
