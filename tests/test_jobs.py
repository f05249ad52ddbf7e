"""Job lifecycle with real child processes: errors with their reason, cancel, killed children, unique ids, CLI."""
from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from runner.cli import main as cli
from sdk.errors import SkillBankError
from sdk.jobs import SkillBank, process_alive, read_job


def _wait_for(predicate) -> bool:
    """Poll until `predicate` holds; a condition that never comes is caught by pytest-timeout (pyproject)."""
    while not predicate():
        time.sleep(0.05)
    return True


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def _running_job(bank, tiny_data, monkeypatch):
    """A train job whose worker really runs (sleeping in the documented test hook) when this returns."""
    monkeypatch.setenv("SKILLBANK_JOB_DELAY_S", "120")
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off")
    assert _wait_for(lambda: bank.status(job.id).status == "running" and _children(job.record["pid"]))
    assert _wait_for(lambda: "sleeping before the action" in bank.logs(job.id))
    return bank.status(job.id)


def test_action_whose_backend_cannot_run_ends_in_error_with_one_line(workspace, tiny_data, tmp_path):
    """gen_trt_engine needs TensorRT and a GPU; without them the job fails fast with the reason, not a traceback."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; the unavailable-backend path needs a machine without it")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not parsed: the TensorRT check comes first")
    bank = SkillBank(workspace)
    job = bank.create_job("gen_trt_engine", spec=tiny_data["spec"],
                          overrides={"gen_trt_engine.onnx_file": str(onnx_file)})
    done = bank.wait(job.id, timeout=120)
    assert done.status == "error"
    assert "TensorRT is not installed" in done.error
    assert "\n" not in done.error.strip()
    assert "\n" not in done.error
    assert done.record["started_at"] and done.record["finished_at"]


def test_data_gone_at_runtime_is_an_error_with_the_reason(workspace, tiny_data):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False)
    assert job.status == "pending" and (job.path / "results").is_dir() and (job.path / "log.txt").is_file()
    (tiny_data["root"] / "val.json").unlink()
    bank.start(job.id)
    done = bank.wait(job.id, timeout=60)
    assert done.status == "error" and done.record["exit_code"] == 2
    assert "path_missing dataset.val_data_sources.json_file" in done.error
    assert "path_missing" in bank.logs(job.id)


@pytest.mark.timeout(60)  # a hang guard: cancel waits grace_s, then SIGKILLs; it must never wait on the job itself
def test_cancel_stops_the_process_group(workspace, tiny_data, monkeypatch):
    bank = SkillBank(workspace)
    job = _running_job(bank, tiny_data, monkeypatch)
    worker = _children(job.record["pid"])[0]
    canceled = bank.cancel(job.id, grace_s=5)
    assert canceled.status == "canceled" and canceled.error is None
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split(")")[1][:3]
    assert read_job(job.path)["status"] == "canceled"
    assert bank.cancel(job.id).status == "canceled"  # idempotent


def test_killed_worker_marks_error_with_the_signal(workspace, tiny_data, monkeypatch):
    bank = SkillBank(workspace)
    job = _running_job(bank, tiny_data, monkeypatch)
    os.kill(_children(job.record["pid"])[0], signal.SIGKILL)
    done = bank.wait(job.id, timeout=30)
    assert done.status == "error" and "SIGKILL" in done.error and done.record["exit_code"] == -9
    assert "sleeping before the action" in done.error  # the last log lines say where it was


def test_killed_job_process_is_noticed_by_status(workspace, tiny_data, monkeypatch):
    bank = SkillBank(workspace)
    job = _running_job(bank, tiny_data, monkeypatch)
    os.killpg(job.record["pid"], signal.SIGKILL)
    done = bank.wait(job.id, timeout=30)
    assert done.status == "error" and "supervisor died" in done.error and "SIGKILL" in done.error
    assert f"skillbank job start {job.id}" in done.error
    # A different process (the CLI, later) only sees a pid that is gone, and keeps the recorded error.
    assert SkillBank(workspace).status(job.id).status == "error"


def _create_one(workspace: str, spec: dict, barrier) -> str:
    barrier.wait()
    return SkillBank(workspace).create_job("train", spec=spec, automl_policy="off", start=False).id


def test_parallel_creation_gives_distinct_folders(workspace, tiny_data):
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(20)
    with context.Pool(20) as pool:
        ids = pool.starmap(_create_one, [(str(workspace), tiny_data["spec"], barrier)] * 20)
    assert len(set(ids)) == 20
    folders = sorted(p.name for p in (workspace / "jobs").iterdir())
    assert folders == sorted(ids)
    assert all(json.loads((workspace / "jobs" / i / "job.json").read_text())["id"] == i for i in ids)


def test_bad_requests_write_nothing(workspace, tiny_data, tmp_path):
    bank = SkillBank(workspace)
    with pytest.raises(SkillBankError, match="train.num_epochs"):
        bank.create_job("train", spec=tiny_data["spec"], overrides={"train.num_epochs": 0}, automl_policy="off")
    with pytest.raises(SkillBankError, match="unknown action"):
        bank.create_job("dance")
    with pytest.raises(SkillBankError, match="parent_epoch"):
        bank.create_job("evaluate", spec=tiny_data["spec"], overrides=["parent_epoch=2"])
    assert not (workspace / "jobs").exists()


def test_cli(workspace, tiny_data, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(tiny_data["spec"]))  # JSON is YAML
    base = ["--workspace", str(workspace)]
    with pytest.raises(SystemExit) as exit_help:
        cli(base + ["job", "create", "--help"])
    assert exit_help.value.code == 0
    assert cli(base + ["job", "create", "--action", "train", "-e", str(spec), "num_epochs=-1"]) == 2
    assert "train.num_epochs" in capsys.readouterr().err
    assert not (workspace / "jobs").exists()
    assert cli(base + ["job", "create", "--action", "train", "-e", str(tmp_path / "none.yaml")]) == 2
    assert cli(base + ["job", "status", "nope"]) == 2
    assert cli(base + ["preflight", "--action", "train", "-e", str(spec)]) == 0
    assert "preflight train: OK" in capsys.readouterr().out



def test_restart_resumes_from_the_jobs_own_checkpoint(workspace, tiny_data, monkeypatch, tmp_path):
    ptm = tmp_path / "pretrained.pth"
    ptm.write_bytes(b"w")
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False,
                          overrides={"train.pretrained_model_path": str(ptm)})
    val = tiny_data["root"] / "val.json"
    saved = val.read_bytes()
    val.unlink()
    bank.start(job.id)
    ended = bank.wait(job.id, timeout=60)
    assert ended.status == "error"
    # wait returns once the supervisor has exited too, so the restart below is never refused as "already running"
    assert not process_alive(ended.record["pid"], ended.record.get("pid_start"))
    # The data is back and the first run left a checkpoint: a restart resumes from it.
    val.write_bytes(saved)
    folder = job.path / "results" / "train"
    folder.mkdir(parents=True)
    (folder / "model_epoch_001_step_00002.pth").write_bytes(b"w")
    monkeypatch.setenv("SKILLBANK_JOB_DELAY_S", "120")
    bank.start(job.id)
    assert _wait_for(lambda: bank.status(job.id).status == "running")
    spec = (job.path / "spec.yaml").read_text()
    assert str(folder / "model_epoch_001_step_00002.pth") in spec
    assert str(ptm) not in spec  # resuming restores every weight: no pretrained model
    with pytest.raises(SkillBankError, match=r"already running \(pid \d+"):
        bank.start(job.id)
    assert bank.cancel(job.id).status == "canceled"
