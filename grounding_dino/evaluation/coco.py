"""COCO box mAP for post-processed detections (faster-coco-eval, numbers identical to pycocotools).

Predicted labels are phrase indices of the caption built from the ground truth's categories in id order, and
those ids are 0-based and contiguous, so a label is its category id.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster

logger = logging.getLogger(__name__)


class EvaluationWarning(UserWarning):
    """An evaluation whose metrics cannot all be computed (reported as null with a reason)."""

# Names of pycocotools' 12 summary numbers, in `stats` order. pycocotools' -1 ("no ground truth in that range")
# is reported as None, with the reason in CocoEvaluator.null_reasons.
METRIC_NAMES = (
    "mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
AREA_OF = {"small": "small (below 32x32 pixels)", "medium": "medium (32x32 to 96x96 pixels)",
           "large": "large (above 96x96 pixels)"}


def load_coco(annotations: Union[str, os.PathLike, dict]) -> COCO:
    """A COCO ground truth from a JSON path or an already-loaded dict, with 0-based contiguous category ids."""
    source = os.fspath(annotations) if not isinstance(annotations, dict) else "the annotation dict"
    coco = COCO(copy.deepcopy(annotations) if isinstance(annotations, dict) else source)
    cat_ids = sorted(coco.getCatIds())
    if cat_ids != list(range(len(cat_ids))):
        raise ValueError(
            f"{source}: category ids must be 0-based and contiguous (0..{len(cat_ids) - 1}), got {cat_ids[:10]}"
            f"{'...' if len(cat_ids) > 10 else ''}; renumber the categories and their annotations"
        )
    return coco


def to_coco_results(image_id: int, detection: Mapping[str, torch.Tensor]) -> List[dict]:
    """One image's {scores, labels, boxes xyxy pixels} as COCO result records (bbox x, y, w, h)."""
    boxes = detection["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    return [
        {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
        for box, score, label in zip(xywh, scores, labels)
    ]


class CocoEvaluator:
    """Collects detections image by image, then scores them against a COCO ground truth.

    Only the images passed to `update` are scored (so a partial pass, e.g. a dry run, is not penalised for unseen
    images); with no `update` at all every ground-truth image counts and the result is 0. Updating an image twice
    keeps the last detections, which also absorbs the repeated samples a distributed sampler pads with.
    """

    def __init__(
        self,
        ground_truth: Union[COCO, str, os.PathLike, dict],
        eval_class_ids: Optional[Sequence[int]] = None,
        score_threshold: float = 0.0,
    ):
        self.coco_gt = ground_truth if isinstance(ground_truth, COCO) else load_coco(ground_truth)
        if eval_class_ids is not None:
            unknown = sorted(set(eval_class_ids) - set(self.coco_gt.getCatIds()))
            if unknown or not eval_class_ids:
                raise ValueError(
                    f"dataset.eval_class_ids {list(eval_class_ids)}: {unknown or 'empty list'} not among the ground "
                    f"truth's category ids {sorted(self.coco_gt.getCatIds())}; use null to score every class"
                )
        self.eval_class_ids = None if eval_class_ids is None else sorted(set(eval_class_ids))
        self.score_threshold = score_threshold
        self.detections: Dict[int, List[dict]] = {}
        self.class_metrics: List[dict] = []  # per category, filled by summarize
        self.null_reasons: Dict[str, str] = {}  # metric name -> why summarize reported it as None
        self.nonfinite = 0  # detections dropped for a NaN/Inf score or box (a diverged model)

    def update(self, image_ids: Iterable[int], detections: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Add one batch: COCO image ids and the matching `post_process` outputs."""
        image_ids, detections = list(image_ids), list(detections)
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection sets: pass one per image")
        for image_id, detection in zip(image_ids, detections):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground-truth annotations")
            records = to_coco_results(image_id, detection)
            finite = [r for r in records if math.isfinite(r["score"]) and all(map(math.isfinite, r["bbox"]))]
            self.nonfinite += len(records) - len(finite)
            self.detections[image_id] = [r for r in finite if r["score"] >= self.score_threshold]

    def gather(self) -> None:
        """Merge every rank's detections into each rank (collective: call it on all ranks or none)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: List[Optional[Dict[int, List[dict]]]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.detections)
        self.detections = {k: v for part in parts for k, v in part.items()}

    def results(self) -> List[dict]:
        """All detections as COCO result records (what `write_results` saves)."""
        return [r for image_id in sorted(self.detections) for r in self.detections[image_id]]

    def write_results(self, path: Union[str, os.PathLike]) -> None:
        """Save the detections as a COCO results JSON list."""
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.results(), f, allow_nan=False)

    def _detections_coco(self, records: List[dict]) -> COCO:
        annotations = [
            dict(r, id=i, area=r["bbox"][2] * r["bbox"][3], iscrowd=0) for i, r in enumerate(records, start=1)
        ]
        dataset = {"images": self.coco_gt.dataset["images"], "categories": self.coco_gt.dataset["categories"],
                   "annotations": annotations}
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        return coco

    def summarize(self, results_json: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Optional[float]]:
        """COCO metrics over the updated images (see METRIC_NAMES), optionally writing the results JSON first.

        A metric without ground truth to score (no images, no annotations, none in an area range) is None, its
        reason in `null_reasons`; a set with nothing to score at all also warns.
        """
        if self.nonfinite:
            warnings.warn(f"dropped {self.nonfinite} detections with a NaN or infinite score or box before scoring; "
                          "the model's weights or inputs are not finite", EvaluationWarning, stacklevel=2)
        if results_json is not None:
            self.write_results(results_json)
        image_ids = sorted(self.detections) or sorted(self.coco_gt.getImgIds())
        cat_ids = self.eval_class_ids if self.eval_class_ids is not None else sorted(self.coco_gt.getCatIds())
        objects = len(self.coco_gt.getAnnIds(imgIds=image_ids, catIds=cat_ids, iscrowd=False)) if image_ids else 0
        if not image_ids or not objects:
            return self._nothing_to_score(image_ids, cat_ids)
        coco_eval = COCOeval_faster(self.coco_gt, self._detections_coco(self.results()), iouType="bbox",
                                    print_function=logger.debug)
        coco_eval.params.imgIds = image_ids
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        self.class_metrics = self._per_class(coco_eval)
        metrics: Dict[str, Optional[float]] = {}
        self.null_reasons = {}
        for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)]):
            value = float(value)
            if value < 0:  # pycocotools' -1: no ground truth in the metric's area range
                area = name.rsplit("_", 1)[-1]
                self.null_reasons[name] = f"no {AREA_OF.get(area, area)} ground-truth objects in the scored images"
                metrics[name] = None
            else:
                metrics[name] = value
        return metrics

    def _nothing_to_score(self, image_ids: List[int], cat_ids: List[int]) -> Dict[str, Optional[float]]:
        if not image_ids:
            reason = "the evaluation set has no images"
        elif self.eval_class_ids is not None:
            reason = (f"the scored images hold no annotation of the categories in dataset.eval_class_ids "
                      f"{self.eval_class_ids}")
        else:
            reason = f"the {len(image_ids)} scored images hold no annotation"
        warnings.warn(f"{reason}; every COCO metric is reported as null", EvaluationWarning, stacklevel=3)
        self.null_reasons = {name: reason for name in METRIC_NAMES}
        self.class_metrics = [
            {"id": int(c), "name": self.coco_gt.cats[c]["name"], "AP": None, "AP50": None, "objects": 0,
             "reason": reason} for c in cat_ids]
        return {name: None for name in METRIC_NAMES}

    def _per_class(self, coco_eval) -> List[dict]:
        """AP (IoU .50:.95) and AP50 of each scored category, all areas, 100 detections; None (with a reason)
        without ground truth."""
        precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]

        def mean(values):
            values = values[values > -1]
            return float(values.mean()) if values.size else None

        rows = []
        for k, cat_id in enumerate(coco_eval.params.catIds):
            row = {"id": int(cat_id), "name": self.coco_gt.cats[cat_id]["name"],
                   "AP": mean(precision[:, :, k, 0, -1]), "AP50": mean(precision[0, :, k, 0, -1]),
                   "objects": len(self.coco_gt.getAnnIds(imgIds=coco_eval.params.imgIds, catIds=[cat_id],
                                                         iscrowd=False))}
            if row["AP"] is None:
                row["reason"] = "no ground-truth objects of this category in the scored images"
            rows.append(row)
        return rows
