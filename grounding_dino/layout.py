"""Where every file of a run lives, and how it is written: the one place that names them.

Two folders nest. A job folder (`<workspace>/jobs/<id>/`, made by the SDK) holds the job record, the spec that ran,
the log and the results root. An action's results folder (TAO's names) holds its checkpoints, the latest-checkpoint
link, an AutoML run's best model, `experiment.yaml` and `status.json`. The SDK, the runner and the backend all read
and write through the names and functions here, so a file name is never spelled twice.

Torch-free on purpose: the SDK imports this module the way it imports grounding_dino.config.
"""
from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import yaml

PathLike = Union[str, os.PathLike]

# -- a job folder ------------------------------------------------------------------------------------------------
JOB_RECORD = "job.json"
JOB_SPEC = "spec.yaml"
JOB_LOG = "log.txt"
JOB_RESULTS = "results"
JOB_LOCK = ".lock"  # held for a moment while job.json changes
# Held (fcntl.flock) by the job's supervisor for its whole life, and holding its pid: one supervisor per job.
JOB_SUPERVISOR_LOCK = "supervisor.lock"
# The module a job's child process runs (`python -m <it> <job_dir>`); the SDK starts it by name, never imports it.
JOB_PROCESS_MODULE = "runner.job_process"

# -- an action's results folder ------------------------------------------------------------------------------------
EXPERIMENT_FILE = "experiment.yaml"
STATUS_FILE = "status.json"
CHECKPOINT_STEM = "model_epoch_{epoch:03d}_step_{step:05d}"
CHECKPOINT_SUFFIX = ".pth"
CHECKPOINT_RE = re.compile(r"^model_epoch_(\d+)_step_(\d+)\.pth$")
LATEST_LINK = "gdino_model_latest.pth"
BEST_MODEL_DIR = "best_model"
BEST_AUTOML = "best_automl.json"
# Held (fcntl.flock) by the run writing the folder, and holding its pid: one run per results folder.
RESULTS_LOCK = ".run.lock"
# replace_atomically's temporary files: "." + final name + "." + tempfile's 8 random characters + ".tmp"
TEMP_RE = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")


def results_dir_for(action: str, spec: Any) -> Path:
    """`<action>.results_dir` when set, else `<results_dir>/<action>`.

    `spec` is a spec dict or an ExperimentConfig; raises ValueError when neither folder is set.
    """
    if isinstance(spec, Mapping):
        own, root = (spec.get(action) or {}).get("results_dir"), spec.get("results_dir")
    else:
        own, root = getattr(getattr(spec, action), "results_dir", None), spec.results_dir
    if own:
        return Path(own)
    if root:
        return Path(root) / action
    raise ValueError(f"set results_dir (or {action}.results_dir): {action} needs a folder for its outputs")


def checkpoint_name(epoch: int, step: int) -> str:
    return CHECKPOINT_STEM.format(epoch=epoch, step=step) + CHECKPOINT_SUFFIX


def parse_checkpoint_name(name: str) -> Optional[Tuple[int, int]]:
    """(epoch, step) of a checkpoint file name, else None."""
    match = CHECKPOINT_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def checkpoints_at_step(folder: Path, step: int) -> list[Path]:
    """The checkpoints in `folder` saved at global step `step`, by name."""
    return sorted(p for p in folder.iterdir() if (parse_checkpoint_name(p.name) or (None, None))[1] == step)


def stale_temp_files(folder: PathLike) -> list[Path]:
    """The temporary files replace_atomically left in `folder` when a write was killed before its rename."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TEMP_RE.match(p.name) and (p.is_symlink() or p.is_file()))


def read_job_spec(job_dir: PathLike) -> dict:
    """The spec a job ran (or will run) with."""
    return yaml.safe_load((Path(job_dir) / JOB_SPEC).read_text(encoding="utf-8")) or {}


def replace_atomically(path: PathLike, write: Union[str, bytes, Callable[[str], None]]) -> None:
    """Write `path` through a hidden temporary file beside it, flushed to disk, then renamed over it.

    `write` is the text or bytes, or a function that writes the temporary path. A crash mid-write leaves at most a
    hidden `.*.tmp` file, never a truncated file under the final name, and readers see the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(write.encode("utf-8") if isinstance(write, str) else write)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


class LockHeld(Exception):
    """Another process holds the lock file `path`; `pid` is the holder written in it (None if it cannot be read)."""

    def __init__(self, path: PathLike, pid: Optional[int]):
        super().__init__(f"{path} is held by pid {pid if pid is not None else '(unknown)'}")
        self.path, self.pid = Path(path), pid


def take_lock(path: PathLike) -> int:
    """Take an exclusive fcntl.flock on `path` (created if missing) without waiting, and write this process's pid
    into it; returns the open descriptor. The lock lasts until every copy of the descriptor is closed, which the
    kernel does when its processes end, however they end: a killed holder never leaves a stale lock. Raises
    LockHeld when another process holds it. The file is never removed: a process blocked on an unlinked file would
    lock a name nobody else sees."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise LockHeld(path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    set_lock_holder(fd, os.getpid())
    return fd


def set_lock_holder(fd: int, pid: int) -> None:
    """Record `pid` as the holder of the lock open at `fd` (a lock handed to a child process names the child)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


def _lock_holder(fd: int, patience_s: float = 1.0) -> Optional[int]:
    """The pid written in a held lock file. A new holder writes it just after taking the lock, so until then the
    file is empty or names the previous, finished holder: read again for up to `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        pid = int(text) if text.isdigit() else None
        if (pid is not None and _pid_exists(pid)) or time.monotonic() >= deadline:
            return pid
        time.sleep(0.01)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
