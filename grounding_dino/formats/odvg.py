"""ODVG: JSON lines, one image per line, either detection (integer labels named by a label map) or grounding
(a phrase per region); and the label map, {"0": "person", "1": "car"}."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from .captions import normalize_name
from .files import FormatError, is_box, json_lines, load_json

KINDS = (("detection", "instances", "label"), ("grounding", "regions", "phrase"))


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
    def fail(problem: str):
        raise FormatError(path, problem, line=line)

    if not isinstance(obj, dict):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    file_name = obj.get("file_name", obj.get("filename"))
    if not isinstance(file_name, str) or not file_name:
        fail("missing 'file_name' (image path relative to image_dir)")
    size = {}
    for name in ("height", "width"):
        value = obj.get(name)
        if not _is_int(value) or value <= 0:
            fail(f"'{name}' must be a positive integer, got {value!r}")
        size[name] = value
    image_id = obj.get("image_id")
    if image_id is not None and not _is_int(image_id):
        fail(f"'image_id' must be an integer, got {image_id!r}")
    for kind, key, needs in KINDS:
        if kind in obj:
            break
    else:
        fail("record has neither 'detection' nor 'grounding'")
    regions = obj[kind].get(key) if isinstance(obj[kind], dict) else None
    if not isinstance(regions, list):
        fail(f"'{kind}' must be an object holding the '{key}' list")
    for i, region in enumerate(regions):
        at = f"{kind}.{key}[{i}]"
        if not isinstance(region, dict) or "bbox" not in region or needs not in region:
            fail(f"{at} needs 'bbox' and '{needs}'")
        if not is_box(region["bbox"]):
            fail(f"{at}.bbox must be 4 numbers [x1, y1, x2, y2], got {region['bbox']!r}")
        if kind == "detection" and not _is_int(region["label"]):
            fail(f"{at}.label must be an integer, got {region['label']!r}")
        if kind == "grounding" and not (isinstance(region["phrase"], str) and normalize_name(region["phrase"])):
            fail(f"{at}.phrase must be a non-empty string, got {region['phrase']!r}")
    return OdvgRecord(line, file_name, size["height"], size["width"], image_id, kind, regions)


def read_label_map(path: Any) -> Dict[int, str]:
    """{label: name} in file order, names as written (checked to be non-empty once normalised)."""
    raw = load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise FormatError(path, "must be a non-empty JSON object {\"0\": \"name\", ...}")
    label_map = {}
    for label, name in raw.items():
        if not str(label).lstrip("-").isdigit():
            raise FormatError(path, f"key {label!r} is not an integer label")
        if not isinstance(name, str) or not normalize_name(name):
            raise FormatError(path, f"label {label} needs a non-empty name, got {name!r}")
        label_map[int(label)] = name
    return label_map


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
