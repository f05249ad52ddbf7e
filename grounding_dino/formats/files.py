"""What the readers share: how they say what is wrong and where, JSON / JSON-lines loading, the box check."""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Tuple


class FormatError(ValueError):
    """A file that does not follow its format. `problem` says what; `path`, `line` (JSON lines) or `section`,
    `index` and `entry_id` (an entry of a JSON file, such as annotations[3] with id 7) say where.

    Callers that report in their own words (the data pipeline, preflight findings) read the fields; str() is the
    plain "<path> line 3: <problem>" form.
    """

    def __init__(self, path: Any, problem: str, *, line: Optional[int] = None, section: Optional[str] = None,
                 index: Optional[int] = None, entry_id: Any = None):
        self.path, self.problem, self.line = str(path), problem, line
        self.section, self.index, self.entry_id = section, index, entry_id
        super().__init__(f"{self.where}: {problem}")

    @property
    def place(self) -> str:
        """Where in the file, without the path: "line 3", "annotations[3] (id 7)", or "" for the whole file."""
        parts = [f"line {self.line}"] if self.line is not None else []
        if self.section is not None:
            parts.append(self.section + (f"[{self.index}]" if self.index is not None else ""))
            if self.section == "annotations":
                parts.append(f"(id {self.entry_id})")
        return " ".join(parts)

    @property
    def where(self) -> str:
        return f"{self.path} {self.place}" if self.place else self.path


class NotJson(FormatError):
    """The file (or one line of a JSON-lines file) is not JSON text at all."""


def load_json(path: Any) -> Any:
    """The parsed file; a missing file raises FileNotFoundError for the caller to name in its own terms."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise NotJson(path, f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno) from None
    except UnicodeDecodeError:
        raise NotJson(path, "not UTF-8 text") from None


def json_lines(path: Any) -> Iterator[Tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise NotJson(path, "not UTF-8 text", line=lineno) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise NotJson(path, f"not valid JSON ({e.msg}, column {e.colno})", line=lineno) from None
            yield lineno, value


def is_box(box: Any) -> bool:
    """Four numbers, none of them NaN (JSON readers accept NaN) or a bool."""
    return isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in box)
