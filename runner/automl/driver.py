"""The AutoML driver: an Optuna study in which each trial is one training run in `<results>/trial_<n>/`.

Every worker (the job's own driver and any `skillbank automl worker`) runs the same loop: fail and re-enqueue
trials whose process died, stop when the study's budget is used (counted from the storage, so several workers
share it), else run one trial. After each trial it prints a summary line and copies the best trial's checkpoint to
`<results>/best_model/` with `best_automl.json`; at the end it writes `automl_report.md` and its plots.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import optuna
from optuna.trial import FrozenTrial, TrialState

from grounding_dino.config import load_experiment, to_dict
from grounding_dino.layout import BEST_AUTOML, BEST_MODEL_DIR, JOB_RECORD, JOB_SPEC, replace_atomically
from runner.automl.report import write_report
from runner.automl.search_space import apply_params, build_search_space, get_path
from runner.automl.study import (CHECKPOINT_ATTR, ERROR_ATTR, HEARTBEAT_INTERVAL, OWNER_ATTR, PARAMS_ATTR,
                                 SURPLUS_ATTR, TRIAL_DIR_ATTR, budget_used, fail_dead_trials, open_storage, open_study,
                                 owner, redact, storage_url)
from sdk.errors import SpecError
from sdk.spec import load_spec

# run_trial(trial, spec, trial_dir) -> metric value. It trains with the trial's spec, reports intermediate values
# through `trial` (raising optuna.TrialPruned when told to stop) and records CHECKPOINT_ATTR.
RunTrial = Callable[[optuna.Trial, Dict[str, Any], Path], float]


class StudyFull(Exception):
    """Another worker took the last trial of the budget while this one was asking for a trial."""


def run_automl(
    source: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    run_trial: Optional[RunTrial] = None,
    schema: Optional[Mapping[str, Any]] = None,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: Optional[int] = None,
) -> optuna.Study:
    """Run (or resume, or join) the AutoML study of a train spec until its budget is used; returns the study.

    source: a job folder (with spec.yaml, and job.json for the default study name), a spec YAML file or a spec
    dict. storage / study_name override automl.storage / automl.study_name (as `skillbank automl worker` does).
    run_trial: how one trial runs; default: real training (runner.automl.training.train_trial).
    """
    spec, root, default_name = _load(source)
    settings = spec["automl"]
    url = storage_url(storage or settings["storage"], root)
    name = study_name or settings["study_name"] or default_name
    metric = settings["metric"]
    max_trials = settings["max_trials"]
    if run_trial is None:
        from runner.automl.training import train_trial as run_trial
    space = build_search_space(spec, schema)
    backend = open_storage(url, heartbeat_interval, grace_period)
    seed = settings["seed"] if settings["seed"] is not None else spec["train"]["seed"]
    # Trials (and their child processes) find the study through the spec they run with.
    settings.update(storage=url, study_name=name, seed=seed)
    # Our own lines (one per trial, one per epoch) replace Optuna's per-trial INFO log.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    baseline = space.spec_point(spec) if settings["spec_values_first"] else None
    study, created = open_study(backend, name, settings["algorithm"], seed, spec["train"]["num_epochs"], baseline)
    _log(f"study {name!r} in {redact(url)}: {settings['algorithm']}, "
         f"maximise {metric}, {max_trials} trials; searching {', '.join(space.keys)}")
    for key, reason in space.excluded:
        _log(f"not searched: {key}: {reason}")
    if baseline and created:
        _log("the first trial runs the spec's own values (the baseline): "
             + ", ".join(f"{k}={_fmt(get_path(spec, k))}" for k in baseline))

    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        if budget_used(study.get_trials(deepcopy=False), before=trial.number) >= max_trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise StudyFull(f"the study already has {max_trials} trials")
        trial.set_user_attr(OWNER_ATTR, owner())
        values = space.sample(trial)
        trial.set_user_attr(PARAMS_ATTR, values)
        trial_dir = root / f"trial_{trial.number}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr(TRIAL_DIR_ATTR, str(trial_dir.resolve()))
        _log(f"trial {trial.number} started: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        try:
            return run_trial(trial, trial_spec(spec, values, trial_dir), trial_dir)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}")
            raise

    started = time.monotonic()
    timeout = settings["timeout"]
    poll, announced = 2, None  # seconds; a query per poll
    while True:
        for number in fail_dead_trials(study, backend):
            _log(f"trial {number} was left running by a dead process: marked FAIL, its parameters queued again")
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and budget_used(trials) >= max_trials:
            running = _others_running(trials, backend)
            if not running or (timeout is not None and time.monotonic() - started >= timeout):
                break
            # A worker that dies now leaves its trial to be retried: stay until the running ones end or go stale.
            if running != announced:
                _log(f"the budget is taken; waiting for trial(s) {', '.join(map(str, running))} of other workers "
                     "(a dead one's parameters run again here)")
                announced = running
            time.sleep(poll)
            continue
        if timeout is not None and time.monotonic() - started >= timeout:
            _log(f"automl.timeout of {timeout} s reached: no new trials")
            break
        begun = time.monotonic()
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        trial = next((t for t in study.get_trials(deepcopy=False) if ran and t.number == ran[-1]), None)
        if trial is None or trial.user_attrs.get(SURPLUS_ATTR):
            break
        _log(_summary(study, trial, time.monotonic() - begun, metric, max_trials))
        export_best(study, root, metric)

    best = export_best(study, root, metric)
    root.mkdir(parents=True, exist_ok=True)  # a worker that joined a full study ran nothing here yet
    write_report(study, root, space, metric=metric, algorithm=settings["algorithm"],
                 storage=redact(url))
    if best is None:
        errors = [t.user_attrs[ERROR_ATTR] for t in study.get_trials(deepcopy=False) if ERROR_ATTR in t.user_attrs]
        raise RuntimeError(f"AutoML study {name!r} has no completed trial"
                           + (f"; last error: {errors[-1]}" if errors else ""))
    return study


def _others_running(trials, storage) -> list[int]:
    """Numbers of RUNNING trials whose end this worker can wait for: all of them where heartbeats show a dead
    worker on any host (RDB storages), else only those of live processes on this host."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    watched = isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)
    host = socket.gethostname()
    return [t.number for t in trials if t.state == TrialState.RUNNING
            and (watched or t.user_attrs.get(OWNER_ATTR, {}).get("host") == host)]


