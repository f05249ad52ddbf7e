"""status.json: the JSON-lines progress file every action writes (NVIDIA TAO's format).

One JSON object per line: `date` (M/D/YYYY), `time` (H:M:S), `status` (STARTED/RUNNING/SUCCESS/FAILURE/SKIPPED, and
PREEMPTED: training stopped on SIGTERM/SIGUSR1 after saving a checkpoint, resumable; see grounding_dino.preemption),
`verbosity`, `message`, then any extra fields (epoch lines: epoch, step, max_epoch, ...) and an optional `kpi` dict.
Only global rank 0 writes; the caller says which rank it is. No torch import, so any action can reuse it.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

STATUSES = ("STARTED", "RUNNING", "SUCCESS", "FAILURE", "SKIPPED", "PREEMPTED")
VERBOSITIES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StatusWriter:
    """Appends status lines to `<results_dir>/status.json`.

    Each line goes out in one `write` on an O_APPEND descriptor, so a reader never sees half a line and a crash
    loses at most the line being written.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(
        self,
        status: str = "RUNNING",
        message: Optional[str] = None,
        *,
        verbosity: str = "INFO",
        kpi: Optional[Mapping[str, Any]] = None,
        **fields: Any,
    ) -> Optional[dict]:
        """Write one line; returns the record written (None on ranks that do not write)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if verbosity not in VERBOSITIES:
            raise ValueError(f"verbosity must be one of {VERBOSITIES}, got {verbosity!r}")
        if not self.enabled:
            return None
        now = datetime.now()
        record: dict = {
            "date": f"{now.month}/{now.day}/{now.year}",
            "time": f"{now.hour}:{now.minute}:{now.second}",
            "status": status,
            "verbosity": verbosity,
        }
        if message:
            record["message"] = message
        record.update({k: _plain(v) for k, v in fields.items()})
        if kpi:
            record["kpi"], reasons = json_safe(dict(kpi))
            # a metric written as null says why; reasons the caller gives (null_reasons=...) are kept
            reasons.update(record.get("null_reasons") or {})
            if reasons:
                record["null_reasons"] = reasons
        line = json.dumps(record, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return record


class Report:
    """What a finished action says on its SUCCESS line (the action sets it inside `reported`)."""

    def __init__(self) -> None:
        self.message: Optional[str] = None
        self.kpi: Optional[Mapping[str, Any]] = None
        self.fields: Dict[str, Any] = {}

    def succeed(self, message: str, *, kpi: Optional[Mapping[str, Any]] = None, **fields: Any) -> None:
        self.message, self.kpi, self.fields = message, kpi, fields


@contextmanager
def reported(writer: StatusWriter, activity: str) -> Iterator[Report]:
    """STARTED before the body, then SUCCESS with what the body set on the Report, or FAILURE naming the error
    (which propagates)."""
    writer.write("STARTED", f"Starting {activity}.")
    outcome = Report()
    try:
        yield outcome
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        writer.write("FAILURE", f"{activity[:1].upper()}{activity[1:]} failed: {reason}", verbosity="ERROR")
        raise
    writer.write("SUCCESS", outcome.message or f"{activity[:1].upper()}{activity[1:]} finished.",
                 kpi=outcome.kpi, **outcome.fields)


def read_status(path: str | os.PathLike) -> list[dict]:
    """Parse a status.json file into its records (raises ValueError naming the first bad line)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from err
    return records


def json_safe(value: Any, path: str = "") -> Tuple[Any, Dict[str, str]]:
    """(`value` with every NaN or infinite number, also inside dicts and lists, replaced by None, {dotted path of
    each: the reason}), so JSON can be written with allow_nan=False and a null still says why it is one."""
    reasons: Dict[str, str] = {}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out[key], found = json_safe(item, f"{path}.{key}" if path else str(key))
            reasons.update(found)
        return out, reasons
    if isinstance(value, (list, tuple)):
        out_list = []
        for i, item in enumerate(value):
            clean, found = json_safe(item, f"{path}[{i}]")
            out_list.append(clean)
            reasons.update(found)
        return out_list, reasons
    plain = _plain(value)
    if plain is None and value is not None:
        reasons[path] = f"not a finite number ({_scalar(value)})"
    return plain, reasons


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy numbers become Python numbers, NaN/Inf become null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
