"""Mapping functions on real job folders: parent_model, resume_model, ptm_if_no_resume_model, carried settings."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from sdk.errors import SkillBankError
from sdk.jobs import SkillBank, update_job
from sdk.mappings import MappingContext, ptm_if_no_resume_model, resume_model

CHECKPOINTS = [(0, 10), (1, 20), (2, 30)]


def _spec(job) -> dict:
    return yaml.safe_load((job.path / "spec.yaml").read_text())


def _finished_train(bank, tiny_data, checkpoints=CHECKPOINTS, layout="train", **overrides):
    job = bank.create_job("train", spec=tiny_data["spec"], overrides=overrides or None, automl_policy="off",
                          start=False)
    folder = job.path / "results" / layout if layout else job.path / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, step in checkpoints:
        (folder / f"model_epoch_{epoch:03d}_step_{step:05d}.pth").write_bytes(b"weights")
    if checkpoints:
        epoch, step = checkpoints[-1]
        os.symlink(f"model_epoch_{epoch:03d}_step_{step:05d}.pth", folder / "gdino_model_latest.pth")
    update_job(job.path, status="done")
    return job


def _job_count(workspace: Path) -> int:
    return len(list((workspace / "jobs").iterdir()))


def test_parent_model_newest_by_step(workspace, tiny_data):
    bank = SkillBank(workspace)
    # Out-of-order epochs: the newest is decided by step, not by file order or epoch.
    parent = _finished_train(bank, tiny_data, checkpoints=[(3, 15), (1, 40), (2, 25)])
    child = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False)
    assert _spec(child)["evaluate"]["checkpoint"].endswith("model_epoch_001_step_00040.pth")
    assert child.record["parent_job_id"] == parent.id and "evaluate.checkpoint" in child.record["mapped"]


def test_parent_model_exact_epoch_and_step(workspace, tiny_data):
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data)
    by_epoch = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id,
                               overrides=["parent_epoch=1"], start=False)
    assert _spec(by_epoch)["evaluate"]["checkpoint"].endswith("model_epoch_001_step_00020.pth")
    by_step = bank.create_job("export", parent_job_id=parent.id, parent_step=10, start=False)
    assert _spec(by_step)["export"]["checkpoint"].endswith("model_epoch_000_step_00010.pth")


def test_parent_model_no_match_lists_available_and_writes_nothing(workspace, tiny_data):
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data)
    before = _job_count(workspace)
    with pytest.raises(SkillBankError) as err:
        bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, parent_step=999, start=False)
    message = str(err.value)
    assert "parent_step=999" in message
    assert all(f"model_epoch_{e:03d}_step_{s:05d}.pth" in message for e, s in CHECKPOINTS)
    assert _job_count(workspace) == before


def test_parent_results_without_action_subfolder(workspace, tiny_data):
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data, layout="")
    child = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False)
    assert _spec(child)["evaluate"]["checkpoint"] == str(parent.path / "results" / "model_epoch_002_step_00030.pth")


def test_automl_parent_uses_best_model_and_its_params(workspace, tiny_data):
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data, checkpoints=[])
    best = parent.path / "results" / "best_model"
    best.mkdir(parents=True)
    (best / "model_epoch_004_step_00050.pth").write_bytes(b"winner")
    (best / "best_automl.json").write_text(json.dumps(
        {"trial": 3, "checkpoint": "model_epoch_004_step_00050.pth", "params": {"model.dec_layers": 3}}))
    child = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False)
    spec = _spec(child)
    assert spec["evaluate"]["checkpoint"] == str(best / "model_epoch_004_step_00050.pth")
    assert spec["model"]["dec_layers"] == 3  # the winner was built with 3 decoder layers


def test_structural_settings_carried_and_conflicts_refused(workspace, tiny_data):
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data, **{"model.num_queries": 300, "model.log_scale": "auto"})
    child = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False)
    assert _spec(child)["model"]["num_queries"] == 300 and _spec(child)["model"]["log_scale"] == "auto"
    assert "model.num_queries" in child.record["carried"]
    before = _job_count(workspace)
    with pytest.raises(SkillBankError) as err:
        bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False,
                        overrides={"model.num_queries": 900, "model.hidden_dim": 128})
    assert "model.num_queries=900" in str(err.value) and "model.hidden_dim=128" in str(err.value)
    assert _job_count(workspace) == before
    # num_select only sets how many detections are kept: a request may change it.
    again = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=parent.id, start=False,
                            overrides=["num_select=50"])
    assert _spec(again)["model"]["num_select"] == 50


def test_test_time_preprocessing_inherited_and_a_change_warned(workspace, tiny_data):
    """An evaluate job given only its test data must see images as its parent did (a child at the template's
    test_random_resize 800 instead of the parent's training size scored mAP50 0.057 where the parent's 0.528)."""
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data, **{"dataset.augmentation.test_random_resize": 256,
                                                 "dataset.augmentation.random_resize_max_size": 400,
                                                 "dataset.augmentation.input_mean": [0.5, 0.5, 0.5]})
    child = bank.create_job("evaluate", parent_job_id=parent.id, start=False,
                            overrides={"dataset.test_data_sources": tiny_data["spec"]["dataset"]["val_data_sources"]})
    augmentation = _spec(child)["dataset"]["augmentation"]
    assert augmentation["test_random_resize"] == 256 and augmentation["random_resize_max_size"] == 400
    assert augmentation["input_mean"] == [0.5, 0.5, 0.5]
    assert "dataset.augmentation.test_random_resize" in child.record["carried"] and not child.record["warnings"]
    changed = bank.create_job("evaluate", parent_job_id=parent.id, start=False, overrides={
        "dataset.test_data_sources": tiny_data["spec"]["dataset"]["val_data_sources"],
        "dataset.augmentation.test_random_resize": 800})
    assert _spec(changed)["dataset"]["augmentation"]["test_random_resize"] == 800  # the request wins...
    warned = [w for w in changed.record["warnings"] if "dataset.augmentation.test_random_resize=800" in w]
    assert warned and "256" in warned[0] and parent.id in warned[0]  # ...and is told what it changes


def test_export_parent_feeds_engine_build(workspace, tiny_data):
    bank = SkillBank(workspace)
    train = _finished_train(bank, tiny_data)
    export = bank.create_job("export", parent_job_id=train.id, overrides={"export.input_width": 640}, start=False)
    onnx = Path(_spec(export)["export"]["onnx_file"])
    assert onnx.suffix == ".onnx" and onnx.is_relative_to(export.path / "results")
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(b"onnx")
    update_job(export.path, status="done")
    engine = bank.create_job("gen_trt_engine", parent_job_id=export.id, start=False)
    spec = _spec(engine)
    assert spec["gen_trt_engine"]["onnx_file"] == str(onnx)
    assert spec["gen_trt_engine"]["input_width"] == 640  # the ONNX has a fixed input size
    with pytest.raises(SkillBankError, match="gen_trt_engine.input_width=960"):
        bank.create_job("gen_trt_engine", parent_job_id=export.id, overrides={"gen_trt_engine.input_width": 960},
                        start=False)


def test_resume_and_pretrained_model(workspace, tiny_data, tmp_path):
    bank = SkillBank(workspace)
    ptm = tmp_path / "pretrained.pth"
    ptm.write_bytes(b"ptm")
    fresh = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False,
                            overrides={"train.pretrained_model_path": str(ptm)})
    spec = _spec(fresh)
    assert spec["train"]["pretrained_model_path"] == str(ptm)
    assert spec["train"]["resume_training_checkpoint_path"] is None
    # The same job after it wrote checkpoints: resume from the newest, and skip the pretrained model.
    folder = fresh.path / "results" / "train"
    folder.mkdir(parents=True)
    for epoch, step in CHECKPOINTS:
        (folder / f"model_epoch_{epoch:03d}_step_{step:05d}.pth").write_bytes(b"w")
    context = MappingContext("train", spec, fresh.path)
    assert resume_model(context, "train.resume_training_checkpoint_path") == str(
        folder / "model_epoch_002_step_00030.pth")
    assert ptm_if_no_resume_model(context, "train.pretrained_model_path") is None


def test_missing_parent_and_outputs_outside_the_job(workspace, tiny_data, tmp_path):
    bank = SkillBank(workspace)
    with pytest.raises(SkillBankError, match="no job 'nope'"):
        bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id="nope", start=False)
    with pytest.raises(SkillBankError, match="outside the job folder"):
        bank.create_job("evaluate", spec=tiny_data["spec"], start=False, overrides={
            "evaluate.checkpoint": str(tmp_path / "x.pth"), "evaluate.results_dir": str(tmp_path / "elsewhere")})
    assert not (workspace / "jobs").exists() or _job_count(workspace) == 0


def test_encryption_key_never_written(workspace, tiny_data, monkeypatch):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False,
                          overrides=["encryption_key=s3cr3t-k3y"])
    assert job.record["has_encryption_key"] is True
    for path in job.path.rglob("*"):
        if path.is_file():
            assert b"s3cr3t-k3y" not in path.read_bytes(), path


def test_engine_parent_selects_the_deploy_mapping(workspace, tiny_data):
    bank = SkillBank(workspace)
    train = _finished_train(bank, tiny_data)
    export = bank.create_job("export", parent_job_id=train.id, start=False)
    update_job(export.path, status="done")
    (export.path / "results").joinpath("model.onnx").write_bytes(b"onnx")
    engine = bank.create_job("gen_trt_engine", parent_job_id=export.id, start=False)
    (engine.path / "results" / "gen_trt_engine").mkdir(parents=True)
    (engine.path / "results" / "gen_trt_engine" / "model.engine").write_bytes(b"plan")
    update_job(engine.path, status="done")
    child = bank.create_job("evaluate", spec=tiny_data["spec"], parent_job_id=engine.id, start=False)
    spec = _spec(child)
    assert child.record["deploy"] is True
    assert spec["evaluate"]["trt_engine"] == str(engine.path / "results" / "gen_trt_engine" / "model.engine")
    assert spec["evaluate"]["input_width"] == 960 and spec["model"]["num_queries"] == 900


@pytest.mark.parametrize("action", ["evaluate", "inference", "export"])
def test_embed_init_tgt_carried_and_conflict_refused(workspace, tiny_data, action):
    # Without learned content queries the model has no transformer.tgt_embed: a child built with the default would
    # pass job creation and fail when it loads the parent's checkpoint.
    bank = SkillBank(workspace)
    parent = _finished_train(bank, tiny_data, **{"model.embed_init_tgt": False})
    spec = copy.deepcopy(tiny_data["spec"])
    spec["dataset"]["infer_data_sources"] = {"image_dir": [str(tiny_data["root"] / "images")], "captions": ["cat"]}
    child = bank.create_job(action, spec=spec, parent_job_id=parent.id, start=False)
    assert _spec(child)["model"]["embed_init_tgt"] is False
    assert "model.embed_init_tgt" in child.record["carried"]
    before = _job_count(workspace)
    with pytest.raises(SkillBankError, match=r"model\.embed_init_tgt=True \(parent model\.embed_init_tgt=False\)"):
        bank.create_job(action, spec=spec, parent_job_id=parent.id, start=False,
                        overrides={"model.embed_init_tgt": True})
    assert _job_count(workspace) == before
