"""Injected faults, one test per row. Each row checks that no process is left behind (the recorded pids and their
process groups, read from /proc), that every checkpoint written before the fault still loads with
torch.load(weights_only=True), that job.json is valid JSON, and that the status says what happened.

| fault                                   | expected                                                             |
|-----------------------------------------|----------------------------------------------------------------------|
| kill -9 of the supervisor, mid-training | worker dies with it; status error "supervisor died"; start resumes   |
| kill -9 of the worker                   | status error naming SIGKILL; supervisor gone                         |
| SIGTERM to `grounding_dino train`       | checkpoint at the next step, PREEMPTED line, exit 0; resume goes on  |
| SIGUSR1 to a job's supervisor           | job `preempted`, exit code 0; `job start` resumes from that step     |
| disk full during a checkpoint save      | "no space left in DIR (checkpoint needs about N MB)"; previous kept  |
| truncated newest checkpoint on restart  | a clear error naming the file (or the newest readable one is used)   |
| corrupted job.json                      | status/list name the file, no traceback; other jobs still list       |
| five concurrent `job start`             | one supervisor, one worker; four "already running (pid N)", exit 2   |
| two CLI runs on one results folder      | the second exits 2 naming the holder's pid and writes nothing        |

Trainings run the tiny CPU spec (tests/conftest.py) as subprocesses, one thread each. The SIGUSR1 and disk-full
rows are marked slow (about a minute each on 2 shared cores); the rest take about 3 minutes together.
"""
from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from grounding_dino.layout import LATEST_LINK, RESULTS_LOCK, take_lock
from grounding_dino.status import read_status
from sdk.errors import SkillBankError
from sdk.jobs import SkillBank, group_alive, process_alive, read_job

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 300  # generous: the machine's cores are shared


def _wait_for(predicate) -> None:
    """Poll until `predicate` holds; a condition that never comes is caught by pytest-timeout (pyproject)."""
    while not predicate():
        time.sleep(0.05)


@pytest.fixture
def one_thread(monkeypatch):
    """Jobs inherit the environment: one thread per process on shared cores."""
    for name, value in _env().items():
        monkeypatch.setenv(name, value)


def _env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def _job_spec(tiny_train_spec: dict, **overrides) -> dict:
    spec = copy.deepcopy(tiny_train_spec)
    spec.pop("_paths")
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def _write_spec(tiny_train_spec: dict, folder: Path, **overrides) -> Path:
    spec = _job_spec(tiny_train_spec, **overrides)
    spec["results_dir"] = str(folder / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train(spec: Path, *overrides: str, preexec_fn=None) -> subprocess.Popen:
    log = open(spec.parent / "log.txt", "ab")
    return subprocess.Popen([str(BIN / "grounding_dino"), "train", "-e", str(spec), *overrides], cwd=REPO,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=preexec_fn)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("model_epoch_*_step_*.pth")) if folder.is_dir() else []


