#!/usr/bin/env python3
"""Runner for the workflow `__NAME__`.

__DESCRIPTION__

Steps: __CHAIN__

Generated from __SOURCE__ by `skillbank runner generate`: a plain script that uses only the skill bank
SDK's public API (`sdk.SkillBank`); copy it and edit it freely. "${name}" in a spec value or override is replaced
by the param `name` (its command-line option).

    python __SCRIPT__ [--workspace DIR] [--PARAM VALUE ...]

Params: __USAGE__.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from sdk import SkillBank

WORKSPACE = "__WORKSPACE__"
PARAMS = "__PARAMS__"
# Log lines worth echoing while a job runs: the SDK's and AutoML's tagged lines, and evaluation metrics.
PROGRESS = re.compile(r"^(\[(skillbank|automl)\]|\s*mAP(50)?: )")


def expand(value, params):
    """`value` with every "${name}" replaced by params[name]; a string that is only "${name}" becomes the value."""
    if isinstance(value, dict):
        return {k: expand(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, params) for v in value]
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole:
            return params[whole.group(1)]
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), value)
    return value


def follow(bank, job_id, poll_s=1.0):
    """Wait for a job, echoing its progress lines; return its final record."""
    shown = 0
    while True:
        job = bank.status(job_id)
        lines = bank.logs(job_id).splitlines()
        for line in lines[shown:]:
            if PROGRESS.match(line):
                print(f"    {line.strip()}", flush=True)
        shown = len(lines)
        if job.status in ("done", "error", "canceled"):
            return job
        time.sleep(poll_s)


def submit(bank, params, action, parent=None, automl_policy=None, spec=None, overrides=None):
    """Create one job, follow it to the end and return its id; stop the workflow if it does not end done."""
    started = time.monotonic()
    job = bank.create_job(action, spec=expand(spec, params), overrides=expand(overrides or {}, params),
                          parent_job_id=parent, automl_policy=automl_policy)
    print(f"[workflow] {action} job {job.id} started" + (f" (parent {parent})" if parent else ""), flush=True)
    job = follow(bank, job.id)
    print(f"[workflow] {action} job {job.id}: {job.status} in {time.monotonic() - started:.0f} s", flush=True)
    if job.status != "done":
        print(bank.logs(job.id, tail=20), file=sys.stderr)
        raise SystemExit(f"{action} job {job.id} ended {job.status}: {job.error}")
    return job.id


def run(bank, params):
    """Run the steps in order; returns {step name: job id}."""
    params = {**PARAMS, **params}
    jobs = {}
    "__CALLS__"
    return jobs


def _flag(text):
    return text.lower() in ("1", "true", "yes", "on")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", default=WORKSPACE, help="SDK workspace (default: %(default)s)")
    "__OPTIONS__"
    args = vars(parser.parse_args(argv))
    jobs = run(SkillBank(args.pop("workspace")), args)
    print(json.dumps(jobs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
