"""The actions and their one launcher: `run_action(action, spec)`.

Every way of starting an action (the `grounding_dino` CLI, a job's worker, an AutoML trial, the demo) calls
`run_action`. It loads the spec, runs the action's pre-check (grounding_dino.actions.precheck: the model files it
reads), finds the action's results folder, writes the spec that runs as `experiment.yaml` (secrets left out), and
runs the action inside its status.json bookkeeping (STARTED, then SUCCESS or FAILURE). A pre-check that fails raises
grounding_dino.errors.UserError before anything is written.
Training is the exception to the bookkeeping: its status lines come per epoch from Lightning, on rank 0 only
(grounding_dino.callbacks.StatusLogger).

One run per results folder: the launching process holds an exclusive lock on `<results folder>/.run.lock` (layout.
RESULTS_LOCK) from before experiment.yaml is written until the action ends, and a second run on the folder is
refused with the holder's pid (a UserError). The other ranks of a distributed run, on this node or others, take no
lock and leave the folder to rank 0 (another node may have no such folder). A preempted training
(grounding_dino.preemption) ends with exit code 0 and a PREEMPTED status line.

Each registry entry names its function as "module:function", imported on first use, so importing this package (the
CLIs do it before anything heavy) never imports torch. An action function takes the ExperimentConfig and the
`ActionRun` (its results folder and the Report it fills for the SUCCESS line).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import yaml

from grounding_dino.config import (ACTION_SECTIONS, ACTIONS, ExperimentConfig, load_experiment, no_effect_settings,
                                   secret_keys, to_dict)
from grounding_dino.errors import UserError
from grounding_dino.layout import (EXPERIMENT_FILE, RESULTS_LOCK, STATUS_FILE, LockHeld, replace_atomically,
                                   results_dir_for, take_lock)
from grounding_dino.memory import retain_freed_memory
from grounding_dino.status import Report, StatusWriter, reported

from . import precheck

SECRET_KEYS = secret_keys()


@dataclass(frozen=True)
class Entry:
    target: str  # "module:function"
    activity: Optional[str]  # the noun of its status lines ("Starting evaluation."); None: it writes its own
    precheck: Optional[Callable[[ExperimentConfig], None]] = None  # runs before anything is written


REGISTRY: Dict[str, Entry] = {
    "train": Entry("grounding_dino.actions.train:run_training", None, precheck.train),
    "evaluate": Entry("grounding_dino.actions.evaluate:run_evaluate", "evaluation", precheck.evaluate),
    "inference": Entry("grounding_dino.actions.inference:run_inference", "inference", precheck.inference),
    "export": Entry("grounding_dino.actions.export:run_export", "export", precheck.export),
    "quantize": Entry("grounding_dino.actions.quantize:run_quantize", "quantization", precheck.quantize),
    "gen_trt_engine": Entry("grounding_dino.actions.gen_trt_engine:run_gen_trt_engine", "TensorRT engine build",
                            precheck.gen_trt_engine),
}
assert set(REGISTRY) == set(ACTIONS), "every spec action has exactly one entry"


class ActionError(LookupError):
    """The requested action cannot be run by this backend."""


class Preempted(Exception):
    """Training stopped on a preemption signal after saving a checkpoint (grounding_dino.preemption raises it);
    `str(error)` says which signal, the checkpoint and how to resume. run_action turns it into exit code 0."""


@dataclass
class ActionRun:
    """What an action is handed besides its spec: where it writes, and what its SUCCESS line will say."""

    results_dir: Path
    report: Report = dataclasses.field(default_factory=Report)


Action = Callable[..., Any]


def get_action(name: str) -> Action:
    """The function that runs action `name` (raises ActionError with the reason when it cannot be imported)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ActionError(f"unknown action {name!r}; Grounding DINO actions are: {', '.join(ACTIONS)}")
    module_name, _, function_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ActionError(f"action {name!r} cannot run: importing {module_name} failed ({err}). "
                          "Install the missing package or the matching pip extra.") from err
    return getattr(module, function_name)


def redacted(spec: Mapping[str, Any]) -> dict:
    """A copy of the spec as it may be written to disk: secrets (config.py's `secret=True` keys) become null."""
    out = copy.deepcopy(dict(spec))
    for key in SECRET_KEYS:
        *sections, leaf = key.split(".")
        node: Any = out
        for name in sections:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = None
    return out


def write_experiment(results_dir: Path, cfg: ExperimentConfig) -> Path:
    """`experiment.yaml`: the spec that runs, secrets left out, replaced atomically. run_action writes it from the
    launching process only (see _launching_process)."""
    path = results_dir / EXPERIMENT_FILE
    replace_atomically(path, yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))
    return path


def warn_no_effect(action: str, cfg: ExperimentConfig) -> None:
    """One stderr line per key of the action's sections that TAO has, this implementation ignores, and the spec
    sets to a non-default value (config.py's `no_effect=True`); the other ranks of a distributed run stay quiet."""
    if not _launching_process():
        return
    for key, value in no_effect_settings(cfg, ACTION_SECTIONS[action]):
        print(f"WARNING: {key}: {value!r} has no effect in this implementation (the key is accepted so NVIDIA TAO "
              "specs load); remove it to silence this warning", file=sys.stderr)


def run_action(action: str, spec: Union[Mapping[str, Any], ExperimentConfig], **options: Any) -> int:
    """Run `action` on `spec` (a validated spec dict or an ExperimentConfig); returns the exit code, 0.

    Raises grounding_dino.errors.UserError (nothing written) when the action's pre-check fails.

    `options` go to the action function (train takes extra Lightning `callbacks`, e.g. an AutoML pruner).
    """
    cfg = spec if isinstance(spec, ExperimentConfig) else load_experiment(dict(spec))
    retain_freed_memory()
    function = get_action(action)
    warn_no_effect(action, cfg)
    if REGISTRY[action].precheck is not None:
        REGISTRY[action].precheck(cfg)
    run = ActionRun(results_dir_for(action, cfg))
    with _results_lock(run.results_dir):
        if _launching_process():  # another node's ranks may have no results folder of their own to write
            write_experiment(run.results_dir, cfg)
        activity = REGISTRY[action].activity
        if activity is None:
            try:
                function(cfg, run, **options)
            except Preempted as stop:  # a normal end: the checkpoint is saved and the status line written
                print(stop, file=sys.stderr)
            return 0
        with reported(StatusWriter(run.results_dir / STATUS_FILE), activity) as report:
            run.report = report
            function(cfg, run, **options)
    return 0


def _launching_process() -> bool:
    """False in the other ranks of a distributed run: Lightning relaunches the command line with LOCAL_RANK set,
    torchrun sets RANK, a multi-node run NODE_RANK, srun SLURM_PROCID. They leave experiment.yaml, status.json and
    checkpoints to global rank 0, whose lock covers them; taking it too would refuse them."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextmanager
def _results_lock(results_dir: Path) -> Iterator[None]:
    """Hold the results folder's lock for the run (see the module docstring); nothing else is written before it."""
    if not _launching_process():
        yield
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = take_lock(results_dir / RESULTS_LOCK)
    except LockHeld as held:
        holder = f"pid {held.pid}" if held.pid is not None else "a process whose pid could not be read"
        raise UserError(f"results folder {results_dir} is in use by another run ({holder}, lock file {held.path}): "
                        "two runs would write the same checkpoints and status.json. Nothing was written. Fix: wait "
                        "for that run to end or stop it, or set results_dir to another folder") from None
    try:
        yield
    finally:
        os.close(fd)
