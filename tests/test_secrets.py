"""Secrets are never written: every action through the CLI, and a train job with AutoML through the SDK, are given
encryption_key=<marker>, and no file they write (checkpoints and TensorBoard event files included) nor what the CLI
prints holds the marker."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grounding_dino import config as gd_config
from grounding_dino.actions import SECRET_KEYS

MARKER = "SECRET-MARKER-1234"
REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("grounding_dino")
SIZE = 128


def test_secret_keys_come_from_the_one_mark():
    from sdk import jobs

    assert SECRET_KEYS == jobs.SECRET_KEYS == gd_config.secret_keys() == ("encryption_key",)


def holding_marker(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]


def run_cli(action: str, spec_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([str(CLI), action, "-e", str(spec_path), f"encryption_key={MARKER}", *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert MARKER not in result.stdout + result.stderr, f"{action} printed the secret"
    return result


@pytest.mark.slow
def test_no_action_and_no_job_writes_the_encryption_key(tiny_train_spec, tmp_path):
    spec = copy.deepcopy(tiny_train_spec)
    paths = spec.pop("_paths")
    results = tmp_path / "results"
    spec["results_dir"] = str(results)
    spec["train"]["num_epochs"] = 1
    val = dict(spec["dataset"]["val_data_sources"])
    spec["dataset"].update(test_data_sources=val, quant_calibration_data_sources=val,
                           infer_data_sources={"image_dir": [paths["val_image_dir"]], "captions": ["red circle"]})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    def ok(action, *overrides):
        result = run_cli(action, spec_path, *overrides)
        assert result.returncode == 0, f"{action}: {result.stderr[-3000:]}"

    ok("train")
    checkpoint = str(results / "train" / "gdino_model_latest.pth")
    ok("evaluate", f"evaluate.checkpoint={checkpoint}")
    ok("inference", f"inference.checkpoint={checkpoint}")
    ok("export", f"export.checkpoint={checkpoint}", f"export.input_width={SIZE}", f"export.input_height={SIZE}")
    onnx = str(results / "export" / "model.onnx")
    ok("quantize", f"quantize.model_path={onnx}", "quantize.backend=onnxruntime", "quantize.mode=dynamic_ptq",
       "quantize.evaluate=false")
    engine = run_cli("gen_trt_engine", spec_path, f"gen_trt_engine.onnx_file={onnx}")
    if engine.returncode != 0:  # no TensorRT here: its one-line error, nothing written
        assert engine.returncode == 2 and "TensorRT" in engine.stderr, engine.stderr
    assert (results / "train" / "experiment.yaml").is_file()
    assert yaml.safe_load((results / "evaluate" / "experiment.yaml").read_text())["encryption_key"] is None

    from sdk import SkillBank

    job_spec = copy.deepcopy(spec)
    job_spec.pop("results_dir")
    job_spec["automl"] = {"max_trials": 1, "algorithm": "tpe", "automl_hyperparameters": ["train.optim.lr"]}
    bank = SkillBank(tmp_path / "workspace")
    job = bank.create_job("train", spec=job_spec, overrides={"encryption_key": MARKER}, automl_policy="on")
    job = bank.wait(job.id, timeout=600)
    assert job.status == "done", f"{job.error}\n{bank.logs(job.id, tail=30)}"
    assert list((Path(job.results_dir)).rglob("trial_spec.yaml")), "the AutoML trial spec was not written"
    assert job.record["has_encryption_key"]

    assert holding_marker(tmp_path) == []
