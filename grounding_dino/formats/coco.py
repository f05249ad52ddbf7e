"""COCO detection JSON: images, annotations (bbox [x, y, width, height]) and categories.

Every problem is a FormatError with the JSON path (`annotations[3].category_id`), what was found and what is
expected; entries are checked field by field before anything hashes, sorts or indexes them.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .captions import normalize_name
from .files import MAX_COORDINATE, FormatError, found, found_key, is_box, is_int, is_side, load_json

LISTS = ("images", "annotations", "categories")
BOX = f"4 finite numbers [x, y, width, height] (each at most {MAX_COORDINATE:g} in size)"


def read_coco(path: Any) -> Dict[str, Any]:
    """The file, fully checked: load_coco, coco_categories and check_coco."""
    data = load_coco(path)
    coco_categories(data, path)
    check_coco(data, path)
    return data


def load_coco(path: Any) -> Dict[str, Any]:
    """The file with its three lists present; their entries are not checked yet."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise FormatError(path, found(data, "a COCO object with 'images', 'annotations' and 'categories' lists"))
    for key in LISTS:
        if not isinstance(data.get(key), list):
            what = found(data[key], "a list") if key in data else "missing; expected a list"
            raise FormatError(path, f"{what} (a COCO file needs 'images', 'annotations' and 'categories')",
                              section=key)
    return data


def coco_categories(data: Dict[str, Any], path: Any) -> List[Dict[str, Any]]:
    """The categories in id order, each with an integer 'id' (no repeats) and a non-empty 'name'."""
    for i, cat in enumerate(data["categories"]):
        def fail(problem: str, field=None):
            raise FormatError(path, problem, section="categories", index=i, field=field)

        if not isinstance(cat, dict):
            fail(found(cat, "an object {\"id\": integer, \"name\": string}"))
        if not is_int(cat.get("id")):
            fail(found_key(cat, "id", "an integer"), "id")
        if not isinstance(cat.get("name"), str) or not normalize_name(cat["name"]):
            fail(found_key(cat, "name", "a non-empty string"), "name")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise FormatError(path, f"category ids repeat: {repeated[:10]}; expected each id once", section="categories")
    return categories


def check_coco(data: Dict[str, Any], path: Any) -> None:
    """Images (the four keys, unique integer ids, positive integer sizes) and annotations (integer image and category
    ids that exist, a bbox of 4 finite numbers, optional numeric area and 0/1 iscrowd) of a file whose categories
    coco_categories accepted."""
    image_ids = set()
    for i, img in enumerate(data["images"]):
        def bad_image(problem: str, field=None):
            raise FormatError(path, problem, section="images", index=i, field=field)

        if not isinstance(img, dict):
            bad_image(found(img, "an object with 'id', 'file_name', 'width' and 'height'"))
        if not is_int(img.get("id")):
            bad_image(found_key(img, "id", "an integer"), "id")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            bad_image(found_key(img, "file_name", "the image's path relative to image_dir"), "file_name")
        for side in ("width", "height"):
            if not is_side(img.get(side)):
                bad_image(found_key(img, side, "a positive integer (pixels)"), side)
        if img["id"] in image_ids:
            bad_image(f"image id {img['id']} appears twice; expected each id once", "id")
        image_ids.add(img["id"])
    category_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        def bad(problem: str, field=None):
            raise FormatError(path, problem, section="annotations", index=i, field=field,
                              entry_id=ann["id"] if isinstance(ann, dict) and is_int(ann.get("id")) else None)

        if not isinstance(ann, dict):
            bad(found(ann, "an object with 'image_id', 'category_id' and 'bbox'"))
        if not is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            bad(found_key(ann, "image_id", "the id of an image in 'images'"), "image_id")
        if not is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            shown = sorted(category_ids)[:10]
            bad(found_key(ann, "category_id", f"the id of a category in 'categories' ({shown}"
                                               f"{'...' if len(category_ids) > 10 else ''})"), "category_id")
        if not is_box(ann.get("bbox")):
            bad(found_key(ann, "bbox", BOX) + _bad_box_count(data["annotations"]), "bbox")
        if "area" in ann and not _is_area(ann["area"]):
            bad(found(ann["area"], "a finite number (pixels)"), "area")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):  # True and False compare equal to 1 and 0
            bad(found(ann["iscrowd"], "0 or 1"), "iscrowd")


def _is_area(value: Any) -> bool:
    # An area is a width times a height: up to MAX_COORDINATE squared.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_COORDINATE ** 2


def _bad_box_count(annotations: List[Any]) -> str:
    """How many annotations share the problem, so one fix covers them all (a converter that wrote NaN writes many)."""
    count = sum(1 for a in annotations if not (isinstance(a, dict) and is_box(a.get("bbox"))))
    return f"; {count} annotations have such a bbox, fix or remove them" if count > 1 else ""