def _assert_checkpoints_load(folder: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    import torch

    found = [p for p in _checkpoints(folder) if p not in skip]
    for path in found:
        torch.load(path, weights_only=True, map_location="cpu")
    latest = folder / LATEST_LINK
    if latest.is_symlink():
        assert latest.resolve() in [p.resolve() for p in found], f"{latest} points at an unreadable file"
    return found


def _assert_no_processes(*pids_and_starts, groups=()) -> None:
    """None of the (pid, start time) pairs runs, and no process of the groups is left (zombies do not count)."""
    for pid, start in pids_and_starts:
        if pid:
            _wait_for(lambda: not process_alive(pid, start))
    for group in groups:
        if group:
            _wait_for(lambda: not group_alive(group))


def _assert_job_settled(job_dir: Path) -> dict:
    record = json.loads((job_dir / "job.json").read_text())  # valid JSON
    _assert_no_processes((record.get("pid"), record.get("pid_start")),
                         (record.get("worker_pid"), record.get("worker_pid_start")),
                         groups=(record.get("pid"), record.get("worker_pid")))
    _assert_checkpoints_load(job_dir / "results" / "train")
    return record


def _worker_started(bank: SkillBank, job_id: str) -> dict:
    _wait_for(lambda: bank.status(job_id).status == "running" and read_job(bank.jobs_dir / job_id).get("worker_pid"))
    return read_job(bank.jobs_dir / job_id)


def _status_lines(results: Path) -> list[dict]:
    path = results / "status.json"
    return read_status(path) if path.is_file() else []


@pytest.fixture(scope="module")
def trained(tiny_train_spec, tmp_path_factory) -> Path:
    """A results folder after one finished epoch: model_epoch_000_step_00002.pth and the latest link."""
    folder = tmp_path_factory.mktemp("trained")
    spec = _write_spec(tiny_train_spec, folder, **{"train.num_epochs": 1})
    process = _train(spec)
    assert process.wait(timeout=TIMEOUT) == 0, (folder / "log.txt").read_text()[-3000:]
    results = folder / "results" / "train"
    assert [p.name for p in _checkpoints(results)] == ["model_epoch_000_step_00002.pth"]
    return results


# ---------------------------------------------------------------------------------------------------------------
# the rows


def test_kill_9_supervisor_mid_training(workspace, tiny_train_spec, one_thread):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=_job_spec(tiny_train_spec, **{"train.num_epochs": 50}), automl_policy="off")
    record = _worker_started(bank, job.id)
    results = job.path / "results" / "train"
    _wait_for(lambda: _checkpoints(results))
    os.kill(record["pid"], signal.SIGKILL)
    # the worker dies with its supervisor (PR_SET_PDEATHSIG): nothing trains on unowned
    _assert_no_processes((record["worker_pid"], record["worker_pid_start"]), groups=(record["worker_pid"],))
    seen = SkillBank(workspace).status(job.id)  # another process's view: only the pids are known
    assert seen.status == "error" and "supervisor died" in seen.error and f"job start {job.id}" in seen.error
    saved = _assert_checkpoints_load(results)
    assert saved

    assert bank.start(job.id).record["pid"] != record["pid"]
    assert f"resume_training_checkpoint_path: {saved[-1]}" in (job.path / "spec.yaml").read_text()
    new = _worker_started(bank, job.id)
    assert bank.cancel(job.id, grace_s=60).status == "canceled"
    assert _assert_job_settled(job.path)["status"] == "canceled"
    _assert_no_processes(groups=(new["worker_pid"], new["pid"]))


def test_kill_9_worker(workspace, tiny_data, monkeypatch):
    monkeypatch.setenv("SKILLBANK_JOB_DELAY_S", "120")
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off")
    record = _worker_started(bank, job.id)
    os.kill(record["worker_pid"], signal.SIGKILL)
    done = bank.wait(job.id, timeout=60)
    assert done.status == "error" and "SIGKILL" in done.error and done.record["exit_code"] == -9
    _assert_job_settled(job.path)


def test_sigterm_preempts_cli_training_then_resume_continues(tiny_train_spec, tmp_path):
    spec = _write_spec(tiny_train_spec, tmp_path, **{"train.num_epochs": 50})
    results = tmp_path / "results" / "train"
    process = _train(spec)
    _wait_for(lambda: any(r["status"] == "RUNNING" for r in _status_lines(results)))
    before = _checkpoints(results)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    _assert_no_processes(groups=(process.pid,))

    last = _status_lines(results)[-1]
    assert last["status"] == "PREEMPTED" and last["signal"] == "SIGTERM" and last["resumable"] is True
    saved = Path(last["checkpoint"])
    assert saved.name == f"model_epoch_{last['epoch']:03d}_step_{last['step']:05d}.pth" and saved not in before
    assert (results / LATEST_LINK).resolve() == saved.resolve()
    assert set(before) < set(_assert_checkpoints_load(results))
    assert "Training preempted by SIGTERM" in (tmp_path / "log.txt").read_text()
    assert not any(r["status"] in ("FAILURE", "SUCCESS") for r in _status_lines(results))

    # the same results folder again (its run has ended): training goes on from the saved step to the epoch's end
    epoch, step = last["epoch"], last["step"]
    resumed = _train(spec, f"train.resume_training_checkpoint_path={results / LATEST_LINK}",
                     f"train.num_epochs={epoch + 1}")
    assert resumed.wait(timeout=TIMEOUT) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    lines = _status_lines(results)
    after = lines[[r["status"] for r in lines].index("PREEMPTED") + 1:]
    assert [r["status"] for r in after] == ["STARTED", "RUNNING", "SUCCESS"]
    assert after[0]["epoch"] == epoch and after[1]["epoch"] == epoch and after[1]["step"] > step

    import torch

    final = torch.load(results / LATEST_LINK, weights_only=True, map_location="cpu")
    assert final["global_step"] == after[1]["step"] == 2 * (epoch + 1)  # 2 steps per epoch, none done twice


