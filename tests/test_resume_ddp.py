"""Training through the real `grounding_dino train` command: SIGKILL + resume equals an uninterrupted run, and a
2-process DDP run on CPU (gloo). Trainings run as subprocesses (DDP relaunches the command line per rank)."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "grounding_dino"
# Same value of every trained tensor and metric, up to float noise well below any training effect.
ATOL, RTOL = 1e-6, 1e-5


def _write_spec(tiny_train_spec: dict, folder: Path, **overrides) -> Path:
    spec = copy.deepcopy(tiny_train_spec)
    spec.pop("_paths")
    spec["results_dir"] = str(folder / "results")
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env() -> dict:
    # one thread per process: two trainings share this machine's cores, and the thread count is part of what makes
    # float results reproducible
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _train(spec: Path, *overrides: str) -> subprocess.Popen:
    log = open(spec.parent / "log.txt", "ab")
    return subprocess.Popen([str(CLI), "train", "-e", str(spec), *overrides], cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, spec: Path, timeout: float = 900) -> None:
    code = process.wait(timeout=timeout)
    assert code == 0, (spec.parent / "log.txt").read_text()[-4000:]


def _checkpoints(results: Path) -> list[str]:
    return sorted(p.name for p in results.glob("model_epoch_*_step_*.pth"))


def _final_state(results: Path) -> tuple[dict, dict]:
    import torch

    from grounding_dino.status import read_status

    ckpt = torch.load(results / "gdino_model_latest.pth", weights_only=True)
    last_epoch = [r for r in read_status(results / "status.json") if r["status"] == "RUNNING"][-1]
    return ckpt, last_epoch


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_train_spec, tmp_path):
    settings = {"train.num_epochs": 4, "dataset.workers": 1, "train.checkpoint_interval": 1}
    whole = _write_spec(tiny_train_spec, tmp_path / "whole", **settings)
    broken = _write_spec(tiny_train_spec, tmp_path / "broken", **settings)
    reference = _train(whole)
    victim = _train(broken)

    results = tmp_path / "broken" / "results" / "train"
    while len(_checkpoints(results)) < 2:
        assert victim.poll() is None, "the run ended before its second checkpoint"
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    second = results / _checkpoints(results)[1]
    assert second.name == "model_epoch_001_step_00004.pth"

    resumed = _train(broken, f"train.resume_training_checkpoint_path={second}")
    _finish(resumed, broken)
    _finish(reference, whole)

    import torch

    expected, expected_line = _final_state(tmp_path / "whole" / "results" / "train")
    got, got_line = _final_state(results)
    assert got["global_step"] == expected["global_step"] == 8 and got["epoch"] == expected["epoch"] == 3
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, atol=ATOL, rtol=RTOL, msg=key)
    assert (got_line["epoch"], got_line["step"]) == (expected_line["epoch"], expected_line["step"]) == (3, 8)
    for key in ("train_loss", "val_loss", "val_mAP", "val_mAP50"):
        assert got_line["kpi"][key] == pytest.approx(expected_line["kpi"][key], abs=ATOL, rel=RTOL), key
    # the killed run's checkpoints are all complete files, and the resumed run wrote the rest beside them
    assert _checkpoints(results) == [f"model_epoch_{e:03d}_step_{2 * (e + 1):05d}.pth" for e in range(4)]


def test_two_process_ddp_on_cpu_through_the_cli(tiny_train_spec, tmp_path):
    # 8 images, 2 ranks x batch 2 -> 2 steps per epoch
    spec = _write_spec(tiny_train_spec, tmp_path, **{"train.num_gpus": 2, "train.num_epochs": 1,
                                                     "dataset.batch_size": 2})
    _finish(_train(spec), spec)
    results = tmp_path / "results" / "train"
    assert _checkpoints(results) == ["model_epoch_000_step_00002.pth"]
    assert os.readlink(results / "gdino_model_latest.pth") == "model_epoch_000_step_00002.pth"
    from grounding_dino.status import read_status

    statuses = [r["status"] for r in read_status(results / "status.json")]
    assert statuses == ["STARTED", "RUNNING", "SUCCESS"]  # rank 0 only
    kpi = read_status(results / "status.json")[1]["kpi"]
    assert {"train_loss", "val_loss", "val_mAP", "val_mAP50"} <= set(kpi)
    log = (tmp_path / "log.txt").read_text()
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
