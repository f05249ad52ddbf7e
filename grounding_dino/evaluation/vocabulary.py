"""Open-vocabulary evaluation: the test categories split by what fine-tuning taught the model.

Users who fine-tune ask "did it forget what it knew?". A phrase scored on the test set is
- seen: fine-tuning trained on this very phrase;
- unseen_combination: every word of it was in fine-tuning, never in this combination ("red square" after "red
  circle" and "blue square"): the model must compose, not recall;
- unseen_word: it holds a word fine-tuning never showed: only the pretrained model's knowledge can find it.

A group's AP (AP50) is the mean of its categories' AP (AP50), the categories without ground truth left out, which is
what COCO's mAP is over all categories; so the three groups' categories together give the overall mAP.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set

from grounding_dino.formats.captions import normalize_name
from grounding_dino.formats.files import load_json
from grounding_dino.formats.odvg import read_label_map, read_odvg

GROUPS = ("seen", "unseen_combination", "unseen_word")
GROUP_TEXT = {"seen": "seen in fine-tuning", "unseen_combination": "words seen, never together",
              "unseen_word": "a word never seen"}
KEY = "evaluate.train_vocabulary"


class VocabularyError(ValueError):
    """A train_vocabulary file that names no phrase; the message says which and what to give instead."""


def words(phrase: str) -> List[str]:
    return re.findall(r"[^\W_]+", normalize_name(phrase))


def training_phrases(paths: Sequence[os.PathLike | str]) -> Set[str]:
    """The phrases fine-tuning trained on, normalised: label maps' names, COCO files' category names, grounding
    ODVG files' region phrases."""
    phrases: Set[str] = set()
    for path in paths:
        found = _phrases(Path(path))
        if not found:
            raise VocabularyError(
                f"{KEY}: {path} names no phrase. Fix: give the training label maps (*_labelmap.json), COCO "
                "files or grounding ODVG files; a detection ODVG file names its classes in its label map")
        phrases |= found
    return phrases


def _phrases(path: Path) -> Set[str]:
    if path.suffix == ".jsonl":
        return {normalize_name(region["phrase"]) for record in read_odvg(path) if record.kind == "grounding"
                for region in record.regions}
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        return {normalize_name(c["name"]) for c in data["categories"]
                if isinstance(c, dict) and isinstance(c.get("name"), str) and normalize_name(c["name"])}
    return {normalize_name(name) for name in read_label_map(path).values()}


def group_of(phrase: str, seen: Set[str], seen_words: Set[str]) -> str:
    if normalize_name(phrase) in seen:
        return "seen"
    return "unseen_combination" if set(words(phrase)) <= seen_words else "unseen_word"


def split(per_class: Iterable[Mapping[str, Any]], seen: Set[str]) -> Dict[str, Dict[str, Any]]:
    """{group: {"AP", "AP50", "categories": [names], "scored": n}} of per-class rows (CocoEvaluator.class_metrics);
    AP and AP50 are None when no category of the group has ground truth."""
    seen_words = {word for phrase in seen for word in words(phrase)}
    out = {group: {"categories": [], "AP": [], "AP50": []} for group in GROUPS}
    for row in per_class:
        group = out[group_of(row["name"], seen, seen_words)]
        group["categories"].append(row["name"])
        for metric in ("AP", "AP50"):
            if row[metric] is not None:
                group[metric].append(row[metric])
    return {name: {"AP": _mean(g["AP"]), "AP50": _mean(g["AP50"]), "categories": g["categories"],
                   "scored": len(g["AP"])} for name, g in out.items()}


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def metrics(groups: Mapping[str, Mapping[str, Any]]) -> tuple[Dict[str, Optional[float]], Dict[str, str]]:
    """Flat metrics for results.json and the KPIs (mAP_seen, mAP50_seen, ...) and why any is None."""
    values: Dict[str, Optional[float]] = {}
    reasons: Dict[str, str] = {}
    for name, group in groups.items():
        for metric, value in (("mAP", group["AP"]), ("mAP50", group["AP50"])):
            values[f"{metric}_{name}"] = value
            if value is None:
                reasons[f"{metric}_{name}"] = (f"no test category is {GROUP_TEXT[name]}" if not group["categories"]
                                               else f"no {GROUP_TEXT[name]} category has ground truth here")
    return values, reasons


def print_table(groups: Mapping[str, Mapping[str, Any]]) -> None:
    print(f"{'AP50':>8} {'AP':>7} {'classes':>8}  vocabulary (against {KEY})")
    for name, group in groups.items():
        ap50, ap = (f"{v:.4f}" if v is not None else "null" for v in (group["AP50"], group["AP"]))
        listed = ", ".join(group["categories"][:6]) + (", ..." if len(group["categories"]) > 6 else "")
        print(f"{ap50:>8} {ap:>7} {len(group['categories']):8d}  {GROUP_TEXT[name]}" + (f": {listed}" if listed
                                                                                          else ""))
