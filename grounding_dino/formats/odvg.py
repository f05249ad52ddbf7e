"""ODVG: JSON lines, one image per line, either detection (integer labels named by a label map) or grounding
(a phrase per region); and the label map, {"0": "person", "1": "car"}.

Every problem is a FormatError with the line, the JSON path inside it (`detection.instances[0].bbox`), what was
found and what is expected.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from .captions import normalize_name
from .files import MAX_COORDINATE, FormatError, found, found_key, is_box, is_int, is_side, json_lines, load_json

KINDS = (("detection", "instances", "label"), ("grounding", "regions", "phrase"))
BOX = f"4 finite numbers [x1, y1, x2, y2] (each at most {MAX_COORDINATE:g} in size)"
# ASCII digits only: str.isdigit() accepts "²", which int() refuses, and int() accepts "١" (Arabic-Indic one).
_LABEL = re.compile(r"-?[0-9]+")


@dataclass
class OdvgRecord:
    """One checked ODVG line. Every region has a 'bbox' of 4 numbers [x1, y1, x2, y2] (not yet clamped to the
    image) and, for detection, an integer 'label' or, for grounding, a non-empty string 'phrase'."""

    line: int
    file_name: str
    height: int
    width: int
    image_id: Optional[int]  # None when the line has none
    kind: str  # "detection" or "grounding"
    regions: List[Dict[str, Any]]


def read_odvg(path: Any) -> Iterator[OdvgRecord]:
    """The checked records of an ODVG file, in line order (blank lines skipped)."""
    for lineno, obj in json_lines(path):
        yield parse_odvg(obj, path, lineno)


def parse_odvg(obj: Any, path: Any, line: int) -> OdvgRecord:
    def fail(problem: str, field: Optional[str] = None):
        raise FormatError(path, problem, line=line, field=field)

    if not isinstance(obj, dict):
        fail(found(obj, "a JSON object (one image per line)"))
    name_key = "file_name" if "file_name" in obj or "filename" not in obj else "filename"
    file_name = obj.get(name_key)
    if not isinstance(file_name, str) or not file_name:
        fail(found_key(obj, name_key, "the image's path relative to image_dir"), name_key)
    for side in ("height", "width"):
        if not is_side(obj.get(side)):
            fail(found_key(obj, side, "a positive integer (pixels)"), side)
    image_id = obj.get("image_id")
    if image_id is not None and not is_int(image_id):
        fail(found(image_id, "an integer"), "image_id")
    for kind, key, needs in KINDS:
        if kind in obj:
            break
    else:
        fail("missing 'detection' and 'grounding'; expected one of them (an object holding the 'instances' or "
             "'regions' list)")
    regions = obj[kind].get(key) if isinstance(obj[kind], dict) else None
    if not isinstance(regions, list):
        where, value = (f"{kind}.{key}", obj[kind][key]) if isinstance(obj[kind], dict) and key in obj[kind] \
            else (kind, obj[kind])
        fail(found(value, f"an object holding the '{key}' list" if where == kind else "a list"), where)
    for i, region in enumerate(regions):
        at = f"{kind}.{key}[{i}]"
        if not isinstance(region, dict):
            fail(found(region, f"an object with 'bbox' and '{needs}'"), at)
        if not is_box(region.get("bbox")):
            fail(found_key(region, "bbox", BOX), f"{at}.bbox")
        if kind == "detection" and not is_int(region.get("label")):
            fail(found_key(region, "label", "an integer label of the label map"), f"{at}.label")
        if kind == "grounding" and not (isinstance(region.get("phrase"), str) and normalize_name(region["phrase"])):
            fail(found_key(region, "phrase", "a non-empty string"), f"{at}.phrase")
    return OdvgRecord(line, file_name, obj["height"], obj["width"], image_id, kind, regions)


def read_label_map(path: Any) -> Dict[int, str]:
    """{label: name} in file order, names as written (checked to be non-empty once normalised)."""
    raw = load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise FormatError(path, found(raw, "a non-empty JSON object {\"0\": \"name\", \"1\": \"name\", ...}"))
    label_map: Dict[int, str] = {}
    first_key: Dict[int, str] = {}
    for key, name in raw.items():
        if len(key) > 20 or not _LABEL.fullmatch(key) or not is_int(int(key)):  # int() refuses 4,300+ digits
            raise FormatError(path, found(key, "an integer label written in ASCII digits, e.g. \"0\""),
                              field=f"[{json.dumps(key, ensure_ascii=False)}]")
        label = int(key)
        if label in first_key:
            raise FormatError(path, f"keys {first_key[label]!r} and {key!r} are both label {label}; expected each "
                                    "label once", field=f"[{json.dumps(key, ensure_ascii=False)}]")
        if not isinstance(name, str) or not normalize_name(name):
            raise FormatError(path, found(name, "a non-empty name"), field=f"[{json.dumps(key, ensure_ascii=False)}]")
        first_key[label] = key
        label_map[label] = name
    return label_map
