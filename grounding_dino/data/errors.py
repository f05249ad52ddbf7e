"""How bad data is reported: structural problems raise, bad boxes are dropped and counted."""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional, Sequence, Tuple

from ..errors import UserError


class DataError(UserError, ValueError):
    """Data that cannot be trained or evaluated on as it is: the message names the file (and line), the problem and
    the fix, and entry points show it alone (exit code 2)."""

    def __init__(self, message: str):
        super().__init__(_unwrapped(message, type(self)))


def _unwrapped(message: str, cls: type) -> str:
    """The original message of an error re-raised by a DataLoader worker. torch rebuilds the exception in the main
    process from "Caught DataError in DataLoader worker process 0. Original Traceback ...: DataError: <message>",
    which would put a worker's traceback in front of the user."""
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if message.startswith(f"Caught {cls.__name__} ") and "\nOriginal Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].rstrip("\n")
    return message


class DataWarning(UserWarning):
    """Data that was repaired or partly ignored (dropped boxes, trimmed negatives)."""


class BoxAudit:
    """Clamps boxes to their image, drops degenerate ones, and summarises the drops in one warning."""

    def __init__(self):
        self.dropped: Counter = Counter()
        self.first: Optional[str] = None

    def clean(self, box: Sequence[float], width: int, height: int, where: str) -> Optional[Tuple[float, ...]]:
        """Return the box (x1, y1, x2, y2) clamped to the image, or None when it has to be dropped.

        `box` is 4 numbers (the format readers check that); `where` names the record ("file a.jsonl line 7") for
        the summary line.
        """
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 <= x1 or y2 <= y1:
            return self._drop("zero-area", where)
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            return self._drop("outside image", where)
        return x1, y1, x2, y2

    def _drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        if self.first is None:
            self.first = where
        return None

    def summary(self) -> Optional[str]:
        total = sum(self.dropped.values())
        if not total:
            return None
        parts = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        return f"dropped {total} box{'es' if total != 1 else ''}: {parts} (first: {self.first})"

    def warn(self) -> None:
        message = self.summary()
        if message:
            warnings.warn(message, DataWarning, stacklevel=3)
