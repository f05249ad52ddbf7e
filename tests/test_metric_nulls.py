"""Metrics that cannot be computed are written as JSON null with a reason, never as -1, NaN or Infinity."""
from __future__ import annotations

import json
import math

import pytest
import torch

from grounding_dino.evaluation import METRIC_NAMES, CocoEvaluator
from grounding_dino.evaluation.coco import EvaluationWarning
from grounding_dino.status import StatusWriter, json_safe, read_status


def _gt(annotations=((1, 0, [10, 10, 20, 20]),)):
    images = [{"id": 1, "width": 400, "height": 300, "file_name": "a.jpg"}]
    anns = [{"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (img, cat, box) in enumerate(annotations, start=1)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]}


def _detection(box=(10.0, 10.0, 30.0, 30.0), score=0.9, label=0):
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "scores": torch.tensor([score])}


def test_a_set_without_annotations_warns_and_reports_null_with_the_reason():
    evaluator = CocoEvaluator(_gt(annotations=()))
    evaluator.update([1], [_detection()])
    with pytest.warns(EvaluationWarning, match="the 1 scored images hold no annotation; every COCO metric is "
                                               "reported as null"):
        metrics = evaluator.summarize()
    assert list(metrics) == list(METRIC_NAMES) and set(metrics.values()) == {None}
    assert evaluator.null_reasons["mAP"] == "the 1 scored images hold no annotation"
    assert [(r["AP"], r["AP50"], r["objects"]) for r in evaluator.class_metrics] == [(None, None, 0)] * 2
    json.dumps(metrics, allow_nan=False)


def test_eval_class_ids_without_annotations_name_the_key():
    evaluator = CocoEvaluator(_gt(), eval_class_ids=[1])
    evaluator.update([1], [_detection()])
    with pytest.warns(EvaluationWarning, match=r"categories in dataset\.eval_class_ids \[1\]"):
        assert evaluator.summarize()["mAP50"] is None


def test_an_empty_area_range_is_null_with_its_reason_not_minus_one():
    evaluator = CocoEvaluator(_gt())  # one small box only
    evaluator.update([1], [_detection()])
    metrics = evaluator.summarize()
    assert metrics["mAP_small"] is not None and metrics["mAP_large"] is None and metrics["AR_medium"] is None
    assert evaluator.null_reasons["mAP_large"] == ("no large (above 96x96 pixels) ground-truth objects in the "
                                                   "scored images")
    dog = next(r for r in evaluator.class_metrics if r["name"] == "dog")
    assert dog["AP"] is None and dog["reason"].startswith("no ground-truth objects of this category")


def test_nonfinite_detections_are_dropped_with_a_warning_and_results_stay_valid_json(tmp_path):
    evaluator = CocoEvaluator(_gt())
    evaluator.update([1], [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [math.nan, 0, 5, 5]]),
                            "labels": torch.tensor([0, 0]), "scores": torch.tensor([0.9, math.nan])}])
    with pytest.warns(EvaluationWarning, match="dropped 1 detections with a NaN or infinite"):
        metrics = evaluator.summarize(results_json=tmp_path / "detections.json")
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "detections.json").read_text())) == 1


def test_status_lines_write_a_nonfinite_kpi_as_null_with_a_reason(tmp_path):
    writer = StatusWriter(tmp_path / "status.json")
    writer.write("RUNNING", "epoch", kpi={"train_loss": torch.tensor(math.nan), "val_mAP": math.inf, "lr": 0.1})
    writer.write("SUCCESS", "done", kpi={"test_mAP": None}, null_reasons={"test_mAP": "no annotations"})
    running, success = read_status(tmp_path / "status.json")
    assert running["kpi"] == {"train_loss": None, "val_mAP": None, "lr": 0.1}
    assert running["null_reasons"] == {"train_loss": "not a finite number (nan)",
                                       "val_mAP": "not a finite number (inf)"}
    assert success["kpi"] == {"test_mAP": None} and success["null_reasons"] == {"test_mAP": "no annotations"}


def test_json_safe_walks_nested_values():
    clean, reasons = json_safe({"history": [(1, 2, math.nan), (2, 4, 0.5)], "best": -math.inf})
    assert clean == {"history": [[1, 2, None], [2, 4, 0.5]], "best": None}
    assert reasons == {"history[0][2]": "not a finite number (nan)", "best": "not a finite number (-inf)"}


def test_per_class_table_prints_null_rows_first():
    from grounding_dino.actions.evaluate import print_per_class

    rows = [{"name": "cat", "AP": 0.5, "AP50": 0.7, "objects": 3},
            {"name": "dog", "AP": None, "AP50": None, "objects": 0}]
    print_per_class(rows)  # no TypeError on None


def test_automl_ranks_an_unscored_validation_last(tmp_path):
    from runner.automl.training import _best_validation

    for step in (2, 4):
        (tmp_path / f"model_epoch_{step // 2 - 1:03d}_step_{step:05d}.pth").write_bytes(b"x")

    class Trial:
        number, attrs = 0, {}

        def set_user_attr(self, key, value):
            self.attrs[key] = value

    trial = Trial()
    assert _best_validation(trial, [[1, 2, 0.25], [2, 4, None]], tmp_path) == 0.25
    assert trial.attrs["best_epoch"] == 1
