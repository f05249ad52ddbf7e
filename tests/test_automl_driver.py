"""AutoML driver: budget, pruning, best model and report, resume after a crash, several workers on one study.

Fast tests inject a cheap `run_trial` (the driver's own hook); the slow ones run real Grounding DINO training
through the default trial runner (a child process per trial with the pruning callback).
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from runner.automl import run_automl
from runner.automl.study import OWNER_ATTR, open_storage, redact, storage_url
from runner.automl.worker import main as worker_main
from sdk.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "model_epoch_001_step_00004.pth"
DELAY_ENV = "AUTOML_TEST_TRIAL_SECONDS"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def cheap_trial(trial, spec, trial_dir):
    """Two 'epochs' whose value peaks at lr = 1e-4; writes a checkpoint file like training does."""
    import math

    (trial_dir / "started").write_text(str(os.getpid()))
    lr = spec["train"]["optim"]["lr"]
    value = 0.0
    for epoch in (1, 2):
        time.sleep(float(os.environ.get(DELAY_ENV, "0")))
        value = 1.0 / (1.0 + abs(math.log10(lr) + 4.0)) + 0.01 * epoch
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    (trial_dir / CHECKPOINT).write_bytes(f"weights of trial {trial.number}".encode())
    trial.set_user_attr("checkpoint", CHECKPOINT)
    return value


def _spec(results: Path, **automl) -> dict:
    settings = {"max_trials": 3, "algorithm": "tpe", "seed": 0,
                "automl_hyperparameters": ["train.optim.lr", "train.optim.weight_decay"], **automl}
    return {"results_dir": str(results), "train": {"num_epochs": 2}, "automl": settings}


def _study(results: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(None, results))


def _states(study: optuna.Study) -> dict:
    return {state: [t.number for t in study.trials if t.state == state] for state in TrialState}


# ------------------------------------------------------------------------------------------------ one driver
def test_study_prunes_a_forced_bad_trial_and_exports_the_best(tmp_path, capsys):
    results = tmp_path / "results"
    spec = _spec(results, algorithm="hyperband", max_trials=3)
    seeded = optuna.create_study(study_name="s", storage=storage_url(None, results), direction="maximize")
    seeded.enqueue_trial({"train.optim.lr": 1e-4, "train.optim.weight_decay": 1e-4})  # the best possible
    seeded.enqueue_trial({"train.optim.lr": 1e-5, "train.optim.weight_decay": 1e-4})  # forced bad

    study = run_automl(spec, run_trial=cheap_trial, study_name="s")

    states = _states(study)
    assert len(study.trials) == 3 and len(states[TrialState.COMPLETE]) + len(states[TrialState.PRUNED]) == 3
    assert 1 in states[TrialState.PRUNED]
    assert study.trials[1].last_step == 1  # stopped after its first epoch
    best = json.loads((results / "best_model" / "best_automl.json").read_text())
    assert best["trial"] == 0 and best["checkpoint"] == CHECKPOINT and best["metric"] == "val_mAP50"
    assert best["params"] == {"train.optim.lr": 1e-4, "train.optim.weight_decay": 1e-4}
    assert best["value"] == pytest.approx(study.best_value)
    assert (results / "best_model" / CHECKPOINT).read_bytes() == b"weights of trial 0"
    report = (results / "automl_report.md").read_text()
    assert "| 1 | PRUNED |" in report and "`train.optim.momentum`" not in report
    for plot in ("optimization_history.png", "intermediate_values.png"):
        assert (results / plot).read_bytes()[:4] == b"\x89PNG", plot
    if len(states[TrialState.COMPLETE]) < 2:
        assert "param importances: needs at least 2 completed trials" in report
    out = capsys.readouterr().out
    assert "trial 0 COMPLETE val_mAP50=1.0200" in out and "1/3 trials done" in out
    assert "trial 1 PRUNED at epoch 1" in out and "3/3 trials done" in out


def test_default_space_and_report_list_excluded_keys(tmp_path):
    results = tmp_path / "results"
    spec = _spec(results, max_trials=2, automl_hyperparameters=[])
    study = run_automl(spec, run_trial=cheap_trial)
    assert study.study_name == "results"  # no job folder: the results folder names the study
    assert "train.optim.momentum" not in study.trials[0].params
    report = (results / "automl_report.md").read_text()
    assert "## Not searched" in report and "| `train.optim.momentum` | the AdamW optimizer" in report
    assert "| `model.num_select` | post-processing only" in report
    assert "## Parameter importance\n\nPED-ANOVA" in report
    for plot in ("optimization_history.png", "intermediate_values.png", "param_importances.png",
                 "parallel_coordinate.png"):
        assert (results / plot).read_bytes()[:4] == b"\x89PNG", plot


def test_failed_trials_count_and_the_last_error_is_reported(tmp_path):
    def broken(trial, spec, trial_dir):
        raise ValueError(f"no data for trial {trial.number}")

    with pytest.raises(RuntimeError, match="no completed trial; last error: ValueError: no data for trial 1"):
        run_automl(_spec(tmp_path / "r", max_trials=2), run_trial=broken)
    study = _study(tmp_path / "r", "r")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert "no data for trial 0" in (tmp_path / "r" / "automl_report.md").read_text()


def test_timeout_stops_starting_trials(tmp_path, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "0.6")
    run_automl(_spec(tmp_path / "r", max_trials=50, timeout=1), run_trial=cheap_trial)
    assert len(_study(tmp_path / "r", "r").trials) == 1


def test_bayesian_algorithm_runs_gp(tmp_path):
    study = run_automl(_spec(tmp_path / "r", max_trials=3, algorithm="bayesian"), run_trial=cheap_trial)
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    assert len(study.trials) == 3


def test_resume_fails_a_dead_running_trial_and_reruns_its_parameters(tmp_path):
    results = tmp_path / "results"
    run_automl(_spec(results, max_trials=2), run_trial=cheap_trial)
    study = _study(results, "results")
    finished = {t.number: t.value for t in study.trials}
    # a trial left RUNNING by a process that is gone (as after SIGKILL)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"train.optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
                        "train.optim.weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    orphan.set_user_attr(OWNER_ATTR, {"host": socket.gethostname(), "pid": dead.pid})

    study = run_automl(_spec(results, max_trials=3), run_trial=cheap_trial)

    trials = study.trials
    assert {n: trials[n].value for n in finished} == finished  # finished trials kept as they were
    assert trials[2].state == TrialState.FAIL
    assert trials[3].state == TrialState.COMPLETE and trials[3].params == trials[2].params
    assert trials[3].system_attrs["failed_trial"] == 2
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


# ------------------------------------------------------------------------------------------------ processes
DRIVER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_automl_driver import cheap_trial
from runner.automl import run_automl
run_automl(sys.argv[1], run_trial=cheap_trial, storage=sys.argv[2] if len(sys.argv) > 2 else None)
"""


