"""The child process of a job: `python -m runner.job_process <job_dir>`.

It supervises a worker (`python -m runner.job_process --worker <job_dir>`, same process group) and records how
the worker ended in job.json: done, error (with the reason: the worker's one-line message, or its exit code or
signal and the last log lines), or canceled when `SkillBank.cancel` asked for it. Keeping the supervisor apart
from the worker is what lets a crash or a SIGKILL of the worker still end in an accurate job.json.

The worker fetches the data sources, runs preflight on the fetched data, then runs the action: train with
automl_policy on goes to the AutoML driver (runner.automl), everything else to the backend's action registry. A
SkillBankError or a backend UserError (a checkpoint of another architecture, an unreadable image) ends the job as
error with its message alone.

Test hook: SKILLBANK_JOB_DELAY_S=<seconds> makes the worker sleep before it starts, so tests can cancel or kill a
job that is really running without a model behind it. Nothing else reads it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grounding_dino.actions import ActionError, run_action
from grounding_dino.errors import UserError
from grounding_dino.layout import JOB_PROCESS_MODULE, read_job_spec
from sdk.data_sources import extracted_keys, resolve_data_sources
from sdk.errors import SkillBankError
from sdk.jobs import last_log_lines, now, read_job, update_job
from sdk.mappings import ENCRYPTION_KEY_ENV
from sdk.preflight import check
from sdk.skill_info import load_skill_info

DELAY_ENV = "SKILLBANK_JOB_DELAY_S"


def _say(message: str) -> None:
    print(f"[skillbank] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# supervisor


def supervise(job_dir: Path) -> int:
    record = read_job(job_dir)
    if record["status"] != "pending" or record.get("cancel_requested"):
        return 0  # canceled (or restarted elsewhere) before this process got going
    terminated = []

    def on_term(signum, frame):
        terminated.append(signum)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signum)  # a SIGTERM to this pid alone must still reach the worker

    worker = None
    signal.signal(signal.SIGTERM, on_term)
    update_job(job_dir, status="running", started_at=now(), pid=os.getpid())
    _say(f"job {record['id']}: {record['action']} started (automl_policy {record['automl_policy']}: "
         f"{record['automl_policy_source']})")
    worker = subprocess.Popen([sys.executable, "-m", JOB_PROCESS_MODULE, "--worker", str(job_dir)],
                              stdin=subprocess.DEVNULL)
    code = worker.wait()
    record = read_job(job_dir)
    if record.get("cancel_requested") or terminated:
        status, error = "canceled", None
    elif code == 0:
        status, error = "done", None
    else:
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        reason = record.get("error") or "last log lines: " + " | ".join(last_log_lines(job_dir))
        status, error = "error", f"{reason} ({how})"
    update_job(job_dir, status=status, error=error, exit_code=code, finished_at=now())
    _say(f"job {record['id']}: {status}" + (f": {error}" if error else ""))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# worker


def work(job_dir: Path) -> int:
    record = read_job(job_dir)
    try:
        delay = float(os.environ.get(DELAY_ENV) or 0)
        if delay > 0:
            _say(f"{DELAY_ENV}={delay:g}: sleeping before the action (test hook)")
            time.sleep(delay)
        spec = read_job_spec(job_dir)
        action = record["action"]
        info = load_skill_info(record["skill"]).action(action)
        resolve_data_sources(spec, extracted_keys(info.data_sources), record["cache_dir"], log=_say)
        check(spec, action, info.inputs, info.data_sources, stage="runtime",
              warn=lambda w: _say(f"[preflight] {w}"))
        if os.environ.get(ENCRYPTION_KEY_ENV):
            spec["encryption_key"] = os.environ[ENCRYPTION_KEY_ENV]
        if action == "train" and record["automl_policy"] == "on":
            return _run_automl(spec, record)
        return _run_action(action, spec)
    except (SkillBankError, UserError) as exc:  # the user's to fix: the message alone, no traceback
        message = str(exc)
        _say(message)
        update_job(job_dir, error=message)
        return exc.exit_code


def _run_action(action: str, spec: dict) -> int:
    try:
        return run_action(action, spec)
    except ActionError as exc:
        raise SkillBankError(str(exc)) from None


def _run_automl(spec: dict, record: dict) -> int:
    from runner.automl.driver import run_automl

    run_automl(spec, study_name=spec["automl"].get("study_name") or record["id"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        return work(Path(args[1]))
    if len(args) == 1 and not args[0].startswith("-"):
        return supervise(Path(args[0]))
    print("usage: python -m runner.job_process [--worker] <job_dir>  (started by the SDK; see sdk/jobs.py)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
