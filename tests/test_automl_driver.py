"""AutoML driver: budget, pruning, best model and report, resume after a crash, several workers on one study.

Fast tests inject a cheap `run_trial` (the driver's own hook); the slow ones run real Grounding DINO training
through the default trial runner (a child process per trial with the pruning callback).
"""
from __future__ import annotations

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
from runner.automl.study import OWNER_ATTR, open_storage, open_study, redact, storage_url
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


def test_the_first_trial_runs_the_spec_values_unless_turned_off(tmp_path, capsys):
    spec = _spec(tmp_path / "on", max_trials=2)
    spec["train"]["optim"] = {"lr": 3e-4, "weight_decay": 2e-4}
    study = run_automl(spec, run_trial=cheap_trial)
    assert study.trials[0].params == {"train.optim.lr": 3e-4, "train.optim.weight_decay": 2e-4}
    assert study.trials[1].params != study.trials[0].params
    assert "the first trial runs the spec's own values (the baseline): train.optim.lr=0.0003" in capsys.readouterr().out
    spec = _spec(tmp_path / "off", max_trials=1, spec_values_first=False)
    spec["train"]["optim"] = {"lr": 3e-4, "weight_decay": 2e-4}
    assert run_automl(spec, run_trial=cheap_trial).trials[0].params["train.optim.lr"] != 3e-4


def test_only_the_worker_that_creates_the_study_queues_the_baseline(tmp_path):
    # workers started together all find an empty study; had each queued the spec's values, the baseline would run
    # once per worker (a CI run saw two completed trials with the same parameters)
    storage = open_storage(storage_url(None, tmp_path))
    baseline = {"train.optim.lr": 3e-4}
    for _ in range(3):
        study, _ = open_study(storage, "s", "tpe", 0, 2, first_point=baseline)
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == [baseline]


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


def lightning_trial(trial, spec, trial_dir):
    """A real Lightning fit whose val_mAP50 is a function of lr, pruned through PruningCallback."""
    import math

    import torch
    from lightning.pytorch import LightningModule, Trainer

    from runner.automl.pruning import PruningCallback

    score = 1.0 / (1.0 + abs(math.log10(spec["train"]["optim"]["lr"]) + 4.0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=1)

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            self.log("val_mAP50", score)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    epochs = spec["train"]["num_epochs"]
    callback = PruningCallback(trial, "val_mAP50", epochs)
    trainer = Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Tiny(), train_dataloaders=data, val_dataloaders=data)
    trial.set_user_attr("epochs_trained", trainer.current_epoch)
    if callback.pruned_at is not None:
        raise optuna.TrialPruned()
    (trial_dir / CHECKPOINT).write_bytes(b"tiny")
    trial.set_user_attr("checkpoint", CHECKPOINT)
    return callback.history[-1][2]


def test_pruning_callback_stops_lightning_and_the_trial_is_pruned(tmp_path, capsys):
    results = tmp_path / "results"
    seeded = optuna.create_study(study_name="s", storage=storage_url(None, results), direction="maximize")
    seeded.enqueue_trial({"train.optim.lr": 1e-4, "train.optim.weight_decay": 1e-4})
    seeded.enqueue_trial({"train.optim.lr": 1e-5, "train.optim.weight_decay": 1e-4})
    study = run_automl(_spec(results, algorithm="hyperband", max_trials=2), run_trial=lightning_trial, study_name="s")
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and good.user_attrs["epochs_trained"] == 2
    assert good.intermediate_values == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert bad.state == TrialState.PRUNED and bad.user_attrs["epochs_trained"] == 1  # epoch 2 never ran
    assert bad.intermediate_values == {1: pytest.approx(0.5)}
    out = capsys.readouterr().out
    assert "[automl] trial 0 epoch 2/2 val_mAP50=1.0000" in out
    assert "[automl] trial 1 epoch 1/2 val_mAP50=0.5000, pruned" in out


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


