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
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from sdk.errors import SkillBankError

WIDTH = 116
STEP_KEYS = ("name", "action", "parent", "automl_policy", "spec", "overrides")
WORKFLOW_KEYS = ("name", "description", "workspace", "params", "steps")
PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    args = [f'"{step["action"]}"']
    if "parent" in step:
        args.append(f'parent=jobs["{step["parent"]}"]')
    if "automl_policy" in step:
        args.append(f'automl_policy="{step["automl_policy"]}"')
    for key in ("spec", "overrides"):
        if key in step and step[key] not in (None, {}):
            args.append(f"{key}={literal(step[key], 8, len(key) + 1)}")
    head = f'    jobs["{step["name"]}"] = submit(bank, params, '
    if len(head) + sum(len(a) + 2 for a in args) <= WIDTH and all("\n" not in a for a in args):
        return head + ", ".join(args) + ")"
    return head + args[0] + ",\n" + "".join(f"        {a},\n" for a in args[1:]) + "    )"


def _option(name: str, default: Any) -> str:
    """An argparse option for a param: typed like its default; a list param takes one or more values."""
    sample = default[0] if isinstance(default, list) and default else default
    kind = {bool: "_flag", int: "int", float: "float"}.get(type(sample), "str")
    many = ", nargs=\"+\"" if isinstance(default, list) else ""
    return (f'    parser.add_argument("--{name.replace("_", "-")}", dest="{name}", type={kind}{many}, '
            f'default=PARAMS["{name}"],\n                        help="default: %(default)s")')


TEMPLATE = '''\
#!/usr/bin/env python3
"""{title}

{description}

Steps: {chain}

Generated from {source} by `skillbank runner generate`: a plain script that uses only the skill bank
SDK's public API (`sdk.SkillBank`); copy it and edit it freely. "${{name}}" in a spec value or override is replaced
by the param `name` (its command-line option).

    python {script} [--workspace DIR] [--PARAM VALUE ...]

Params: {usage}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from sdk import SkillBank

WORKSPACE = {workspace}
PARAMS = {params}
# Log lines worth echoing while a job runs: the SDK's and AutoML's tagged lines, and evaluation metrics.
PROGRESS = re.compile(r"^(\\[(skillbank|automl)\\]|\\s*mAP(50)?: )")


def expand(value, params):
    """`value` with every "${{name}}" replaced by params[name]; a string that is only "${{name}}" becomes the value."""
    if isinstance(value, dict):
        return {{k: expand(v, params) for k, v in value.items()}}
    if isinstance(value, list):
        return [expand(v, params) for v in value]
    if isinstance(value, str):
        whole = re.fullmatch(r"\\$\\{{(\\w+)\\}}", value)
        if whole:
            return params[whole.group(1)]
        return re.sub(r"\\$\\{{(\\w+)\\}}", lambda m: str(params[m.group(1)]), value)
    return value


def follow(bank, job_id, poll_s=1.0):
    """Wait for a job, echoing its progress lines; return its final record."""
    shown = 0
    while True:
        job = bank.status(job_id)
        lines = bank.logs(job_id).splitlines()
        for line in lines[shown:]:
            if PROGRESS.match(line):
                print(f"    {{line.strip()}}", flush=True)
        shown = len(lines)
        if job.status in ("done", "error", "canceled"):
            return job
        time.sleep(poll_s)


def submit(bank, params, action, parent=None, automl_policy=None, spec=None, overrides=None):
    """Create one job, follow it to the end and return its id; stop the workflow if it does not end done."""
    started = time.monotonic()
    job = bank.create_job(action, spec=expand(spec, params), overrides=expand(overrides or {{}}, params),
                          parent_job_id=parent, automl_policy=automl_policy)
    print(f"[workflow] {{action}} job {{job.id}} started" + (f" (parent {{parent}})" if parent else ""), flush=True)
    job = follow(bank, job.id)
    print(f"[workflow] {{action}} job {{job.id}}: {{job.status}} in {{time.monotonic() - started:.0f}} s", flush=True)
    if job.status != "done":
        print(bank.logs(job.id, tail=20), file=sys.stderr)
        raise SystemExit(f"{{action}} job {{job.id}} ended {{job.status}}: {{job.error}}")
    return job.id


def run(bank, params):
    """Run the steps in order; returns {{step name: job id}}."""
    params = {{**PARAMS, **params}}
    jobs = {{}}
{calls}
    return jobs


{flag}def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\\n")[0])
    parser.add_argument("--workspace", default=WORKSPACE, help="SDK workspace (default: %(default)s)")
{options}
    args = vars(parser.parse_args(argv))
    jobs = run(SkillBank(args.pop("workspace")), args)
    print(json.dumps(jobs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


# Only written when a param is a bool: argparse's type=bool would take any non-empty text as True.
FLAG = '''def _flag(text):
    return text.lower() in ("1", "true", "yes", "on")


'''


def render(workflow: Dict[str, Any], source: str, script: str) -> str:
    """The runner's source for a checked workflow; `source`/`script` are the names shown in its docstring."""
    params = workflow["params"]
    steps = workflow["steps"]
    description = " ".join(str(workflow.get("description") or "").split())
    return TEMPLATE.format(
        title=f"Runner for the workflow `{workflow['name']}`.",
        description=_wrap(description) if description else "(no description)",
        chain=_wrap(" -> ".join(f"{s['name']} ({s['action']}" + (f", parent {s['parent']}" if "parent" in s else "")
                                + (f", automl {s['automl_policy']}" if "automl_policy" in s else "") + ")"
                                for s in steps) + "."),
        source=source,
        script=script,
        usage=_wrap(", ".join(f"--{k.replace('_', '-')}" for k in params) or "none"),
        workspace=_flat(workflow.get("workspace") or "workspace"),
        params=literal(params, 0, len("PARAMS = ")),
        calls="\n".join(_call(s) for s in steps),
        options="\n".join(_option(k, v) for k, v in params.items()),
        flag=FLAG if any(isinstance(v, bool) or (isinstance(v, list) and v and isinstance(v[0], bool))
                         for v in params.values()) else "",
    )


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
