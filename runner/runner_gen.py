"""`skillbank runner generate`: turn a workflow YAML into a standalone Python runner that uses only the SDK.

A workflow is a chain of SDK jobs, the way an agent plans one:

    name: my_workflow                      # identifier; the runner's description comes from `description`
    description: One paragraph for the runner's docstring.
    workspace: workspace                   # default of the runner's --workspace
    params:                                # the runner's command-line options (--data DIR ...) with defaults;
      data: workspace/data                 # "${data}" in any spec value or override is replaced by the option's
      max_trials: 3                        # value ("${max_trials}" alone keeps its type: int, float, bool, list;
      captions: [red car, person]          # a list param takes one or more values on the command line)
    steps:                                 # run in order; each one waits for the previous one
      - name: train                        # unique; later steps name it as their parent
        action: train                      # an action of skills/grounding-dino (skill_info.yaml)
        automl_policy: "on"                # on | off (train only; omitted = the SDK's default routing)
        spec: {model: {...}, ...}          # a spec mapping, or a path to a spec YAML; optional
        overrides: {train.num_epochs: 2}   # dotted keys, shorthand keys, parent_epoch / parent_step
      - name: evaluate
        action: evaluate
        parent: train                      # its model, settings and results feed this job (parent_model ...)

The generated file is plain Python a user can copy and edit: a `run(bank, params)` with one `submit(...)` call per
step, a `follow` that echoes the job logs' progress lines, and a `main` with one option per param. Generating twice
from the same workflow gives the same bytes (`--check` compares the file on disk).

The runner's text lives in runner/templates/workflow_runner.py, itself a valid Python module (editors and linters
read it): its placeholders are `__NAME__` in the docstring and the string literal `"__NAME__"` where code goes, so
the runner's own `${name}`, braces and backslashes need no escaping; `render` substitutes them in one pass.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from sdk.errors import SkillBankError

WIDTH = 116
STEP_KEYS = ("name", "action", "parent", "automl_policy", "spec", "overrides")
WORKFLOW_KEYS = ("name", "description", "workspace", "params", "steps")
PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TEMPLATE = "templates/workflow_runner.py"  # package data of `runner` (pyproject.toml), so wheels carry it
PLACEHOLDER = re.compile(r'(?P<quote>"?)__(?P<name>[A-Z]+)__(?P=quote)')
BODY = " " * 4  # the indentation of a statement in the runner's functions


class WorkflowError(SkillBankError):
    """A workflow file that cannot become a runner; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# reading and checking a workflow


