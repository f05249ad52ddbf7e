"""The backend's user-error class: a mistake the user can fix (a missing or foreign checkpoint, unreadable data, a
TensorRT engine without TensorRT), as opposed to a bug.

Every entry point (the `grounding_dino` CLI, a job's worker, an AutoML trial) prints such an error's message alone,
without a traceback, and exits with `exit_code`; a job records the message as its error. The message names the spec
key, the path and the fix. Torch-free, so the CLIs can catch it without loading the model stack.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in the user's spec, files or environment; `str(error)` is the whole message shown."""

    exit_code = 2
