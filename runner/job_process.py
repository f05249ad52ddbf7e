"""The child process of a job: `python -m runner.job_process <job_dir> [--lock-fd N]`, the supervisor.

It holds the job's supervisor lock for its life (handed over by `SkillBank.start` as descriptor N, or taken here;
a second supervisor exits 2 naming the holder), runs a worker (`python -m runner.job_process --worker <job_dir>
--parent-pid <supervisor pid>`, in a process group of its own that its training, DDP ranks, data loaders and AutoML
trials share, so cancel can kill all of it), records both pids with their start times in job.json, and records how
the worker ended: done, error (with the reason: the worker's one-line message, or its exit code or signal and the
last log lines), canceled when `SkillBank.cancel` asked for it, or preempted. Keeping the supervisor apart from
the worker is what lets a crash or a SIGKILL of the worker still end in an accurate job.json; the worker dies with
the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no training behind.

Preemption: SIGTERM or SIGUSR1 to the supervisor without a cancel request (a Kubernetes eviction, SLURM's warning)
goes to the worker alone (not to its data loaders); a training saves a checkpoint at its next step and ends with
exit code 0 and a PREEMPTED status line, which the worker copies into job.json (`preempted`). The job then ends
`preempted`, and `skillbank job start` resumes it. A worker that the signal stops before training saved anything
also leaves the job `preempted`: restarting it runs the action again.

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
from grounding_dino.layout import (JOB_PROCESS_MODULE, JOB_SUPERVISOR_LOCK, STATUS_FILE, LockHeld, read_job_spec,
                                   results_dir_for, take_lock)
from grounding_dino.status import read_status
from sdk.data_sources import extracted_keys, resolve_data_sources
from sdk.errors import SkillBankError
from sdk.jobs import die_with_parent, last_log_lines, now, process_start_time, read_job, update_job
from sdk.mappings import ENCRYPTION_KEY_ENV
from sdk.preflight import check
from sdk.skill_info import load_skill_info

DELAY_ENV = "SKILLBANK_JOB_DELAY_S"


def _say(message: str) -> None:
    print(f"[skillbank] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# supervisor


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def supervise(job_dir: Path, lock_fd: int | None) -> int:
    if lock_fd is None:
        try:
            lock_fd = take_lock(job_dir / JOB_SUPERVISOR_LOCK)
        except LockHeld as held:
            _say(f"job folder {job_dir} already has a supervisor (pid {held.pid}); not starting a second one")
            return 2
    record = read_job(job_dir)
    if record["status"] != "pending" or record.get("cancel_requested"):
        return 0  # canceled (or restarted elsewhere) before this process got going
    received = []

    def forward(signum, frame):
        received.append(signum)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signum)  # the worker alone: its data loaders would die mid-batch

    worker = None
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, forward)
    update_job(job_dir, status="running", started_at=now(), pid=os.getpid(),
               pid_start=process_start_time(os.getpid()))
    _say(f"job {record['id']}: {record['action']} started (automl_policy {record['automl_policy']}: "
         f"{record['automl_policy_source']})")
    worker = subprocess.Popen([sys.executable, "-m", JOB_PROCESS_MODULE, "--worker", str(job_dir), "--parent-pid",
                               str(os.getpid())], stdin=subprocess.DEVNULL, process_group=0)
    if received:  # arrived while the worker was being started
        worker.send_signal(received[-1])
    update_job(job_dir, worker_pid=worker.pid, worker_pid_start=process_start_time(worker.pid))
    code = worker.wait()
    record = read_job(job_dir)
    if record.get("cancel_requested"):
        status, error = "canceled", None
    elif code == 0:
        status, error = ("preempted" if record.get("preempted") else "done"), None
    elif received and code == -received[-1]:
        status, error = "preempted", None
        update_job(job_dir, preempted=f"{signal.Signals(received[-1]).name} stopped the worker before it saved a "
                                      "checkpoint; `skillbank job start` runs the job again")
    else:
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        reason = record.get("error") or "last log lines: " + " | ".join(last_log_lines(job_dir))
        status, error = "error", f"{reason} ({how})"
    update_job(job_dir, status=status, error=error, exit_code=code, finished_at=now())
    _say(f"job {record['id']}: {status}" + (f": {error}" if error else ""))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# worker


def work(job_dir: Path, parent_pid: int) -> int:
    die_with_parent(parent_pid, "the job's supervisor")
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
        code = _run_action(action, spec)
        if action == "train":
            _record_preemption(job_dir, results_dir_for(action, spec))
        return code
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


def _record_preemption(job_dir: Path, results_dir: Path) -> None:
    """Copy a PREEMPTED status line that ended the training into job.json, for the supervisor to read."""
    path = results_dir / STATUS_FILE
    last = read_status(path)[-1:] if path.is_file() else []
    if last and last[0]["status"] == "PREEMPTED":
        update_job(job_dir, preempted=last[0]["message"])


def _run_automl(spec: dict, record: dict) -> int:
    from runner.automl.driver import run_automl

    run_automl(spec, study_name=spec["automl"].get("study_name") or record["id"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) == 4 and args[0] == "--worker" and args[2] == "--parent-pid" and args[3].isdigit():
            return work(Path(args[1]), int(args[3]))
        if (len(args) == 1 or len(args) == 3 and args[1] == "--lock-fd" and args[2].isdigit()) \
                and not args[0].startswith("-"):
            return supervise(Path(args[0]), int(args[2]) if len(args) == 3 else None)
    except SkillBankError as exc:  # a damaged job.json: the message names the file
        _say(str(exc))
        return exc.exit_code
    print("usage: python -m runner.job_process <job_dir> [--lock-fd N] | --worker <job_dir> --parent-pid PID  "
          "(started by the SDK; see sdk/jobs.py)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