@pytest.mark.slow
def test_sigusr1_preempts_a_job_then_job_start_resumes(workspace, tiny_train_spec, one_thread):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=_job_spec(tiny_train_spec, **{"train.num_epochs": 50}), automl_policy="off")
    record = _worker_started(bank, job.id)
    results = job.path / "results" / "train"
    _wait_for(lambda: _checkpoints(results))
    os.kill(record["pid"], signal.SIGUSR1)  # SLURM's warning, sent to the job's supervisor
    done = bank.wait(job.id, timeout=TIMEOUT)
    assert done.status == "preempted" and done.error is None and done.record["exit_code"] == 0, bank.logs(job.id)
    assert "Training preempted by SIGUSR1" in done.record["preempted"]
    _assert_job_settled(job.path)
    last = _status_lines(results)[-1]
    assert last["status"] == "PREEMPTED" and last["signal"] == "SIGUSR1"

    bank.start(job.id)
    assert f"resume_training_checkpoint_path: {last['checkpoint']}" in (job.path / "spec.yaml").read_text()
    # the next epoch's line shows the run going on from the saved step, not from the start
    _wait_for(lambda: [r for r in _status_lines(results) if r["status"] == "RUNNING"
                       and r["epoch"] == last["epoch"] and r["step"] > last["step"]])
    restarted = [r for r in _status_lines(results) if r["status"] == "STARTED"][-1]
    assert restarted["epoch"] == last["epoch"]
    assert bank.cancel(job.id, grace_s=60).status == "canceled"
    _assert_job_settled(job.path)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(trained, tiny_train_spec, tmp_path):
    spec = _write_spec(tiny_train_spec, tmp_path, **{"train.num_epochs": 2})
    results = tmp_path / "results" / "train"
    shutil.copytree(trained, results, symlinks=True)
    previous = results / "model_epoch_000_step_00002.pth"
    limit = previous.stat().st_size // 2  # every file this process writes is cut off there: EFBIG, like a full disk

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = _train(spec, f"train.resume_training_checkpoint_path={previous}", preexec_fn=small_disk)
    assert process.wait(timeout=TIMEOUT) == 2, (tmp_path / "log.txt").read_text()[-3000:]
    _assert_no_processes(groups=(process.pid,))
    log = (tmp_path / "log.txt").read_text()
    assert f"no space left in {results}" in log and "checkpoint needs about" in log and " MB)" in log
    assert "Traceback" not in log
    assert _assert_checkpoints_load(results) == [previous]
    assert os.readlink(results / LATEST_LINK) == previous.name
    assert not [p.name for p in results.iterdir() if p.name.endswith(".tmp")]


def test_truncated_newest_checkpoint_on_restart(workspace, trained, tiny_train_spec, one_thread):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=_job_spec(tiny_train_spec, **{"train.num_epochs": 2}), automl_policy="off",
                          start=False)
    bank.cancel(job.id)  # a job that ran before: a restart resolves its newest checkpoint
    results = job.path / "results" / "train"
    results.mkdir(parents=True)
    good = results / "model_epoch_000_step_00002.pth"
    shutil.copyfile(trained / good.name, good)
    truncated = results / "model_epoch_001_step_00004.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    os.symlink(good.name, results / LATEST_LINK)

    bank.start(job.id)
    done = bank.wait(job.id, timeout=TIMEOUT)
    record = json.loads((job.path / "job.json").read_text())
    _assert_no_processes((record["pid"], record["pid_start"]), (record["worker_pid"], record["worker_pid_start"]),
                         groups=(record["pid"], record["worker_pid"]))
    _assert_checkpoints_load(results, skip=(truncated,))
    if done.status == "done":  # the newest readable checkpoint was used
        assert str(good) in (job.path / "spec.yaml").read_text()
    else:  # or a clear error naming the file
        assert done.status == "error" and done.record["exit_code"] == 2, bank.logs(job.id)
        assert str(truncated) in done.error and "Traceback" not in done.error


