"""Dataset conversions (pure Python): COCO <-> ODVG and contiguous category ids.

* `coco_to_odvg`: a COCO file -> `<name>_odvg.jsonl` (detection records, boxes x1y1x2y2, labels 0..N-1 in category id
  order) and `<name>_odvg_labelmap.json` ({"0": name, ...}). Crowd annotations are left out (ODVG has no crowd flag).
* `odvg_to_coco`: ODVG (detection with a label map, or grounding) -> COCO. Detection labels become category ids;
  grounding phrases become categories in order of first appearance, after the label-map names.
* `make_contiguous`: category ids renumbered 0..N-1 in id order, annotations rewritten, plus the old -> new map
  (val/test/calibration sets need 0-based contiguous ids).

`skillbank data coco2odvg|odvg2coco|contiguous` (runner/data_cli.py) calls these.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from grounding_dino.formats import normalize_name, read_coco, read_label_map, read_odvg
from sdk.data_files import DataToolError, PathLike, detection_label, reading


def _write_json(path: Path, data: Any, lines: bool = False) -> Path:
    # Serialised before the file is opened: a value JSON cannot hold stops the tool before it writes half a file.
    try:
        if lines:
            text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in data)
        else:
            text = json.dumps(data, ensure_ascii=False, indent=1, allow_nan=False) + "\n"
    except ValueError:
        raise DataToolError(f"cannot write {path}: the input holds NaN or Infinity in a field copied as it is (an id "
                            "or an extra key), which JSON does not allow; replace it with a number or null") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def coco_to_odvg(coco_file: PathLike, out_dir: Optional[PathLike] = None,
                 name: Optional[str] = None) -> Tuple[Path, Path]:
    """Write `<name>_odvg.jsonl` and `<name>_odvg_labelmap.json` (name: the COCO file's stem; out_dir: its folder).

    Returns (jsonl path, label map path)."""
    coco_file = Path(coco_file)
    with reading(coco_file):
        data = read_coco(coco_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    instances: Dict[Any, List[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        label = label_of[ann["category_id"]]
        instances[ann["image_id"]].append({"bbox": [x, y, x + w, y + h], "label": label,
                                           "category": categories[label]["name"]})
    records = [{"file_name": img["file_name"], "height": img["height"], "width": img["width"],
                "image_id": img["id"], "detection": {"instances": instances[img["id"]]}} for img in data["images"]]
    folder = Path(out_dir) if out_dir is not None else coco_file.parent
    name = name or coco_file.stem
    label_map = {str(i): c["name"] for i, c in enumerate(categories)}
    return (_write_json(folder / f"{name}_odvg.jsonl", records, lines=True),
            _write_json(folder / f"{name}_odvg_labelmap.json", label_map))


def odvg_to_coco(odvg_file: PathLike, label_map: Optional[PathLike] = None,
                 out_file: Optional[PathLike] = None) -> Path:
    """Write a COCO file (default `<odvg stem>_coco.json` beside the input). Detection records need `label_map`
    or a 'category' name on every instance; grounding phrases become categories after the label-map names."""
    odvg_file = Path(odvg_file)
    names: Dict[int, str] = {}
    if label_map:
        with reading(label_map):
            names = dict(sorted(read_label_map(label_map).items()))
    from_map = bool(names)
    phrase_ids: Dict[str, int] = {}
    images, annotations = [], []
    with reading(odvg_file):
        for record in read_odvg(odvg_file):
            where = f"{odvg_file} line {record.line}"
            image_id = len(images) if record.image_id is None else record.image_id
            images.append({"id": image_id, "file_name": record.file_name, "height": record.height,
                           "width": record.width})
            for i, region in enumerate(record.regions):
                if record.kind == "detection":
                    category = detection_label(region, names, from_map, f"{where} detection.instances[{i}]")
                else:
                    phrase = normalize_name(region["phrase"])
                    phrase_ids.setdefault(phrase, len(phrase_ids))
                    category = ("phrase", phrase)
                x1, y1, x2, y2 = region["bbox"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if len({img["id"] for img in images}) != len(images):
        raise DataToolError(f"{odvg_file}: image_id values repeat; give every record a unique image_id")
    # Grounding phrases that are not label-map names get ids after the largest label.
    by_name = {normalize_name(n): label for label, n in names.items()}
    next_id = max(names, default=-1) + 1
    for phrase in phrase_ids:
        if phrase not in by_name:
            by_name[phrase] = next_id
            names[next_id] = phrase
            next_id += 1
    for ann in annotations:
        if isinstance(ann["category_id"], tuple):
            ann["category_id"] = by_name[ann["category_id"][1]]
    categories = [{"id": label, "name": name} for label, name in sorted(names.items())]
    out = Path(out_file) if out_file is not None else odvg_file.with_name(f"{odvg_file.stem}_coco.json")
    return _write_json(out, {"images": images, "annotations": annotations, "categories": categories})


def make_contiguous(coco_file: PathLike, out_file: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """Renumber category ids 0..N-1 in id order and rewrite the annotations. Writes the new COCO file (default
    `<stem>_contiguous.json`) and `<its stem>_category_map.json` ({"old id": new id}); returns both paths."""
    coco_file = Path(coco_file)
    with reading(coco_file):
        data = read_coco(coco_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    new_id = {c["id"]: i for i, c in enumerate(categories)}
    data["categories"] = [dict(c, id=new_id[c["id"]]) for c in categories]
    data["annotations"] = [dict(a, category_id=new_id[a["category_id"]]) for a in data["annotations"]]
    out = Path(out_file) if out_file is not None else coco_file.with_name(f"{coco_file.stem}_contiguous.json")
    mapping = {str(old): new for old, new in new_id.items()}
    return _write_json(out, data), _write_json(out.with_name(f"{out.stem}_category_map.json"), mapping)
