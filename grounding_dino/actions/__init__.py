"""The backend's action registry: spec action name -> the function that runs it.

Each entry is a "module:function" string resolved on first use, so importing this module (the CLI and the job
runner do it before anything heavy) never imports torch. An action function takes an `ExperimentConfig` and
returns a process exit code. To add an action, add one line to `_REGISTRY` (or call `register_action`).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

from grounding_dino.config import ACTIONS, ExperimentConfig

Action = Callable[[ExperimentConfig], int]

_REGISTRY: Dict[str, str] = {
    "train": "grounding_dino.actions.train:run_training",
    "evaluate": "grounding_dino.actions.evaluate:run_evaluate",
    "inference": "grounding_dino.actions.inference:run_inference",
    "export": "grounding_dino.actions.export:run_export",
    "quantize": "grounding_dino.actions.quantize:run_quantize",
    "gen_trt_engine": "grounding_dino.actions.gen_trt_engine:run_gen_trt_engine",
}


class ActionError(LookupError):
    """Base class: the requested action cannot be run by this backend."""


class UnknownActionError(ActionError):
    """The name is not a Grounding DINO action at all."""


class ActionUnavailableError(ActionError):
    """A real action whose implementation is not built or cannot be imported here."""


def register_action(name: str, target: str) -> None:
    """Register (or replace) the "module:function" that runs action `name`."""
    module, sep, function = target.partition(":")
    if not sep or not module or not function:
        raise ValueError(f"action target must look like 'package.module:function', got {target!r}")
    _REGISTRY[name] = target


def available_actions() -> list[str]:
    """Actions that have an implementation registered (whether their imports succeed is checked on use)."""
    return sorted(_REGISTRY)


def get_action(name: str) -> Action:
    """The callable for action `name`; raises UnknownActionError or ActionUnavailableError with the reason."""
    target = _REGISTRY.get(name)
    if target is None:
        if name in ACTIONS:
            raise ActionUnavailableError(
                f"action {name!r} is not available yet in this backend (implemented: {', '.join(available_actions())})"
            )
        raise UnknownActionError(f"unknown action {name!r}; Grounding DINO actions are: {', '.join(ACTIONS)}")
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ActionUnavailableError(
            f"action {name!r} cannot run: importing {module_name} failed ({err}). "
            "Install the missing package or the matching pip extra."
        ) from err
    try:
        return getattr(module, function_name)
    except AttributeError as err:
        raise ActionUnavailableError(f"action {name!r}: {module_name} has no function {function_name!r}") from err