def trial_spec(spec: Mapping[str, Any], values: Mapping[str, Any], trial_dir: Path) -> Dict[str, Any]:
    """The spec one trial trains with: the sampled values, its own results folder, a fresh start, and (as in TAO)
    a checkpoint at every validation so the best validated epoch has a file."""
    out = apply_params(spec, values)
    out["results_dir"] = str(trial_dir)
    train = out["train"]
    train["results_dir"] = str(trial_dir)
    train["resume_training_checkpoint_path"] = None
    train["checkpoint_interval"] = train["validation_interval"]
    train["checkpoint_interval_unit"] = "epoch"
    return out


def export_best(study: optuna.Study, root: Path, metric: str) -> Optional[FrozenTrial]:
    """Copy the best completed trial's checkpoint to `<root>/best_model/` with best_automl.json.

    `parent_model` of a child job (evaluate, export, ...) finds the checkpoint there. Returns the best trial, or
    None while no trial has completed.
    """
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    best = max(completed, key=lambda t: (t.value, -t.number))
    name = best.user_attrs.get(CHECKPOINT_ATTR)
    if not name:
        raise RuntimeError(f"trial {best.number} completed without recording its checkpoint "
                           f"(user attr {CHECKPOINT_ATTR!r}); its run_trial must set it")
    folder = root / BEST_MODEL_DIR
    info_file = folder / BEST_AUTOML
    if info_file.is_file() and (folder / name).is_file() and json.loads(info_file.read_text())["trial"] == best.number:
        return best
    candidates = [root / f"trial_{best.number}" / name]
    if best.user_attrs.get(TRIAL_DIR_ATTR):
        candidates.append(Path(best.user_attrs[TRIAL_DIR_ATTR]) / name)
    source = next((path for path in candidates if path.is_file()), None)
    if source is None:
        trial_host = best.user_attrs.get(OWNER_ATTR, {}).get("host", "an unknown host")
        _log(f"best trial {best.number} (ran on {trial_host}) has no readable checkpoint at "
             f"{' or '.join(str(path) for path in candidates)}: best_model/ is left to a worker that can read it "
             "(give workers the job's results_dir, shared between machines)")
        return best
    folder.mkdir(parents=True, exist_ok=True)
    # Workers on several machines may copy at once into a shared folder: each writes its own temporary file.
    partial = folder / f".{name}.{socket.gethostname()}.{os.getpid()}.partial"
    shutil.copyfile(source, partial)
    os.replace(partial, folder / name)
    for old in folder.glob("*.pth"):
        if old.name != name:
            old.unlink(missing_ok=True)
    info = {
        "study": study.study_name,
        "trial": best.number,
        "metric": metric,
        "value": best.value,
        "params": best.user_attrs.get(PARAMS_ATTR, {}),
        "checkpoint": name,
        "source": str(source.relative_to(root)) if source.is_relative_to(root) else str(source),
    }
    replace_atomically(info_file, json.dumps(info, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return best


def _load(source) -> tuple[Dict[str, Any], Path, str]:
    """(full spec with defaults, results root, default study name) from a job folder, YAML file or dict."""
    job_dir = None
    if isinstance(source, Mapping):
        raw, where = dict(source), "<spec>"
    else:
        path = Path(source)
        if path.is_dir():
            job_dir, path = path, path / JOB_SPEC
        raw, where = load_spec(path), str(path)
    spec = to_dict(load_experiment(raw))
    if spec["results_dir"] is None:
        if job_dir is None:
            raise SpecError.single("results_dir", None, f"{where}: AutoML needs a results folder for its study, "
                                                        "trials and best model; set results_dir")
        spec["results_dir"] = str(job_dir / "results")
    root = Path(spec["results_dir"])
    name = root.name
    if job_dir is not None:
        job_file = job_dir / JOB_RECORD
        name = json.loads(job_file.read_text()).get("id", job_dir.name) if job_file.is_file() else job_dir.name
    return spec, root, name


def _summary(study: optuna.Study, trial: FrozenTrial, seconds: float, metric: str, max_trials: int) -> str:
    state = trial.state.name
    if trial.state == TrialState.COMPLETE:
        outcome = f"{metric}={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        step = trial.last_step
        outcome = f"at epoch {step}, {metric}={trial.intermediate_values[step]:.4f}" if step is not None else ""
    else:
        outcome = trial.user_attrs.get(ERROR_ATTR, "no error recorded")
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(completed, key=lambda t: (t.value, -t.number), default=None)
    best_text = f"best: trial {best.number} {metric}={best.value:.4f}" if best else "no trial completed yet"
    done = budget_used([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    return f"trial {trial.number} {state} {outcome} ({seconds:.1f} s) | {best_text} | {done}/{max_trials} trials done"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _log(message: str) -> None:
    print(f"[automl] {message}", flush=True)
