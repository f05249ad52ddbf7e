"""Jobs: one folder per request under `<workspace>/jobs/<job_id>/`, run by a child process.

The folder holds `job.json` (the record below), `spec.yaml` (the resolved spec), `log.txt` (the child's stdout
and stderr) and `results/` (the action's results_dir). A request is checked completely (spec, parent, mappings,
AutoML policy, preflight) before the folder exists, so a bad request leaves nothing behind.

States: pending -> running -> done | error | canceled | preempted. The child `python -m runner.job_process
<job_dir>` (the supervisor) runs a worker process and records how it ended; `start` restarts an error, canceled or
preempted job in its folder (train resumes from its newest checkpoint). job.json is replaced atomically and changed
under a file lock, and a final state is never overwritten (a cancel racing a finishing job keeps whichever landed
first).

Faults: a job has one supervisor. `start` takes the job's supervisor lock (layout.JOB_SUPERVISOR_LOCK, an
fcntl.flock) and hands it to the supervisor, which holds it for its life, so a second start, however close in time,
is refused with the holder's pid. The worker runs in its own process group (its DDP ranks, data loaders and AutoML
trials with it) and dies with its supervisor (PR_SET_PDEATHSIG); job.json records both pids and start times. When
the supervisor is gone without recording an outcome, the next status read marks the job error ("supervisor died")
and kills what is left of the worker's group; cancel and start kill that group too. Preemption (SIGTERM or SIGUSR1
to the supervisor) is passed to the worker: train saves a checkpoint and the job ends `preempted`.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from grounding_dino.config import secret_keys
from grounding_dino.layout import (JOB_LOCK, JOB_LOG, JOB_PROCESS_MODULE, JOB_RECORD, JOB_RESULTS, JOB_SPEC,
                                  JOB_SUPERVISOR_LOCK, LockHeld, read_job_spec, replace_atomically, set_lock_holder,
                                  take_lock)
from sdk import mappings, preflight
from sdk.automl_policy import AutomlDecision, decide as decide_automl
from sdk.data_sources import dataset_values
from sdk.errors import SkillBankError
from sdk.skill_info import load_skill_info
from sdk.spec import (apply_overrides, dump_spec, get_path, load_spec, parse_override, resolve_spec, set_path,
                      validate)

FINAL = ("done", "error", "canceled", "preempted")
STARTABLE = ("pending", "error", "canceled", "preempted")
REQUEST_KEYS = ("parent_epoch", "parent_step")  # request settings given like overrides, not spec keys
SECRET_KEYS = secret_keys()  # config.py's secret=True keys: kept out of spec.yaml, job.json and the log
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    """A snapshot of job.json."""

    id: str
    action: str
    status: str
    path: Path
    record: dict

    @property
    def error(self) -> Optional[str]:
        return self.record.get("error")

    @property
    def results_dir(self) -> Path:
        return self.path / JOB_RESULTS


# ---------------------------------------------------------------------------------------------------------------
# job.json


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_job(job_dir: Path) -> dict:
    """job.json; raises SkillBankError naming the file when it is not a job record (edited or damaged by hand:
    the SDK only ever replaces it whole)."""
    path = Path(job_dir) / JOB_RECORD
    try:
        record = json.loads(path.read_bytes())
        problem = None if isinstance(record, dict) else f"holds a JSON {type(record).__name__}, not an object"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = f"is not valid JSON ({err})"
    if problem is None:
        missing = [key for key in ("id", "action", "status") if not isinstance(record.get(key), str)]
        problem = f"lacks {', '.join(missing)}" if missing else None
    if problem is not None:
        raise SkillBankError(f"{path} {problem}: the job's record is damaged and the job cannot be read. Its spec "
                             f"and results are still in {path.parent}. Fix: restore the file from a backup, or "
                             "move the folder out of the workspace if the job is no longer needed.")
    return record


@contextmanager
def _locked(job_dir: Path):
    with open(Path(job_dir) / JOB_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_job(job_dir: Path, restart: bool = False, **changes: Any) -> dict:
    """Merge `changes` into job.json under the lock. A final status stays final unless `restart`."""
    job_dir = Path(job_dir)
    with _locked(job_dir):
        record = read_job(job_dir)
        if record["status"] in FINAL and not restart:
            changes = {k: v for k, v in changes.items() if k not in ("status", "error", "finished_at")}
        record.update(changes)
        record["updated_at"] = now()
        replace_atomically(job_dir / JOB_RECORD,
                           json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return record


def last_log_lines(job_dir: Path, count: int = 5) -> list[str]:
    path = Path(job_dir) / JOB_LOG
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 8192))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()][-count:]


# ---------------------------------------------------------------------------------------------------------------
# processes


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (tells a live job from a recycled pid), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def die_with_parent(parent_pid: int, parent: str) -> None:
    """Have Linux SIGKILL this process when its parent exits (PR_SET_PDEATHSIG), and exit now if `parent` (its
    pid, which says what it is in the message) is already gone: a killed supervisor or AutoML driver leaves no
    training behind. A rank that Lightning's DDP relaunched runs the same command line as its rank 0 but is rank
    0's child: it dies with rank 0, which is the one `parent_pid` names."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        parent_pid = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        sys.exit(f"{parent} (pid {parent_pid}) is gone; not starting")


