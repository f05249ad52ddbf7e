"""The Optuna study behind an AutoML job: storage, sampler and pruner, and the trial budget shared by workers.

Storage: SQLite in the job folder by default; any RDB URL (postgresql://..., sqlite:///...) or a `.journal` file
(several processes on one machine). Several workers may share a study, so the budget (`automl.max_trials`) is
counted from the storage, never per process.

Trials left RUNNING by a dead process are failed and re-enqueued with the same parameters. Two mechanisms find
them: each trial records its owner (host, pid) so a worker on the same host sees at once that the owner is gone
(this covers SQLite and journal files, and a restart right after a crash); RDB storages also keep Optuna's
heartbeat, which finds dead workers on other hosts once `grace_period` has passed (checked by every worker
before each trial, so a worker restarted on another host also retries them).
"""
from __future__ import annotations

import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sdk.errors import SpecError
from sdk.jobs import process_alive

DEFAULT_DB = "automl_study.db"
# Trial user attributes.
OWNER_ATTR = "automl_owner"  # {host, pid} of the worker running the trial
SURPLUS_ATTR = "automl_surplus"  # set on a trial refused because the budget was already full
PARAMS_ATTR = "spec_params"  # the spec values a trial ran with (a weighted choice is a uniform draw in Optuna)
CHECKPOINT_ATTR = "checkpoint"  # file name, inside the trial folder, of the trial's best checkpoint
TRIAL_DIR_ATTR = "trial_dir"  # absolute trial folder: a worker with another results_dir still finds the checkpoint
ERROR_ATTR = "error"  # why a trial failed
HEARTBEAT_INTERVAL = 60


def storage_url(url: Optional[str], root: Path) -> str:
    """`automl.storage`, or by default SQLite in the results folder `root`."""
    if url is not None:
        return url
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / DEFAULT_DB).resolve()}"


def open_storage(url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: Optional[int] = None) -> optuna.storages.BaseStorage:
    """The storage at `url`: a database URL or a .journal file."""
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise SpecError.single("automl.storage", url, "expected a database URL (sqlite:///path.db, "
                                                      "postgresql://user@host/db) or a path ending in .journal")
    engine_kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Workers and the heartbeat thread write concurrently; wait for SQLite's lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                # Heartbeats have been "experimental" since Optuna 2.8; they are how Optuna finds dead workers.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                )
        except (OperationalError, IntegrityError, ProgrammingError):
            # Workers started together race to create the tables of a new database ("table already exists",
            # "UNIQUE constraint failed: alembic_version"; PostgreSQL: DuplicateTable, a ProgrammingError); the
            # loser finds them on the next try.
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)


def redact(url: Optional[str]) -> Optional[str]:
    """A storage URL safe to print: any password replaced by ***."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url) if url else url


# ----------------------------------------------------------------------------------------------------------------
# algorithms: automl.algorithm -> (sampler, pruner)


def _tpe(seed: Optional[int], epochs: int):
    return optuna.samplers.TPESampler(seed=seed), optuna.pruners.NopPruner()


def _bayesian(seed: Optional[int], epochs: int):
    missing = [name for name in ("torch", "scipy") if not _importable(name)]
    if missing:
        raise SpecError.single("automl.algorithm", "bayesian", f"Optuna's GPSampler needs {' and '.join(missing)}; "
                                                               "pip install them or use algorithm tpe")
    return optuna.samplers.GPSampler(seed=seed), optuna.pruners.NopPruner()


def _hyperband(seed: Optional[int], epochs: int):
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.samplers.TPESampler(seed=seed), pruner


def _asha(seed: Optional[int], epochs: int):
    # Asynchronous successive halving: one bracket, so every trial is compared at epochs 1, 3, 9, ... (Hyperband
    # spreads trials over brackets whose first comparison comes later, hedging against a noisy first epoch).
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.samplers.TPESampler(seed=seed), pruner


def _random(seed: Optional[int], epochs: int):
    return optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()


ALGORITHMS: Dict[str, Callable[[Optional[int], int], Tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]]]
ALGORITHMS = {"tpe": _tpe, "bayesian": _bayesian, "hyperband": _hyperband, "asha": _asha, "random": _random}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def open_study(storage, name: str, algorithm: str, seed: Optional[int], epochs: int,
               first_point: Optional[Dict[str, Any]] = None) -> Tuple[optuna.Study, bool]:
    """(the study, whether this process created it): created, or loaded when it exists (a restart or another
    worker), finished trials kept.

    Only the process that creates the study samples from `seed` and queues `first_point` (the spec's own values).
    One that joins it (another worker, or a restart) samples with fresh randomness: started from the same seed, it
    would draw the points the study already tried. Were joiners to queue `first_point` when they find no trial,
    workers started together would each queue it (Optuna's skip_if_exists is check-then-insert, not atomic) and the
    baseline would run twice.
    """
    if algorithm not in ALGORITHMS:
        raise SpecError.single("automl.algorithm", algorithm, f"allowed: {', '.join(ALGORITHMS)}")
    sampler, pruner = ALGORITHMS[algorithm](seed, epochs)
    try:
        # creating is atomic in the storage (a unique study name), so of workers started together exactly one wins
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        sampler, pruner = ALGORITHMS[algorithm](None, epochs)
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False
    if first_point:
        study.enqueue_trial(first_point)
    return study, True


# ----------------------------------------------------------------------------------------------------------------
# owners, dead trials and the budget


def owner() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def fail_dead_trials(study: optuna.Study, storage) -> list[int]:
    """Fail RUNNING trials whose owner is gone and enqueue their parameters again: those of a dead process on this
    host, and (RDB storages) those whose heartbeat is older than the grace period, wherever they ran.

    Returns the numbers of the trials failed here (another worker may fail the same trial first; then it is not).
    """
    host = socket.gethostname()
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = trial.user_attrs.get(OWNER_ATTR)
        if who and who["host"] == host and not process_alive(who["pid"]):
            dead.append(trial._trial_id)
    dead += [trial_id for trial_id in _stale_trial_ids(study, storage) if trial_id not in dead]
    return [storage.get_trial(trial_id).number for trial_id in dead if _fail_and_retry(study, storage, trial_id)]


def _stale_trial_ids(study: optuna.Study, storage) -> list[int]:
    """RUNNING trials whose heartbeat stopped more than the grace period ago (none without heartbeats).

    Optuna checks this only when a trial starts; a worker that finds the budget used starts none, so without this
    check a trial whose worker died on another host would stay RUNNING, holding a slot of the budget for good.
    """
    # the same calls as optuna.storages.fail_stale_trials, which fails the trials but does not say which
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(study._study_id))


def _fail_and_retry(study: optuna.Study, storage, trial_id: int) -> bool:
    """Mark a dead trial FAIL and enqueue its parameters; False when another worker got there first."""
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial_id))
    return True


def counts_against_budget(trial: FrozenTrial, retried: set) -> bool:
    """Whether `trial` takes one of automl.max_trials: finished, running or queued, unless it is a dead trial
    that was re-enqueued (its retry takes the place) or a surplus trial refused for an already full study."""
    if trial.user_attrs.get(SURPLUS_ATTR):
        return False
    if trial.state == TrialState.FAIL:
        return trial.number not in retried
    return True


def budget_used(trials: Iterable[FrozenTrial], before: Optional[int] = None) -> int:
    """Budget taken by `trials` (those numbered below `before`, when given: the order in which concurrent workers
    claim slots, so the worker whose trial comes after a full budget knows it is surplus)."""
    trials = list(trials)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return sum(counts_against_budget(t, retried) for t in trials if before is None or t.number < before)
