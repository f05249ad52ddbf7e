"""What the readers share: how they say what is wrong and where, bounded JSON / JSON-lines loading, the box check.

Annotation files come from users, converters and agents, so loading is bounded: a JSON file larger than
`max_json_bytes()` (2 GiB unless SKILLBANK_MAX_JSON_BYTES says otherwise; COCO's largest public files are under 1 GiB),
a JSON-lines line longer than MAX_LINE_BYTES, or a value nested deeper than MAX_JSON_DEPTH (a COCO file nests 5
levels; deeper nesting only exhausts the stack of whatever walks it next) is a FormatError naming the limit.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from typing import Any, Dict, Iterator, Optional, Tuple

MAX_JSON_DEPTH = 64
MAX_LINE_BYTES = 16 << 20  # one image's record; real ODVG lines are a few KB
DEFAULT_MAX_JSON_BYTES = 2 << 30
MAX_COORDINATE = 1e8  # pixels; NaN fails every comparison, so `abs(v) <= MAX_COORDINATE` also refuses it
MAX_SIDE = 1_000_000  # pixels
MAX_JSON_BYTES_ENV = "SKILLBANK_MAX_JSON_BYTES"


class FormatError(ValueError):
    """A file that does not follow its format. `problem` says what was found and what is expected; `path`, `line`
    (JSON lines) or `section`, `index` and `entry_id` (an entry of a JSON file, such as annotations[3] with id 7) and
    `field` (the key inside the record or entry, e.g. category_id or detection.instances[0].bbox) say where.

    Callers that report in their own words (the data pipeline, preflight findings) read the fields; str() is the
    plain "<path> line 3 detection.instances[0].bbox: <problem>" form.
    """

    def __init__(self, path: Any, problem: str, *, line: Optional[int] = None, section: Optional[str] = None,
                 index: Optional[int] = None, entry_id: Any = None, field: Optional[str] = None):
        self.path, self.problem, self.line = str(path), problem, line
        self.section, self.index, self.entry_id, self.field = section, index, entry_id, field
        super().__init__(f"{self.where}: {problem}")

    @property
    def json_path(self) -> str:
        """The JSON path inside the file or the line: "annotations[3].category_id", "detection.instances[0]"."""
        entry = self.section + (f"[{self.index}]" if self.index is not None else "") if self.section else ""
        return ".".join(part for part in (entry, self.field) if part)

    @property
    def place(self) -> str:
        """Where in the file, without the path: "line 3 detection.instances[0].bbox", "annotations[3].bbox (id 7)",
        or "" for the whole file."""
        parts = [f"line {self.line}"] if self.line is not None else []
        if self.json_path:
            parts.append(self.json_path)
        if self.section == "annotations" and self.entry_id is not None:
            parts.append(f"(id {self.entry_id})")
        return " ".join(parts)

    @property
    def where(self) -> str:
        return f"{self.path} {self.place}" if self.place else self.path


class NotJson(FormatError):
    """The file (or one line of a JSON-lines file) is not JSON text at all, or is past a loading limit."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 5, 4
_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
          float: "a number", type(None): "null"}


def describe(value: Any) -> str:
    """What a JSON value is, for "found ..." messages: its kind and a shortened form, never the whole of a large or
    deep value (repr of a deep list would exhaust the stack)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # NaN, Infinity, -Infinity as JSON writes them
    if isinstance(value, str):
        return f"the string {json.dumps(value if len(value) <= 40 else value[:37] + '...', ensure_ascii=False)}"
    return f"{_KINDS.get(type(value), type(value).__name__)} {_SHORT.repr(value)}"


def found(value: Any, expected: str) -> str:
    return f"found {describe(value)}; expected {expected}"


def found_key(entry: Dict[str, Any], key: str, expected: str) -> str:
    """found() for entry[key], or "missing; expected ..." when the entry has no such key."""
    return found(entry[key], expected) if key in entry else f"missing; expected {expected}"


def max_json_bytes(path: Any) -> int:
    """The size limit of a JSON file read whole (0 = none), from SKILLBANK_MAX_JSON_BYTES when set."""
    raw = os.environ.get(MAX_JSON_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_JSON_BYTES
    if not raw.isascii() or not raw.isdigit():
        raise NotJson(path, f"not read: {MAX_JSON_BYTES_ENV}={raw!r} in the environment; expected a number of bytes "
                            "(0 = no limit)")
    return int(raw)


def load_json(path: Any) -> Any:
    """The parsed file; a missing file raises FileNotFoundError for the caller to name in its own terms."""
    limit = max_json_bytes(path)
    try:
        with open(path, encoding="utf-8") as f:
            size = os.fstat(f.fileno()).st_size
            # Characters never outnumber bytes, so reading one past the limit bounds a FIFO or device as well.
            text = f.read(limit + 1) if limit else f.read()
            if limit and (size > limit or len(text) > limit):
                raise NotJson(path, f"refused: the file is larger than the limit of {limit:,} bytes for a JSON file "
                                    f"read whole; set {MAX_JSON_BYTES_ENV} to a larger number of bytes (0 = no "
                                    "limit) if it is a real annotation file")
    except UnicodeDecodeError:
        raise NotJson(path, "not UTF-8 text") from None
    return _parse(text, path, None)


def _parse(text: str, path: Any, line: Optional[int]) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise NotJson(path, f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno if line is None else line) \
            from None
    except RecursionError:  # the decoder's own stack limit, reached long before MAX_JSON_DEPTH is checked below
        raise NotJson(path, _too_deep(), line=line) from None
    if not _depth_within(value, MAX_JSON_DEPTH):
        raise NotJson(path, _too_deep(), line=line)
    return value


def _too_deep() -> str:
    return (f"refused: values nest deeper than the limit of {MAX_JSON_DEPTH} levels (a COCO file nests 5, an ODVG "
            "record 5)")


def _depth_within(value: Any, limit: int) -> bool:
    """Level by level, without recursion, looking only into lists and objects."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return False
        below = []
        for node in level:
            items = node.values() if type(node) is dict else node if type(node) is list else ()
            below.extend(item for item in items if type(item) is dict or type(item) is list)
        level = below
    return True


def json_lines(path: Any) -> Iterator[Tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise NotJson(path, f"refused: the line is longer than the limit of {MAX_LINE_BYTES:,} bytes for one "
                                    "record (is it a COCO file, or JSON lines without line breaks?)", line=lineno)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise NotJson(path, "not UTF-8 text", line=lineno) from None
            if line.strip():
                yield lineno, _parse(line, path, lineno)


def is_coordinate(value: Any) -> bool:
    """A finite number of at most MAX_COORDINATE in size (JSON readers accept NaN, Infinity and 1e400, and an integer
    of 400 digits would overflow the float32 arrays boxes end in), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_COORDINATE


def is_box(box: Any) -> bool:
    """Four coordinates."""
    return isinstance(box, list) and len(box) == 4 and all(is_coordinate(v) for v in box)


def is_int(value: Any) -> bool:
    """An integer that fits the int64 tensors ids and labels end in, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2 ** 63) <= value < 2 ** 63


def is_side(value: Any) -> bool:
    """An image width or height: a positive integer up to MAX_SIDE."""
    return is_int(value) and 0 < value <= MAX_SIDE