def load_workflow(path: str | Path) -> Dict[str, Any]:
    """The workflow in `path`, checked: known keys, unique step names, parents that run earlier, declared params."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise WorkflowError(f"{path}: cannot read the workflow ({err.strerror}). Fix: check the path.") from None
    except yaml.YAMLError as err:
        raise WorkflowError(f"{path}: not valid YAML ({err}).") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: a workflow is a mapping with keys {', '.join(WORKFLOW_KEYS)}.")
    _known(path, "", data, WORKFLOW_KEYS)
    if not isinstance(data.get("name"), str) or not IDENTIFIER.match(data["name"]):
        raise WorkflowError(f"{path}: name = {data.get('name')!r}: give an identifier (letters, digits, _).")
    params = data.setdefault("params", {}) or {}
    data["params"] = params
    if not isinstance(params, dict) or not all(isinstance(k, str) and IDENTIFIER.match(k) for k in params):
        raise WorkflowError(f"{path}: params must map identifiers to default values, got {params!r}.")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise WorkflowError(f"{path}: steps must be a non-empty list of steps ({', '.join(STEP_KEYS)}).")
    from sdk.skill_info import load_skill_info

    actions = load_skill_info().actions
    seen: List[str] = []
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            raise WorkflowError(f"{path}: {where} must be a mapping with keys {', '.join(STEP_KEYS)}.")
        _known(path, where + ".", step, STEP_KEYS)
        name = step.get("name")
        if not isinstance(name, str) or not IDENTIFIER.match(name) or name in seen:
            raise WorkflowError(f"{path}: {where}.name = {name!r}: give each step a unique identifier.")
        if step.get("action") not in actions:
            raise WorkflowError(f"{path}: {where}.action = {step.get('action')!r}: choose one of "
                                f"{', '.join(actions)}.")
        if "parent" in step and step["parent"] not in seen:
            raise WorkflowError(f"{path}: {where}.parent = {step['parent']!r}: a parent must be an earlier step "
                                f"({', '.join(seen) or 'none before this one'}).")
        if "automl_policy" in step:
            step["automl_policy"] = _policy(path, where, step["automl_policy"])
        if not isinstance(step.get("spec", {}), (dict, str)) or not isinstance(step.get("overrides", {}), dict):
            raise WorkflowError(f"{path}: {where}: spec is a mapping or a spec file path, overrides a mapping of "
                                "dotted keys to values.")
        for used in _params_used(step):
            if used not in params:
                raise WorkflowError(f"{path}: {where} uses ${{{used}}}, which is not declared under params. "
                                    f"Fix: add `{used}: <default>` to params.")
        seen.append(name)
    return data


def _known(path: Path, where: str, mapping: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise WorkflowError(f"{path}: {where}{unknown[0]}: unknown key (allowed: {', '.join(allowed)}).")


def _policy(path: Path, where: str, value: Any) -> str:
    # YAML 1.1 reads an unquoted `on` / `off` as a boolean.
    value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if value not in ("on", "off"):
        raise WorkflowError(f"{path}: {where}.automl_policy = {value!r}: use on or off.")
    return value


def _params_used(node: Any) -> List[str]:
    if isinstance(node, dict):
        return [p for v in node.values() for p in _params_used(v)]
    if isinstance(node, list):
        return [p for v in node for p in _params_used(v)]
    return PARAM.findall(node) if isinstance(node, str) else []


# ---------------------------------------------------------------------------------------------------------------
# writing Python


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flat(k)}: {_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise WorkflowError(f"cannot write {value!r} ({type(value).__name__}) into a runner: use YAML scalars, lists "
                        "and mappings only")


def literal(value: Any, indent: int, used: int = 0) -> str:
    """Python source for `value`: on one line when it fits in WIDTH (after `used` characters), else one item per
    line, indented by `indent` spaces."""
    flat = _flat(value)
    if indent + used + len(flat) <= WIDTH or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            head = f"{_flat(key)}: "
            lines.append(f"{pad}{head}{literal(item, indent + 4, len(head) + 1)},")
        return "{\n" + "\n".join(lines) + "\n" + " " * indent + "}"
    return "[\n" + "\n".join(f"{pad}{literal(item, indent + 4, 1)}," for item in value) + "\n" + " " * indent + "]"


def _call(step: Dict[str, Any]) -> str:
    """The step's statement in `run`, less the indentation of its first line (the template's placeholder has it)."""
    args = [f'"{step["action"]}"']
    if "parent" in step:
        args.append(f'parent=jobs["{step["parent"]}"]')
    if "automl_policy" in step:
        args.append(f'automl_policy="{step["automl_policy"]}"')
    for key in ("spec", "overrides"):
        if key in step and step[key] not in (None, {}):
            args.append(f"{key}={literal(step[key], 8, len(key) + 1)}")
    head = f'jobs["{step["name"]}"] = submit(bank, params, '
    if len(BODY + head) + sum(len(a) + 2 for a in args) <= WIDTH and all("\n" not in a for a in args):
        return head + ", ".join(args) + ")"
    return head + args[0] + ",\n" + "".join(f"        {a},\n" for a in args[1:]) + "    )"


def _option(name: str, default: Any) -> str:
    """An argparse option for a param: typed like its default; a list param takes one or more values."""
    sample = default[0] if isinstance(default, list) and default else default
    kind = {bool: "_flag", int: "int", float: "float"}.get(type(sample), "str")
    many = ", nargs=\"+\"" if isinstance(default, list) else ""
    return (f'parser.add_argument("--{name.replace("_", "-")}", dest="{name}", type={kind}{many}, '
            f'default=PARAMS["{name}"],\n                        help="default: %(default)s")')


def _template(with_flag: bool) -> str:
    """The runner template's text, less its `_flag` function and the two blank lines after it unless `with_flag`."""
    text = resources.files("runner").joinpath(TEMPLATE).read_text(encoding="utf-8")
    if with_flag:
        return text
    flag = next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == "_flag")
    lines = text.splitlines(keepends=True)
    return "".join(lines[:flag.lineno - 1] + lines[flag.end_lineno + 2:])


