"""A chain of SDK jobs, each taking its model from its parent through `parent_model`:

train (automl off) -> evaluate -> inference -> export -> quantize (onnxruntime) -> evaluate on the ONNX model and on
the quantized one. Real numbers are checked: evaluate's mAP50 equals the training run's last val_mAP50 on the same
data, ONNX Runtime matches PyTorch, and the quantized model's mAP50 is reported next to the float one.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from grounding_dino.status import read_status
from sdk import SkillBank

EXPORT_SIZE = 128  # the training size of the tiny set: the fixed-size ONNX sees what training saw


def _results(job, action: str) -> Path:
    return Path(job.results_dir) / action if (Path(job.results_dir) / action).is_dir() else Path(job.results_dir)


def _kpis(job, action: str) -> dict:
    merged = {}
    for record in read_status(_results(job, action) / "status.json"):
        merged.update(record.get("kpi", {}))
    return merged


def _done(bank: SkillBank, job, timeout: float = 600):
    finished = bank.wait(job.id, timeout=timeout)
    assert finished.status == "done", f"{job.action} job ended {finished.status}: {finished.error}\n" \
                                      f"{bank.logs(job.id, tail=30)}"
    return finished


@pytest.mark.slow
def test_train_evaluate_infer_export_quantize_chain(tiny_train_spec, tmp_path):
    spec = copy.deepcopy(tiny_train_spec)
    paths = spec.pop("_paths")
    # Enough training for non-zero mAP: every equality below must compare real detections, not two zeros.
    spec["train"]["num_epochs"] = 12
    spec["dataset"]["augmentation"]["horizontal_flip_prob"] = 0.0
    spec["dataset"]["test_data_sources"] = dict(spec["dataset"]["val_data_sources"])
    spec["dataset"]["quant_calibration_data_sources"] = dict(spec["dataset"]["val_data_sources"])
    spec["dataset"]["infer_data_sources"] = {"image_dir": [paths["val_image_dir"]],
                                             "captions": ["red circle", "blue square"]}
    bank = SkillBank(tmp_path / "workspace")

    train = _done(bank, bank.create_job("train", spec=spec, overrides={"train.validation_interval": 4},
                                        automl_policy="off"))
    assert json.loads((Path(train.path) / "job.json").read_text())["automl_policy"] == "off"
    val_mAP50 = [r["kpi"]["val_mAP50"] for r in read_status(_results(train, "train") / "status.json")
                 if "val_mAP50" in r.get("kpi", {})][-1]
    assert val_mAP50 > 0, "the tiny run scored no mAP50: the equality below would prove nothing"

    evaluate = _done(bank, bank.create_job("evaluate", spec=spec, parent_job_id=train.id))
    assert _kpis(evaluate, "evaluate")["test_mAP50"] == pytest.approx(val_mAP50, abs=1e-6)
    # Given only its test data, a child sees the images as the parent did (test-time resize, normalisation).
    only_data = _done(bank, bank.create_job("evaluate", parent_job_id=train.id, overrides={
        "dataset.test_data_sources": spec["dataset"]["val_data_sources"]}))
    assert _kpis(only_data, "evaluate")["test_mAP50"] == pytest.approx(val_mAP50, abs=1e-6)

    inference = _done(bank, bank.create_job("inference", spec=spec, parent_job_id=train.id))
    out = _results(inference, "inference")
    images = sorted(Path(paths["val_image_dir"]).iterdir())
    assert len(list((out / "labels").glob("*.txt"))) == len(images)
    assert len(list((out / "images_annotated").iterdir())) == len(images)

    export = _done(bank, bank.create_job("export", spec=spec, parent_job_id=train.id, overrides={
        "export.input_width": EXPORT_SIZE, "export.input_height": EXPORT_SIZE}))
    onnx_files = list(_results(export, "export").glob("*.onnx"))
    assert len(onnx_files) == 1
    export_kpis = _kpis(export, "export")
    logit_diff = [v for k, v in export_kpis.items() if "logits" in k and "diff" in k]
    assert logit_diff and max(logit_diff) <= 1e-4, export_kpis

    quantize = _done(bank, bank.create_job("quantize", spec=spec, parent_job_id=export.id, overrides={
        "quantize.backend": "onnxruntime", "quantize.mode": "static_ptq", "quantize.num_calibration_batches": 2}))
    quantized = _kpis(quantize, "quantize")
    assert 0.0 <= quantized["quantized_mAP50"] <= 1.0 and 0.0 <= quantized["float_mAP50"] <= 1.0

    fixed_size = {"evaluate.input_width": EXPORT_SIZE, "evaluate.input_height": EXPORT_SIZE}
    torch_fixed = _done(bank, bank.create_job("evaluate", spec=spec, parent_job_id=train.id, overrides=fixed_size))
    torch_fixed_mAP50 = _kpis(torch_fixed, "evaluate")["test_mAP50"]
    assert torch_fixed_mAP50 > 0, "no mAP50 at the export size: the ONNX comparisons below would prove nothing"

    on_onnx = _done(bank, bank.create_job("evaluate", spec=spec, parent_job_id=export.id))
    resolved = yaml.safe_load((Path(on_onnx.path) / "spec.yaml").read_text())
    assert Path(resolved["evaluate"]["checkpoint"]).resolve() == onnx_files[0].resolve()
    onnx_mAP50 = _kpis(on_onnx, "evaluate")["test_mAP50"]
    # The ONNX graph has a fixed input size: ONNX Runtime must give PyTorch's mAP50 at that size, which is also the
    # float number the quantize job reported next to the INT8 one.
    assert onnx_mAP50 == pytest.approx(torch_fixed_mAP50, abs=1e-6)
    assert quantized["float_mAP50"] == pytest.approx(torch_fixed_mAP50, abs=1e-6)

    on_int8 = _done(bank, bank.create_job("evaluate", spec=spec, parent_job_id=quantize.id))
    resolved = yaml.safe_load((Path(on_int8.path) / "spec.yaml").read_text())
    assert Path(resolved["evaluate"]["checkpoint"]).name == "quantized_model.onnx"
    assert _kpis(on_int8, "evaluate")["test_mAP50"] == pytest.approx(quantized["quantized_mAP50"], abs=1e-6)
