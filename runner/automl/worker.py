"""`skillbank automl worker`: one more process working through a shared AutoML study.

Start several on one machine (SQLite or a .journal file) or on several machines (a PostgreSQL URL, with the
results folder on a shared filesystem so best_model/ can be copied from any trial). Each runs trials until the
study holds automl.max_trials of them, counted across all workers, then writes the report and exits.

    skillbank automl worker --study NAME --storage sqlite:///results/automl_study.db -e spec.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sdk.errors import SkillBankError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillbank automl", description="AutoML (Optuna) studies of train specs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser("worker", help="run trials of a shared study until its budget is used")
    worker.add_argument("--study", required=True, help="study name (the AutoML job's automl.study_name or job id)")
    worker.add_argument("--storage", required=True,
                        help="the study's storage: sqlite:///path.db, postgresql://user@host/db or path.journal")
    worker.add_argument("-e", "--experiment", required=True, type=Path,
                        help="train spec YAML (with results_dir: where trial folders and best_model/ go)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from grounding_dino.config import ConfigError
    from runner.automl.driver import run_automl
    from sdk.spec import resolve_spec, validate

    try:
        spec = resolve_spec("train", args.experiment)
        validate(spec, "train")  # as the SDK does for a job: a bad spec fails here, not in every trial
        run_automl(spec, storage=args.storage, study_name=args.study)
    except (SkillBankError, ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
