"""ODVG sources as records: detection (labels + label map) or grounding (phrases per region).

The lines are parsed and checked by grounding_dino.formats (the reader preflight and `skillbank data` use too);
this module turns them into records, clamps their boxes and says which images are missing.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..formats import FormatError, normalize_name, read_label_map, read_odvg
from .errors import BoxAudit, DataError
from .records import Record


def label_names(path: str, key: str) -> Dict[int, str]:
    """{"0": "person", "1": "car"} → {0: "person", 1: "car"} (names normalised)."""
    try:
        return {label: normalize_name(name) for label, name in read_label_map(path).items()}
    except FileNotFoundError:
        raise DataError(f"{key}.label_map: file {path} does not exist") from None
    except FormatError as e:
        raise DataError(f"{key}.label_map: file {e}") from None


def odvg_records(
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
    try:
        for line in read_odvg(json_file):
            where = f"file {json_file} line {line.line}"
            if line.kind == "detection" and label_map is None:
                raise DataError(
                    f"{where}: detection records need a label map; set {key}.label_map to the "
                    "<name>_odvg_labelmap.json file"
                )
            record = {"file": os.path.join(image_dir, line.file_name), "where": where, "source": source,
                      "image_id": len(records) if line.image_id is None else line.image_id,
                      "height": line.height, "width": line.width}
            boxes, box_labels, phrases = [], [], []
            for i, region in enumerate(line.regions):
                if line.kind == "detection" and region["label"] not in index_of:
                    raise DataError(
                        f"{where}: detection.instances[{i}].label {region['label']!r} is not in the label map "
                        f"(labels {min(index_of)}..{max(index_of)})"
                    )
                box = audit.clean(region["bbox"], line.width, line.height, where)
                if box is None:
                    continue
                boxes.append(box)
                if line.kind == "detection":
                    box_labels.append(index_of[region["label"]])
                    continue
                phrase = normalize_name(region["phrase"])
                if phrase not in phrases:
                    phrases.append(phrase)
                box_labels.append(phrases.index(phrase))
            record["phrases"] = phrases if line.kind == "grounding" else None
            record["boxes"] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            record["labels"] = np.asarray(box_labels, dtype=np.int64)
            if not os.path.isfile(record["file"]):
                missing.append(f"{record['file']} ({where})")
            records.append(record)
    except FormatError as e:
        raise DataError(f"file {e}") from None
    raise_missing(missing, image_dir)
    return records, vocabulary


def raise_missing(missing: List[str], image_dir: str) -> None:
    if missing:
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} image(s) not found under image_dir {image_dir}: {shown}")
