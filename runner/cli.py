"""`skillbank`: jobs, preflight and schema maintenance from the command line.

Exit codes: 0 success, 1 a job that did not finish `done` (job wait / create --wait) or a missing feature,
2 bad input (nothing written). Errors are one actionable message on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

from sdk.errors import SkillBankError, run_command

DEFAULT_WORKSPACE = os.environ.get("SKILLBANK_WORKSPACE", "workspace")


def _bank(args):
    from sdk.jobs import SkillBank

    return SkillBank(args.workspace, cache_dir=args.cache_dir)


def _print_job(job, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job.record, indent=2, sort_keys=True))
        return
    line = f"{job.id}  {job.status}"
    if job.error:
        line += f"  error: {job.error}"
    print(line)


def job_create(args) -> int:
    bank = _bank(args)
    datasets: dict[str, list[str]] = {}
    for item in args.dataset:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise SkillBankError(f"--dataset {item!r}: expected ROLE=PATH, e.g. --dataset eval_dataset=data/val")
        datasets.setdefault(role, []).append(path)
    job = bank.create_job(args.action, spec=args.experiment, overrides=args.overrides, parent_job_id=args.parent,
                          automl_policy=args.automl_policy, request=args.request, datasets=datasets)
    print(job.id, flush=True)
    if not args.wait:
        return 0
    job = bank.wait(job.id)
    _print_job(job, False)
    return 0 if job.status == "done" else 1


def job_status(args) -> int:
    _print_job(_bank(args).status(args.job_id), args.json)
    return 0


def job_logs(args) -> int:
    sys.stdout.write(_bank(args).logs(args.job_id, tail=args.tail))
    return 0


def job_cancel(args) -> int:
    _print_job(_bank(args).cancel(args.job_id, grace_s=args.grace), False)
    return 0


def job_list(args) -> int:
    from sdk.jobs import describe

    problems: list[str] = []
    for line in describe(_bank(args).list_jobs(problems)):
        print(line)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def job_wait(args) -> int:
    job = _bank(args).wait(args.job_id, timeout=args.timeout)
    _print_job(job, args.json)
    return 0 if job.status == "done" else 1


def job_start(args) -> int:
    _print_job(_bank(args).start(args.job_id), False)
    return 0


def preflight_cmd(args) -> int:
    from sdk.preflight import check
    from sdk.skill_info import load_skill_info
    from sdk.spec import resolve_spec, validate

    info = load_skill_info().action(args.action)
    spec = resolve_spec(args.action, args.experiment, args.overrides)
    validate(spec, args.action, filled_by_mappings=frozenset(info.spec_params))
    findings = check(spec, args.action, info.inputs, info.data_sources, warn=print)
    print(f"preflight {args.action}: OK ({len(findings)} warning{'s' if len(findings) != 1 else ''})")
    return 0


def schemas_generate(args) -> int:
    from sdk import schema_gen
    from sdk.skill_info import BANK_ROOT

    for path in schema_gen.generate():
        print(path.relative_to(BANK_ROOT).as_posix())  # in a checkout, also the path from the repository's top
    return 0


def schemas_check(args) -> int:
    from sdk import schema_gen

    stale = schema_gen.check()
    for line in stale:
        print(f"stale: {line}", file=sys.stderr)
    if stale:
        print("Fix: run `skillbank schemas generate` and commit the result.", file=sys.stderr)
        return 1
    print("schemas and templates are up to date")
    return 0


def demo_cmd(args) -> int:
    from runner.demo import run_from_args

    return run_from_args(args)


def runner_cmd(args) -> int:
    from runner.runner_gen import main as runner_main

    return runner_main(["--help"] if args.runner_help else args.runner_args)


def automl_cmd(args) -> int:
    from runner.automl.worker import main as automl_main

    return automl_main(args.automl_args)


def data_cmd(args) -> int:
    from runner.data_cli import main as data_main

    return data_main(["--help"] if args.data_help else args.data_args)


def skills_cmd(args) -> int:
    from runner.skills_eval import main as skills_main

    return skills_main(["--help"] if args.skills_help else args.skills_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillbank", description="Grounding DINO skill bank: jobs, preflight, "
                                                                   "schemas.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('grounding-dino-skillbank')}")
    parser.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                        help="workspace folder holding jobs/ and cache/ (env SKILLBANK_WORKSPACE; default %(default)s)")
    parser.add_argument("--cache-dir", help="cache for S3 data and extracted archives (default <workspace>/cache)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    job = commands.add_parser("job", help="create and follow jobs").add_subparsers(dest="verb", required=True,
                                                                                   metavar="VERB")
    create = job.add_parser("create", help="validate a request, write its job folder and start it; prints the id")
    create.add_argument("--action", required=True, help="train, evaluate, inference, export, quantize, gen_trt_engine")
    create.add_argument("-e", "--experiment", help="spec YAML")
    create.add_argument("--parent", help="parent job id (its model, settings and results are used)")
    create.add_argument("--automl-policy", choices=("on", "off"), help="train through AutoML or directly")
    create.add_argument("--dataset", action="append", default=[], metavar="ROLE=PATH",
                        help="a dataset folder (local or s3://) for a role: train_datasets (repeat for several), "
                             "eval_dataset, inference_dataset, calibration_dataset; fills the spec's data keys "
                             "from the files it holds (overrides still win)")
    create.add_argument("--request", help="the request in words, read for phrases such as 'turn off AutoML'")
    create.add_argument("--wait", action="store_true", help="wait for the job; exit 1 unless it ends done")
    create.add_argument("overrides", nargs="*", metavar="key=value",
                        help="spec overrides (dotted keys, shorthand such as num_epochs=2) and parent_epoch=N, "
                             "parent_step=N")
    create.set_defaults(func=job_create)

    for name, func, text in (("status", job_status, "show a job's state"),
                             ("wait", job_wait, "wait until a job ends; exit 1 unless done")):
        sub = job.add_parser(name, help=text)
        sub.add_argument("job_id")
        sub.add_argument("--json", action="store_true", help="print the whole job.json")
        if name == "wait":
            sub.add_argument("--timeout", type=float, help="give up after this many seconds")
        sub.set_defaults(func=func)
    logs = job.add_parser("logs", help="print a job's log")
    logs.add_argument("job_id")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    logs.set_defaults(func=job_logs)
    cancel = job.add_parser("cancel", help="stop a job (SIGTERM, then SIGKILL after --grace seconds)")
    cancel.add_argument("job_id")
    cancel.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    cancel.set_defaults(func=job_cancel)
    job.add_parser("list", help="list the workspace's jobs (exit 1 when a job.json cannot be read: the others are "
                                "still listed)").set_defaults(func=job_list)
    start = job.add_parser("start", help="start a pending job, or restart an error, canceled or preempted one (train "
                                         "resumes from its newest checkpoint); exit 2 if it is already running")
    start.add_argument("job_id")
    start.set_defaults(func=job_start)

    pre = commands.add_parser("preflight", help="check a spec and its data for known failure patterns")
    pre.add_argument("-e", "--experiment", required=True, help="spec YAML")
    pre.add_argument("--action", required=True)
    pre.add_argument("overrides", nargs="*", metavar="key=value")
    pre.set_defaults(func=preflight_cmd)

    schemas = commands.add_parser("schemas", help="generated JSON Schemas and templates").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    schemas.add_parser("generate", help="regenerate from grounding_dino/config.py").set_defaults(
        func=schemas_generate)
    schemas.add_parser("check", help="exit 1 when a generated file is stale").set_defaults(func=schemas_check)

    automl = commands.add_parser("automl", help="AutoML studies: `skillbank automl worker --study NAME --storage "
                                                "URL -e spec.yaml` joins a study as one more worker", add_help=False)
    automl.add_argument("automl_args", nargs=argparse.REMAINDER)
    automl.set_defaults(func=automl_cmd)

    data = commands.add_parser("data", help="dataset tools: `skillbank data "
                                            "coco2odvg|odvg2coco|contiguous|stats|autolabel ...`", add_help=False)
    data.add_argument("-h", "--help", action="store_true", dest="data_help")  # REMAINDER cannot start with an option
    data.add_argument("data_args", nargs=argparse.REMAINDER)
    data.set_defaults(func=data_cmd)

    demo = commands.add_parser("demo", help="end-to-end demo: AutoML fine-tuning of the packaged base model, "
                                            "evaluate, inference, ONNX export and check")
    from runner.demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=demo_cmd)

    runner = commands.add_parser("runner", help="generated runner scripts: `skillbank runner generate --workflow "
                                                "FILE.yaml`", add_help=False)
    runner.add_argument("-h", "--help", action="store_true", dest="runner_help")
    runner.add_argument("runner_args", nargs=argparse.REMAINDER)
    runner.set_defaults(func=runner_cmd)

    skills = commands.add_parser("skills", help="skill evals: `skillbank skills eval [--skill NAME] [--task ID] "
                                                "[--agent CMD]`", add_help=False)
    skills.add_argument("-h", "--help", action="store_true", dest="skills_help")
    skills.add_argument("skills_args", nargs=argparse.REMAINDER)
    skills.set_defaults(func=skills_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "experiment", None) and not Path(args.experiment).is_file():
        print(f"error: spec file {args.experiment} not found. Fix: check the path given with -e.", file=sys.stderr)
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
