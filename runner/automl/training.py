"""The real AutoML trial: one Lightning training run in a child process, pruned through the study's storage.

A trial trains in its own process (`python -m runner.automl.training SPEC --trial N`) rather than inside the
driver because Lightning's DDP relaunches the current command line once per extra rank: launched from the driver,
those ranks would start drivers of their own. The child also gives every trial a fresh process (no memory carried
over between trials) and dies with the driver (Linux), so a killed driver leaves no orphan training.

The child attaches to the trial the driver created, reports each validation through PruningCallback, and writes
`automl_trial.json` (the validation history and the epoch it was pruned at, if any). The driver then returns the
best validated value and records the checkpoint of that epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import optuna
import yaml

from grounding_dino.actions import redacted
from grounding_dino.layout import checkpoints_at_step
from grounding_dino.status import json_safe
from runner.automl.study import CHECKPOINT_ATTR, open_storage, open_study
from sdk.jobs import die_with_parent
from sdk.mappings import ENCRYPTION_KEY_ENV

RESULT_FILE = "automl_trial.json"
SPEC_FILE = "trial_spec.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]


def train_trial(trial: optuna.Trial, spec: Dict[str, Any], trial_dir: Path) -> float:
    """Train one trial in a child process; returns its best validated metric (raises TrialPruned if pruned)."""
    on_disk = redacted(spec)  # the key travels in the environment, never in a file
    (trial_dir / SPEC_FILE).write_text(yaml.safe_dump(on_disk, sort_keys=False))
    result_file = trial_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if spec.get("encryption_key"):
        env[ENCRYPTION_KEY_ENV] = spec["encryption_key"]
    command = [sys.executable, "-m", "runner.automl.training", str(trial_dir / SPEC_FILE),
               "--trial", str(trial.number), "--parent-pid", str(os.getpid())]
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise RuntimeError(f"training of trial {trial.number} exited with code {code}: {_last_status(trial_dir)}")
    result = json.loads(result_file.read_text())
    if result["pruned_at"] is not None:
        raise optuna.TrialPruned(f"pruned after epoch {result['pruned_at']}")
    return _best_validation(trial, result["history"], trial_dir)


def _last_status(trial_dir: Path) -> str:
    from grounding_dino.status import read_status

    path = trial_dir / "status.json"
    records = read_status(path) if path.is_file() else []
    if not records:
        return "it failed before training started (its output is in the job log)"
    return records[-1].get("message", records[-1]["status"])


def _best_validation(trial: optuna.Trial, history: List[List[float]], trial_dir: Path) -> float:
    """The best validated value (the later epoch on ties); records the checkpoint saved at that validation."""
    if not history:
        raise RuntimeError(f"trial {trial.number} finished without a validation; check train.validation_interval "
                           "against train.num_epochs")
    # null: a validation that could not be scored (NaN), ranked below every scored one
    epochs, step, value = max(history, key=lambda h: (h[2] if h[2] is not None and math.isfinite(h[2])
                                                      else -math.inf, h[0]))
    matches = checkpoints_at_step(trial_dir, int(step))
    if not matches:
        raise RuntimeError(f"trial {trial.number}: no checkpoint in {trial_dir} for step {step} (epoch {epochs}), "
                           "the best validation")
    trial.set_user_attr(CHECKPOINT_ATTR, matches[-1].name)
    trial.set_user_attr("best_epoch", int(epochs))
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------------------------------------------
# the child process


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.automl.training",
                                     description="Train one AutoML trial (started by the AutoML driver).")
    parser.add_argument("spec", type=Path, help="the trial's spec (trial_spec.yaml)")
    parser.add_argument("--trial", type=int, required=True, help="trial number in the study")
    parser.add_argument("--parent-pid", type=int, help="the driver's pid: exit when it dies")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid, "the AutoML driver")

    from grounding_dino.actions import run_action
    from grounding_dino.errors import UserError
    from runner.automl.pruning import PruningCallback

    spec = yaml.safe_load(args.spec.read_text())
    spec["encryption_key"] = spec.get("encryption_key") or os.environ.get(ENCRYPTION_KEY_ENV)
    settings, train = spec["automl"], spec["train"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings["storage"])
    study, _ = open_study(storage, settings["study_name"], settings["algorithm"], settings["seed"],
                          train["num_epochs"])
    study_id = storage.get_study_id_from_name(settings["study_name"])
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, args.trial)
    trial = optuna.trial.Trial(study, trial_id)
    callback = PruningCallback(trial, settings["metric"], train["num_epochs"])
    try:
        run_action("train", spec, callbacks=[callback])
    except UserError as err:  # the user's to fix (bad data, a foreign checkpoint): the message alone
        print(f"trial {args.trial}: {err}", file=sys.stderr)
        return err.exit_code
    if callback.is_global_zero:
        result, reasons = json_safe({"history": callback.history, "pruned_at": callback.pruned_at})
        if reasons:
            result["null_reasons"] = reasons
        (args.spec.parent / RESULT_FILE).write_text(json.dumps(result, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