def kill_worker_group(record: dict, timeout_s: float = 10.0) -> bool:
    """SIGKILL the process group of the job's recorded worker (its training, DDP ranks, data loaders, AutoML
    trials) and wait until it is gone; returns whether there was one. Skipped when the worker's pid now belongs to
    another process (its start time differs): a pid is not reused while its process group lives, so a dead worker's
    pid still names the group of its leftovers."""
    pid = record.get("worker_pid")
    if not pid:
        return False
    current = process_start_time(pid)
    if current is not None and current != record.get("worker_pid_start"):
        return False
    if not _signal_group(pid, signal.SIGKILL):
        return False
    deadline = time.monotonic() + timeout_s
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` runs (zombies, dead but not yet reaped, do not count)."""
    if not Path("/proc").is_dir():
        return _signal_group(pgid, 0)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def process_alive(pid: int, start_time: Optional[str] = None) -> bool:
    """Whether `pid` runs; with `start_time` (from /proc), also that it is the same process, not a reused pid."""
    if Path("/proc").is_dir():
        current = process_start_time(pid)
        return current is not None and (start_time is None or current == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# the SDK


class SkillBank:
    """Create, run and follow jobs of one model family in a workspace folder.

    cache_dir: where fetched S3 data and extracted archives are kept (default `<workspace>/cache`).
    """

    def __init__(self, workspace: str | os.PathLike, *, model: str = "grounding_dino",
                 cache_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None):
        self.workspace = Path(workspace).resolve()
        self.jobs_dir = self.workspace / "jobs"
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else self.workspace / "cache"
        self.model = model
        self.info = load_skill_info(model, root)
        self._children: dict[str, subprocess.Popen] = {}

    # -- creating ------------------------------------------------------------------------------------------------

    def create_job(
        self,
        action: str,
        spec: str | os.PathLike | dict | None = None,
        overrides: dict | list[str] | None = None,
        parent_job_id: Optional[str] = None,
        automl_policy: Optional[str] = None,
        request: Optional[str] = None,
        parent_epoch: Optional[int] = None,
        parent_step: Optional[int] = None,
        datasets: Optional[Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]] = None,
        start: bool = True,
    ) -> Job:
        """Check a request completely, write its job folder and (by default) start it.

        overrides: {dotted key: value} or ["key=value", ...]; shorthand keys (num_epochs, ...) work, and
        `parent_epoch` / `parent_step` pick the parent's checkpoint. request: the user's words, read for
        automl_policy phrases ("turn off AutoML"). datasets: {role: folder or [folders]} (train_datasets,
        eval_dataset, inference_dataset, calibration_dataset; local or s3://) fills the data keys from the files
        each folder holds, under the spec and its overrides. Raises SkillBankError before writing anything.
        """
        action_info = self.info.action(action)
        overrides, asked = _split_request(overrides)
        parent_epoch = parent_epoch if parent_epoch is not None else asked.get("parent_epoch")
        parent_step = parent_step if parent_step is not None else asked.get("parent_step")
        if (parent_epoch is not None or parent_step is not None) and not parent_job_id:
            raise SkillBankError("parent_epoch / parent_step select a checkpoint of the parent job; give --parent.")
        parent = self._parent(parent_job_id) if parent_job_id else None

        base = load_spec(spec) if spec is not None else {}
        for key, value in dataset_values(action_info.data_sources, datasets or {}).items():
            set_path(base, key, value)
        user_spec = apply_overrides(base, overrides, self.info.shorthand)
        resolved = resolve_spec(action, base, overrides)
        deploy = action_info.deploy is not None and parent is not None and parent.action == "gen_trt_engine"
        spec_params = action_info.deploy.spec_params if deploy else action_info.spec_params
        validate(resolved, action, filled_by_mappings=frozenset(spec_params))
        decision = self._automl(action, automl_policy, request)

        while True:
            job_id = f"{action}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
            job_dir = self.jobs_dir / job_id
            spec_out = json.loads(json.dumps(resolved))
            warnings: list[str] = []
            carried = (mappings.carry_forward(action, spec_out, user_spec, parent, warn=warnings.append)
                       if parent else [])
            context = mappings.MappingContext(action, spec_out, job_dir, parent, parent_epoch, parent_step)
            filled = mappings.apply_mappings(context, spec_params)
            self._check_outputs(spec_out, action, job_dir)
            preflight.check(spec_out, action, action_info.inputs, action_info.data_sources,
                            parent_spec=mappings.parent_settings(parent) if parent else None, warn=warnings.append)
            secret = {k: get_path(spec_out, k, None) for k in SECRET_KEYS if get_path(spec_out, k, None)}
            for key in secret:
                set_path(spec_out, key, None)
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(job_dir)  # atomic: two creators never share a folder
                break
            except FileExistsError:
                continue

        (job_dir / JOB_RESULTS).mkdir()
        dump_spec(spec_out, job_dir / JOB_SPEC)
        (job_dir / JOB_LOG).write_text("".join(f"[preflight] {w}\n" for w in warnings))
        record = {
            "id": job_id, "skill": self.model, "action": action, "parent_job_id": parent_job_id,
            "status": "pending", "created_at": now(), "started_at": None, "finished_at": None,
            "pid": None, "pid_start": None, "exit_code": None, "error": None,
            "automl_policy": decision.policy, "automl_policy_source": decision.source,
            "overrides": _redacted(overrides), "request": request, "deploy": deploy,
            "parent_epoch": parent_epoch, "parent_step": parent_step,
            "mapped": filled, "carried": carried, "warnings": warnings,
            "cache_dir": str(self.cache_dir), "has_encryption_key": bool(secret),
        }
        replace_atomically(job_dir / JOB_RECORD,
                           json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
        if start:
            return self.start(job_id, _secret=secret)
        return self._job(job_dir)

    def _automl(self, action: str, explicit: Optional[str], request: Optional[str]) -> AutomlDecision:
        train = self.info.actions.get("train")
        return decide_automl(
            action, explicit=explicit, request_text=request, automl_enabled=self.info.automl_enabled,
            required_files=[train.schema, train.template] if train else [],
        )

    def _parent(self, job_id: str) -> mappings.ParentJob:
        job_dir = self._dir(job_id)
        record = self.status(job_id).record
        if record["status"] in ("pending", "running"):
            raise SkillBankError(f"parent job {job_id} is {record['status']}; wait for it (skillbank job wait "
                                 f"{job_id}) before starting a job from its results.")
        spec = read_job_spec(job_dir)
        return mappings.ParentJob(job_dir, record, spec)

    def _check_outputs(self, spec: dict, action: str, job_dir: Path) -> None:
        """Every path the action writes must be inside the job folder."""
        keys = ["results_dir", f"{action}.results_dir"] + [k for k in self.info.action(action).outputs
                                                           if k != "results_dir"]
        for key in keys:
            value = get_path(spec, key, None)
            if not value:
                continue
            path = Path(value)
            if not path.is_absolute() or not path.resolve().is_relative_to(job_dir.resolve()):
                raise SkillBankError(f"{key} = {value!r} is outside the job folder; a job writes only inside "
                                     f"<workspace>/jobs/<id>/. Fix: remove {key} from the request (the SDK sets it).")

    # -- running -------------------------------------------------------------------------------------------------

    def start(self, job_id: str, _secret: Optional[dict] = None) -> Job:
        """Launch a pending job, or restart an error, canceled or preempted one in its folder (train resumes from
        its newest checkpoint: resume_model and ptm_if_no_resume_model are resolved again).

        Raises SkillBankError "already running (pid N)" while the job has a supervisor: the supervisor lock is taken
        here and handed to the supervisor, so of any number of concurrent starts exactly one launches."""
        job_dir = self._dir(job_id)
        try:
            lock = take_lock(job_dir / JOB_SUPERVISOR_LOCK)
        except LockHeld as held:
            raise SkillBankError(f"job {job_id} is already running (pid {held.pid if held.pid else 'unknown'}, "
                                 f"which holds {held.path}). Fix: wait for it (skillbank job wait {job_id}) or stop "
                                 f"it (skillbank job cancel {job_id}) before starting it again.") from None
        try:
            record = self.status(job_id).record  # under the lock: a supervisor that died is noticed here
            if record["status"] not in STARTABLE:
                raise SkillBankError(f"job {job_id} is {record['status']}; only pending, error, canceled or "
                                     "preempted jobs start.")
            kill_worker_group(record)  # left by an earlier supervisor, it would train beside the new worker
            if record["status"] != "pending":
                self._reresolve(job_dir, record)
            env = dict(os.environ)
            secret = _secret or {}
            if secret.get("encryption_key"):
                env[mappings.ENCRYPTION_KEY_ENV] = secret["encryption_key"]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            with open(job_dir / JOB_LOG, "ab") as log:
                child = subprocess.Popen(
                    [sys.executable, "-m", JOB_PROCESS_MODULE, str(job_dir), "--lock-fd", str(lock)], cwd=job_dir,
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    pass_fds=(lock,),
                )
            set_lock_holder(lock, child.pid)
            self._children[job_id] = child
            update_job(job_dir, pid=child.pid, pid_start=process_start_time(child.pid))
        finally:
            os.close(lock)  # the supervisor's copy keeps the lock
        return self._job(job_dir)

    def _reresolve(self, job_dir: Path, record: dict) -> None:
        spec = read_job_spec(job_dir)
        action_info = self.info.action(record["action"])
        params = {k: v for k, v in action_info.spec_params.items() if v in ("resume_model", "ptm_if_no_resume_model")}
        mappings.apply_mappings(mappings.MappingContext(record["action"], spec, job_dir), params)
        dump_spec(spec, job_dir / JOB_SPEC)
        update_job(job_dir, restart=True, status="pending", error=None, exit_code=None, finished_at=None,
                   cancel_requested=False, preempted=None, pid=None, pid_start=None, worker_pid=None,
                   worker_pid_start=None)

    # -- following -----------------------------------------------------------------------------------------------

    def status(self, job_id: str) -> Job:
        """The job's record. A job whose supervisor is gone without recording an outcome is marked error
        ("supervisor died", restartable with `start`), and what is left of its worker's process group is killed."""
        job_dir = self._dir(job_id)
        record = read_job(job_dir)
        child = self._children.get(job_id)
        if child is not None and child.poll() is not None:
            self._children.pop(job_id)
        if record["status"] in ("pending", "running") and record.get("pid"):
            gone = child.returncode is not None if child is not None else not process_alive(record["pid"],
                                                                                     record.get("pid_start"))
            if gone:
                record = read_job(job_dir)  # it may have finished between the two reads
                if record["status"] not in FINAL:
                    code = child.returncode if child is not None else None
                    how = f", {_describe_exit(code)}" if code is not None else ""
                    stopped = (f"; its worker's process group {record['worker_pid']} was killed"
                               if kill_worker_group(record) else "")
                    record = update_job(job_dir, status="error", finished_at=now(), exit_code=code, error=(
                        f"supervisor died (pid {record['pid']}{how}) before recording how the job ended{stopped}. "
                        f"Fix: `skillbank job start {job_id}` restarts it (train resumes from its newest "
                        "checkpoint). Last log lines: " + " | ".join(last_log_lines(job_dir))))
        return Job(record["id"], record["action"], record["status"], job_dir, record)

    def logs(self, job_id: str, tail: Optional[int] = None) -> str:
        text = (self._dir(job_id) / JOB_LOG).read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:]) + "\n" if tail else text

    def list_jobs(self, problems: Optional[list[str]] = None) -> list[Job]:
        """The workspace's jobs, oldest first. A job whose job.json cannot be read is left out, and its message
        (naming the file) appended to `problems` when given: one damaged record must not hide the others."""
        if not self.jobs_dir.is_dir():
            return []
        jobs = []
        for folder in self.jobs_dir.iterdir():
            if (folder / JOB_RECORD).is_file():
                try:
                    jobs.append(self.status(folder.name))
                except SkillBankError as err:
                    if problems is not None:
                        problems.append(str(err))
        return sorted(jobs, key=lambda j: j.record.get("created_at") or "")

    def wait(self, job_id: str, timeout: Optional[float] = None, poll_s: float = 0.2) -> Job:
        """Block until the job is done, error, canceled or preempted and its supervisor has exited (or `timeout`
        seconds pass); returns its record. The supervisor writes the final status a moment before it exits and
        releases the job's lock; returning before that would make a `start` straight after `wait` fail as
        "already running"."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            pid = job.record.get("pid")
            ended = job.status in FINAL and not (pid and self._running(job_id, pid, job.record))
            if ended or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll_s)

    def cancel(self, job_id: str, grace_s: float = 5.0) -> Job:
        """SIGTERM the supervisor, which passes it to the worker (a training saves a checkpoint at its next step);
        after `grace_s`, SIGKILL both process groups. Mark the job canceled. The worker's group is killed whatever
        the job's state, also when an earlier supervisor left it."""
        job = self.status(job_id)
        if job.status in FINAL:
            kill_worker_group(job.record)
            return job
        record = update_job(job.path, cancel_requested=True)
        pid = record.get("pid")
        if pid and process_alive(pid, record.get("pid_start")):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._running(job_id, pid, record) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._running(job_id, pid, record):
                _signal_group(pid, signal.SIGKILL)
                while self._running(job_id, pid, record):
                    time.sleep(0.05)
        kill_worker_group(read_job(job.path))  # read again: the worker may have started after the first read
        update_job(job.path, status="canceled", finished_at=now(), error=None)
        self._children.pop(job_id, None)
        return self.status(job_id)

    def _running(self, job_id: str, pid: int, record: dict) -> bool:
        child = self._children.get(job_id)
        if child is not None:
            return child.poll() is None
        return process_alive(pid, record.get("pid_start"))

    # -- helpers -------------------------------------------------------------------------------------------------

    def _dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise SkillBankError(f"{job_id!r} is not a job id.")
        job_dir = self.jobs_dir / job_id
        if not (job_dir / JOB_RECORD).is_file():
            raise SkillBankError(f"no job {job_id!r} in {self.jobs_dir}. Fix: `skillbank job list` shows the ids.")
        return job_dir

    def _job(self, job_dir: Path) -> Job:
        record = read_job(job_dir)
        return Job(record["id"], record["action"], record["status"], job_dir, record)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group does not exist."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _split_request(overrides: dict | list[str] | None) -> tuple[dict | list[str], dict]:
    """Separate request settings (parent_epoch, parent_step) from spec overrides."""
    asked: dict = {}
    if overrides is None:
        return {}, asked
    if isinstance(overrides, dict):
        rest = {k: v for k, v in overrides.items() if k not in REQUEST_KEYS}
        asked = {k: overrides[k] for k in REQUEST_KEYS if k in overrides}
    else:
        rest = []
        for text in overrides:
            key, value = parse_override(text)
            if key in REQUEST_KEYS:
                asked[key] = value
            else:
                rest.append(text)
    for key, value in asked.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SkillBankError(f"{key} = {value!r}: must be a non-negative integer.")
    return rest, asked


def _redacted(overrides: dict | list[str]) -> dict | list[str]:
    def hidden(key: str) -> bool:
        return key.strip() in SECRET_KEYS
    if isinstance(overrides, dict):
        return {k: "<redacted>" if hidden(k) else v for k, v in overrides.items()}
    return [f"{t.split('=', 1)[0]}=<redacted>" if hidden(t.split("=", 1)[0].strip()) else t for t in overrides]


def describe(jobs: Iterable[Job]) -> list[str]:
    """One line per job for listings."""
    return [f"{j.id}  {j.status:<8}  {j.action:<14}  parent={j.record.get('parent_job_id') or '-'}" for j in jobs]
