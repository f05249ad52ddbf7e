"""Auto-labelling: a folder of images labelled by a Detector, written as training data.

`autolabel(images, prompts, model, out)` writes into `out`:
  <name>_odvg.jsonl            detection ODVG, one line per image (images without detections too, as negatives),
                               file_name relative to the images folder, boxes [x1, y1, x2, y2] in pixels, each
                               box once, with its best-scoring phrase
  <name>_odvg_labelmap.json    {"0": phrase, ...}, the prompt's phrases in order
  <name>_coco.json             the same boxes as COCO ([x, y, w, h], each annotation with its "score")
The ODVG pair is a train data source as it stands (image_dir: the images folder, json_file, label_map); the COCO
file suits review tools and a val split. `skillbank data autolabel` is the command line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from tqdm import tqdm

from grounding_dino.actions.inference import IMAGE_EXTENSIONS
from grounding_dino.detector import Detector, prompt_phrases


def find_images(folder: Union[str, Path]) -> List[Path]:
    """The images below `folder` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def autolabel(images: Union[str, Path], prompts: Union[str, Sequence[str]], model: Union[str, Path],
              out: Union[str, Path], threshold: float = 0.3, name: str = "autolabel",
              spec: Union[None, str, Path, Dict[str, Any]] = None, detector: Optional[Detector] = None,
              **options: Any) -> Dict[str, Any]:
    """Label every image below `images` with the phrases of `prompts` (a list or "person, helmet") found by
    `model` (anything Detector.load takes; `spec` and `options` as there) at score >= `threshold`, and write the
    files named in the module docstring. Returns their paths ("odvg", "label_map", "coco") and counts ("images",
    "boxes", "per_phrase")."""
    phrases = prompt_phrases(prompts)
    paths = find_images(images)
    detector = detector or Detector.load(model, spec, threshold=threshold, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(images)
    odvg_lines, coco_images, annotations = [], [], []
    per_phrase = {phrase: 0 for phrase in phrases}
    step = detector.batch_size
    for start in tqdm(range(0, len(paths), step), desc="autolabel", unit="batch", dynamic_ncols=True):
        batch = paths[start:start + step]
        for image_id, (path, result) in enumerate(zip(batch, detector.predict(batch, phrases, threshold)), start):
            width, height = result.image_size
            file_name = path.relative_to(root).as_posix()
            # One query may score several phrases (post_process keeps (query, phrase) pairs); a training box needs
            # one label, so each box keeps its best phrase (results come best first).
            kept: Dict[tuple, tuple] = {}
            for box, label, score in zip(result.boxes.tolist(), result.labels.tolist(), result.scores.tolist()):
                kept.setdefault(tuple(round(v, 2) for v in box), (label, score))
            boxes = [list(box) for box in kept]
            labels = [label for label, _ in kept.values()]
            instances = [{"bbox": box, "label": label, "category": phrases[label]} for box, label in zip(boxes, labels)]
            odvg_lines.append({"file_name": file_name, "height": height, "width": width, "image_id": image_id,
                               "detection": {"instances": instances}})
            coco_images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for (x1, y1, x2, y2), (label, score) in zip(boxes, kept.values()):
                per_phrase[phrases[label]] += 1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                    "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                                    "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                                    "score": round(score, 4)})
    files = {"odvg": out / f"{name}_odvg.jsonl", "label_map": out / f"{name}_odvg_labelmap.json",
             "coco": out / f"{name}_coco.json"}
    files["odvg"].write_text("".join(json.dumps(line, allow_nan=False) + "\n" for line in odvg_lines))
    files["label_map"].write_text(json.dumps({str(i): p for i, p in enumerate(phrases)}, indent=1) + "\n")
    categories = [{"id": i, "name": phrase} for i, phrase in enumerate(phrases)]
    files["coco"].write_text(json.dumps({"images": coco_images, "annotations": annotations,
                                         "categories": categories}, allow_nan=False) + "\n")
    return {**files, "images": len(paths), "boxes": len(annotations), "per_phrase": per_phrase}