def render(workflow: Dict[str, Any], source: str, script: str) -> str:
    """The runner's source for a checked workflow; `source`/`script` are the names shown in its docstring."""
    params = workflow["params"]
    steps = workflow["steps"]
    description = " ".join(str(workflow.get("description") or "").split())
    chain = " -> ".join(f"{s['name']} ({s['action']}" + (f", parent {s['parent']}" if "parent" in s else "")
                        + (f", automl {s['automl_policy']}" if "automl_policy" in s else "") + ")" for s in steps)
    values = {
        "NAME": workflow["name"],
        "DESCRIPTION": _wrap(description) if description else "(no description)",
        "CHAIN": _wrap(chain + "."),
        "SOURCE": source,
        "SCRIPT": script,
        "USAGE": _wrap(", ".join(f"--{k.replace('_', '-')}" for k in params) or "none"),
        "WORKSPACE": _flat(workflow.get("workspace") or "workspace"),
        "PARAMS": literal(params, 0, len("PARAMS = ")),
        "CALLS": ("\n" + BODY).join(_call(s) for s in steps),
        "OPTIONS": ("\n" + BODY).join(_option(k, v) for k, v in params.items()),
    }
    # Only a bool param needs `_flag`: argparse's type=bool would take any non-empty text as True.
    with_flag = any(isinstance(v, bool) or (isinstance(v, list) and v and isinstance(v[0], bool))
                    for v in params.values())
    return PLACEHOLDER.sub(lambda m: values[m.group("name")], _template(with_flag))


def _wrap(text: str) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > WIDTH:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


def generate(workflow_path: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the runner of `workflow_path` to `out` (default: the same name with .py) and return its path."""
    workflow_path = Path(workflow_path)
    out = Path(out) if out else workflow_path.with_suffix(".py")
    text = render(load_workflow(workflow_path), workflow_path.name, out.name)
    out.write_text(text)
    return out


def check(workflow_path: str | Path, out: Optional[str | Path] = None) -> bool:
    """True when the runner on disk is what `generate` would write."""
    workflow_path = Path(workflow_path)
    out = Path(out) if out else workflow_path.with_suffix(".py")
    text = render(load_workflow(workflow_path), workflow_path.name, out.name)
    return out.is_file() and out.read_text() == text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="skillbank runner", description="Generated runner scripts.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("generate", help="write a standalone Python runner for a workflow YAML")
    gen.add_argument("--workflow", required=True, help="workflow YAML (see runner/runner_gen.py for the format)")
    gen.add_argument("--out", help="runner path (default: the workflow's path with .py)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if the runner on disk is stale")
    args = parser.parse_args(argv)
    if args.check:
        fresh = check(args.workflow, args.out)
        print("runner is up to date" if fresh else
              f"stale: regenerate with `skillbank runner generate --workflow {args.workflow}`",
              file=sys.stdout if fresh else sys.stderr)
        return 0 if fresh else 1
    print(generate(args.workflow, args.out))
    return 0