def test_a_late_worker_with_another_results_dir_copies_the_best_from_the_recorded_trial_folder(tmp_path, capsys):
    """The run-automl skill's worker command: the job's study is already full and the worker's spec names another
    results_dir. It copies best_model/ from where the trial ran instead of failing on a missing file."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_automl(_spec(tmp_path / "job", max_trials=2), run_trial=cheap_trial, storage=url, study_name="s")
    (tmp_path / "job" / "best_model").rename(tmp_path / "job" / "kept")

    study = run_automl(_spec(tmp_path / "worker", max_trials=2), run_trial=cheap_trial, storage=url, study_name="s")

    assert len(study.trials) == 2
    best = json.loads((tmp_path / "worker" / "best_model" / "best_automl.json").read_text())
    copied = (tmp_path / "worker" / "best_model" / CHECKPOINT).read_bytes()
    assert copied == f"weights of trial {best['trial']}".encode()
    assert best["source"] == str((tmp_path / "job" / f"trial_{best['trial']}" / CHECKPOINT).resolve())
    assert not (tmp_path / "worker" / "trial_0").exists()

    for trial in (tmp_path / "job").glob("trial_*"):
        (trial / CHECKPOINT).unlink()
    capsys.readouterr()
    run_automl(_spec(tmp_path / "third", max_trials=2), run_trial=cheap_trial, storage=url, study_name="s")
    assert "has no readable checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "third" / "best_model").exists()


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


# ------------------------------------------------------------------------------------------------ real training
@pytest.fixture(scope="module")
def fit_data(tmp_path_factory) -> dict:
    """Eight 128 px images of one class ("red circle", one per image), used to train and to validate: a tiny
    model scores val mAP50 > 0 within 16 steps, so a good trial and a bad one differ after one epoch."""
    from grounding_dino.data.synthetic import generate

    root = tmp_path_factory.mktemp("automl_fit")
    return generate(str(root), num_train=0, num_val=8, image_size=128, max_objects=1, seed=0, colors=("red",),
                    shapes=("circle",))


def _real_spec(tiny_train_spec, fit_data, results: Path, fast: bool = False, **automl) -> dict:
    """fast: 1+1 layers, 32 text tokens, 8 steps per epoch, for tests that need trials to run, not to learn."""
    val = {"image_dir": fit_data["val_image_dir"], "json_file": fit_data["val_json_file"]}
    model = dict(tiny_train_spec["model"])
    if fast:
        model.update(enc_layers=1, dec_layers=1, max_text_len=32)
    size = {"scales": [128], "train_random_resize": [128], "train_random_crop_min": 128,
            "train_random_crop_max": 128, "random_resize_max_size": 128, "test_random_resize": 128,
            "horizontal_flip_prob": 0.0}
    return {
        "results_dir": str(results),
        "model": model,
        # the same 8 images twice: 16 steps per epoch at batch 1
        "dataset": {"train_data_sources": [val] if fast else [val, val], "val_data_sources": val, "batch_size": 1,
                    "workers": 0,
                    "augmentation": size},
        "train": {"num_epochs": 2, "activation_checkpoint": False,
                  "optim": {"lr": 1e-3, "lr_backbone": 1e-3, "lr_steps": [100]}},
        "automl": {"max_trials": 3, "algorithm": "tpe", "automl_hyperparameters": ["train.optim.lr"], **automl},
    }


def _pids_running(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_real_training_study_prunes_a_bad_trial(tiny_train_spec, fit_data, tmp_path):
    import torch

    results = tmp_path / "results"
    spec = _real_spec(tiny_train_spec, fit_data, results, algorithm="hyperband")
    seeded = optuna.create_study(study_name="real", storage=storage_url(None, results), direction="maximize")
    seeded.enqueue_trial({"train.optim.lr": 1e-3})
    seeded.enqueue_trial({"train.optim.lr": 1e-9})  # forced bad (below the range): the model hardly moves

    study = run_automl(spec, study_name="real")

    trials = study.trials
    assert len(trials) == 3 and trials[0].state == TrialState.COMPLETE and trials[0].value > 0
    assert trials[1].params["train.optim.lr"] == 1e-9
    assert trials[1].state == TrialState.PRUNED and trials[1].last_step == 1
    bad_dir = results / "trial_1"
    assert sorted(p.name for p in bad_dir.glob("model_epoch_*.pth")) == ["model_epoch_000_step_00016.pth"]
    assert json.loads((bad_dir / "automl_trial.json").read_text())["pruned_at"] == 1
    best = json.loads((results / "best_model" / "best_automl.json").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    checkpoint = torch.load(results / "best_model" / best["checkpoint"], weights_only=True, map_location="cpu")
    assert checkpoint["model_config"]["hidden_dim"] == 64
    assert "| 1 | PRUNED |" in (results / "automl_report.md").read_text()


@pytest.mark.slow
def test_real_training_driver_killed_in_trial_2_resumes_and_leaves_no_orphan(tiny_train_spec, fit_data, tmp_path):
    results = tmp_path / "results"
    spec = _real_spec(tiny_train_spec, fit_data, results, fast=True, max_trials=2)
    spec["train"]["num_epochs"] = 1
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "runner.cli", "automl", "worker", "--study", "k", "--storage",
               storage_url(None, results), "-e", str(spec_file)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(results / "trial_1" / "status.json", first, seconds=600)  # trial 2 is training
    marker = str(results / "trial_1" / "trial_spec.yaml")
    assert _pids_running(marker)
    first.send_signal(signal.SIGKILL)
    first.wait()
    while _pids_running(marker):  # an orphan that never ends is caught by pytest-timeout (pyproject)
        time.sleep(0.2)
    assert not _pids_running(marker), "the trial's training outlived the killed driver"
    kept = _study(results, "k").trials[0]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    trials = _study(results, "k").trials
    assert trials[0].value == kept.value and trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL and trials[2].params == trials[1].params
    assert [t.state for t in trials[2:]] == [TrialState.COMPLETE]
    assert (results / "best_model" / "best_automl.json").is_file()
