"""ODVG JSONL: one image per line, detection (labels + label map) or grounding (phrases per region)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .captions import normalize_name
from .errors import BoxAudit, DataError
from .records import Record


def read_label_map(path: str, key: str) -> Dict[int, str]:
    """{"0": "person", "1": "car"} → {0: "person", 1: "car"} (names normalised)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{key}.label_map: file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{key}.label_map: file {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{key}.label_map: file {path} must be a non-empty JSON object {{\"0\": \"name\", ...}}")
    label_map = {}
    for label, name in raw.items():
        if not str(label).lstrip("-").isdigit():
            raise DataError(f"{key}.label_map: file {path}: key {label!r} is not an integer label")
        if not isinstance(name, str) or not normalize_name(name):
            raise DataError(f"{key}.label_map: file {path}: label {label} needs a non-empty name, got {name!r}")
        label_map[int(label)] = normalize_name(name)
    return label_map


def read_odvg(
    json_file: str, image_dir: str, label_map: Optional[Dict[int, str]], audit: BoxAudit, key: str, source: int
) -> Tuple[List[Record], Optional[List[str]]]:
    """Records of one ODVG file and its vocabulary (label-map names by label order; None for grounding only).

    Detection labels are stored as indexes into that vocabulary.
    """
    labels = sorted(label_map) if label_map else []
    vocabulary = [label_map[label] for label in labels] if label_map else None
    index_of = {label: i for i, label in enumerate(labels)}
    records: List[Record] = []
    missing: List[str] = []
    with open(json_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"file {json_file} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            record = _header(obj, where, image_dir, default_id=len(records), source=source)
            if "detection" in obj:
                if label_map is None:
                    raise DataError(
                        f"{where}: detection records need a label map; set {key}.label_map to the "
                        "<name>_odvg_labelmap.json file"
                    )
                boxes, box_labels = _detection(obj["detection"], record, index_of, audit, where)
                record["phrases"] = None
            elif "grounding" in obj:
                boxes, box_labels, record["phrases"] = _grounding(obj["grounding"], record, audit, where)
            else:
                raise DataError(f"{where}: record has neither 'detection' nor 'grounding'")
            record["boxes"] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            record["labels"] = np.asarray(box_labels, dtype=np.int64)
            if not os.path.isfile(record["file"]):
                missing.append(f"{record['file']} ({where})")
            records.append(record)
    raise_missing(missing, image_dir)
    return records, vocabulary


def _header(obj: Dict[str, Any], where: str, image_dir: str, default_id: int, source: int) -> Record:
    file_name = obj.get("file_name", obj.get("filename"))
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: missing 'file_name' (image path relative to image_dir)")
    size = {}
    for name in ("height", "width"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{where}: '{name}' must be a positive integer, got {value!r}")
        size[name] = value
    image_id = obj.get("image_id", default_id)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise DataError(f"{where}: 'image_id' must be an integer, got {image_id!r}")
    return {"file": os.path.join(image_dir, file_name), "image_id": image_id, "where": where, "source": source,
            **size}


def _detection(det: Any, record: Record, index_of: Dict[int, int], audit: BoxAudit, where: str):
    instances = det.get("instances") if isinstance(det, dict) else None
    if not isinstance(instances, list):
        raise DataError(f"{where}: 'detection' must be an object with an 'instances' list")
    boxes, labels = [], []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or "bbox" not in inst or "label" not in inst:
            raise DataError(f"{where}: detection.instances[{i}] needs 'bbox' and 'label'")
        label = inst["label"]
        if not isinstance(label, int) or label not in index_of:
            raise DataError(
                f"{where}: detection.instances[{i}].label {label!r} is not in the label map "
                f"(labels {min(index_of)}..{max(index_of)})"
            )
        box = audit.clean(inst["bbox"], record["width"], record["height"], where)
        if box is not None:
            boxes.append(box)
            labels.append(index_of[label])
    return boxes, labels


def _grounding(grounding: Any, record: Record, audit: BoxAudit, where: str):
    regions = grounding.get("regions") if isinstance(grounding, dict) else None
    if not isinstance(regions, list):
        raise DataError(f"{where}: 'grounding' must be an object with a 'regions' list")
    boxes, labels, phrases = [], [], []
    for i, region in enumerate(regions):
        if not isinstance(region, dict) or "bbox" not in region:
            raise DataError(f"{where}: grounding.regions[{i}] needs 'bbox' and 'phrase'")
        phrase = region.get("phrase")
        if not isinstance(phrase, str) or not normalize_name(phrase):
            raise DataError(f"{where}: grounding.regions[{i}].phrase must be a non-empty string, got {phrase!r}")
        box = audit.clean(region["bbox"], record["width"], record["height"], where)
        if box is None:
            continue
        phrase = normalize_name(phrase)
        if phrase not in phrases:
            phrases.append(phrase)
        boxes.append(box)
        labels.append(phrases.index(phrase))
    return boxes, labels, phrases


def raise_missing(missing: List[str], image_dir: str) -> None:
    if missing:
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} image(s) not found under image_dir {image_dir}: {shown}")
