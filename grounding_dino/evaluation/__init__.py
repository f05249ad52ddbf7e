"""Evaluation helpers (COCO box mAP). Imports torch and faster-coco-eval."""
from .coco import METRIC_NAMES, CocoEvaluator, load_coco, to_coco_results

__all__ = ["METRIC_NAMES", "CocoEvaluator", "load_coco", "to_coco_results"]