def _driver(tmp_path: Path, spec: dict, storage=None, delay="0.25") -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT.format(tests=str(REPO / "tests")))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO), **{DELAY_ENV: delay})
    return subprocess.Popen([sys.executable, str(script), str(spec_file)] + ([storage] if storage else []),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"driver exited ({process.returncode}) before {path}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {seconds} s")
        time.sleep(0.1)


def test_sigkill_during_trial_2_then_restart_completes_without_losing_trials(tmp_path):
    results = tmp_path / "results"
    spec = _spec(results, max_trials=3)
    first = _driver(tmp_path, spec)
    _wait_for(results / "trial_1" / "started", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    study = _study(results, "results")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    kept = study.trials[0].value

    second = _driver(tmp_path, spec)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert "trial 1 was left running by a dead process" in output
    trials = _study(results, "results").trials
    assert trials[0].value == kept
    assert trials[1].state == TrialState.FAIL and trials[2].params == trials[1].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert (results / "best_model" / "best_automl.json").is_file()


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_share_one_study(tmp_path, storage):
    results = tmp_path / "results"
    url = str(tmp_path / "study.journal") if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(results, max_trials=4)
    workers = []
    for name in ("w0", "w1"):
        (tmp_path / name).mkdir()
        workers.append(_driver(tmp_path / name, spec, storage=url))
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    study = optuna.load_study(study_name="results", storage=open_storage(url))
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4  # the budget is shared, not per worker
    assert len({t.number for t in counted}) == 4
    assert len({t.user_attrs[OWNER_ATTR]["pid"] for t in counted}) == 2  # both workers ran trials
    assert all(t.user_attrs.get("automl_surplus") for t in study.trials if t.state == TrialState.FAIL)


# ------------------------------------------------------------------------------------------------ small pieces
def test_storage_urls():
    with pytest.raises(SpecError, match="automl.storage.*database URL"):
        open_storage("results/study.db")
    assert redact("postgresql://ann:secret@db:5432/hpo") == "postgresql://ann:***@db:5432/hpo"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_worker_cli_errors_exit_2(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"automl": {"algorithm": "grid"}, "results_dir": str(tmp_path / "r")}))
    assert worker_main(["worker", "--study", "s", "--storage", str(tmp_path / "s.journal"), "-e", str(spec)]) == 2
    assert "automl.algorithm" in capsys.readouterr().err
    assert worker_main(["worker", "--study", "s", "--storage", "x.journal", "-e", str(tmp_path / "none.yaml")]) == 2


def test_skillbank_cli_delegates_automl_worker(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"automl": {"storage": None}, "bogus": 1}))
    run = subprocess.run([sys.executable, "-m", "runner.cli", "automl", "worker", "--study", "s", "--storage",
                          str(tmp_path / "s.journal"), "-e", str(spec)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "bogus" in run.stderr
