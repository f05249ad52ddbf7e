"""User-facing errors of the skill bank. Each message says what is wrong, where, and how to fix it."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, List


class _Missing:
    """Marks a value that is absent (as opposed to a value that is null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class SkillBankError(Exception):
    """An error the user can fix; CLIs print the message and exit with `exit_code`."""

    exit_code = 2


def run_command(args: Any) -> int:
    """Run an argparse command (`args.func(args)`): its exit code, or a SkillBankError's one-line message on stderr
    and its exit code, never a traceback."""
    try:
        return args.func(args)
    except SkillBankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: the dotted key path, the offending value (MISSING if absent) and what is allowed."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        where = self.path or "<spec>"
        if self.value is MISSING:
            return f"{where}: {self.message}"
        return f"{where} = {_short_repr(self.value)}: {self.message}"


class SpecError(SkillBankError):
    """A spec (file, mapping or override) that cannot run; `issues` lists every problem found."""

    def __init__(self, issues: List[SpecIssue], header: str = ""):
        self.issues = list(issues)
        count = len(self.issues)
        self.header = header or f"the spec has {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([self.header + ":"] + [f"  {issue}" for issue in self.issues]))

    @classmethod
    def single(cls, path: str, value: Any, message: str) -> "SpecError":
        return cls([SpecIssue(path, value, message)])


def _short_repr(value: Any, limit: int = 80) -> str:
    """The value as the user wrote it in YAML/JSON terms (null, true, "text"), cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