def test_corrupted_job_json_is_named_and_other_jobs_still_list(workspace, tiny_data):
    bank = SkillBank(workspace)
    broken = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False)
    fine = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False)
    record_file = broken.path / "job.json"
    record_file.write_text(record_file.read_text()[:40])  # cut mid-record

    with pytest.raises(SkillBankError, match=re.escape(str(record_file))):
        bank.status(broken.id)
    problems: list[str] = []
    assert [j.id for j in bank.list_jobs(problems)] == [fine.id]
    assert len(problems) == 1 and str(record_file) in problems[0]

    base = [str(BIN / "skillbank"), "--workspace", str(workspace), "job"]
    status = subprocess.run(base + ["status", broken.id], capture_output=True, text=True, env=_env())
    assert status.returncode == 2 and str(record_file) in status.stderr and "Traceback" not in status.stderr
    listing = subprocess.run(base + ["list"], capture_output=True, text=True, env=_env())
    assert listing.returncode == 1 and fine.id in listing.stdout and broken.id not in listing.stdout
    assert str(record_file) in listing.stderr and "Traceback" not in listing.stderr
    start = subprocess.run(base + ["start", broken.id], capture_output=True, text=True, env=_env())
    assert start.returncode == 2 and str(record_file) in start.stderr and "Traceback" not in start.stderr
    json.loads((fine.path / "job.json").read_text())


def _job_processes(job_dir: Path) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live supervisors and workers of the job folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except OSError:
                continue
            if "runner.job_process" in argv and str(job_dir) in argv:
                found.append((int(entry.name), argv))
    return found


def test_five_concurrent_job_starts_give_one_supervisor(workspace, tiny_data):
    bank = SkillBank(workspace)
    job = bank.create_job("train", spec=tiny_data["spec"], automl_policy="off", start=False)
    command = [str(BIN / "skillbank"), "--workspace", str(workspace), "job", "start", job.id]
    env = _env(SKILLBANK_JOB_DELAY_S="120")
    starts = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(5)]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in starts]
    assert sorted(code for code, _, _ in outcomes) == [0, 2, 2, 2, 2], outcomes
    record = _worker_started(bank, job.id)
    for code, _, err in outcomes:
        if code == 2:
            assert f"job {job.id} is already running (pid " in err and "Traceback" not in err
    holders = {int(err.split("already running (pid ")[1].split(",")[0]) for code, _, err in outcomes if code == 2}
    assert holders <= {record["pid"]} | {p.pid for p in starts}  # the supervisor, or the start handing it over
    processes = _job_processes(job.path)
    supervisors = [pid for pid, argv in processes if "--worker" not in argv]
    workers = [pid for pid, argv in processes if "--worker" in argv]
    assert supervisors == [record["pid"]] and workers == [record["worker_pid"]], processes
    assert bank.cancel(job.id).status == "canceled"
    _assert_job_settled(job.path)
    assert _job_processes(job.path) == []


def test_second_cli_run_on_one_results_folder_is_refused(tiny_train_spec, tmp_path):
    spec = _write_spec(tiny_train_spec, tmp_path, **{"train.num_epochs": 50})
    results = tmp_path / "results" / "train"
    first = _train(spec)
    lock = results / RESULTS_LOCK
    _wait_for(lambda: (results / "experiment.yaml").is_file() and lock.is_file() and lock.read_text().strip())
    holder = int(lock.read_text())
    kept = [results / "experiment.yaml", lock]  # the first run writes them once, at its start
    before = [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in kept]

    second = subprocess.run([str(BIN / "grounding_dino"), "train", "-e", str(spec)], capture_output=True, text=True,
                            env=_env(), cwd=REPO, timeout=TIMEOUT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"results folder {results} is in use by another run (pid {holder}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None and process_alive(holder)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in kept] == before  # nothing rewritten

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _assert_no_processes(groups=(first.pid,))
    _assert_checkpoints_load(results)
    os.close(take_lock(lock))  # the run has ended: the folder is free for a resume
