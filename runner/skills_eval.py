"""`skillbank skills eval`: check that each skill's documented recipes work, and grade agents that follow them.

Every skill has `skills/<skill>/evals/evals.json` (schema: EVALS_SCHEMA below, described in
`skills/<skill>/evals/README.md`):

* `trigger`: queries with whether the skill should be chosen for them;
* `tasks`: a user prompt, a declarative setup (synthetic data, 1-based ids, an S3 copy, a spec file, commands that
  leave earlier state), the reference solution (shell commands and Python snippets), and assertions on what the
  workspace holds afterwards.

Without `--agent` each task's reference solution runs in a scratch workspace and the assertions are checked: this
proves the recipes work on this machine. With `--agent CMD` the command gets the prompt on stdin, runs in the
scratch workspace (bank folders copied in, placeholders in env vars) and is graded with the same assertions; the
trigger queries are put to it too (protocol in the README). Results go to `<out>/results/<stamp>.json` and the
table `<out>/BENCHMARK.md`.

`skillbank` and `grounding_dino` reach the solution through logging shims first on PATH, so an assertion can ask
which command was run and how it ended (exit code, stderr) whoever ran it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sdk.skill_info import BANK_ROOT

SKILLS_DIR = BANK_ROOT / "skills"
BANK_FOLDERS = ("skills", "references", "schemas", "examples")  # SKILL.md's paths are relative to the bank's root
PROGRAMS = ("skillbank", "grounding_dino")
S3_BUCKET = "skillbank-evals"
PLACEHOLDERS = ("WORKSPACE", "DATA", "BANK", "BASE_MODEL", "SPEC", "S3_DATA")
DEFAULT_TIMEOUT_S = 600
STDERR_KEPT = 20000

_CONDITION = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {"equals": {}, "min": {"type": "number"}, "max": {"type": "number"},
                   "startswith": {"type": "string"}, "endswith": {"type": "string"}, "contains": {"type": "string"},
                   "exists": {"type": "boolean"}},
}
_WHERE = {"type": "object", "minProperties": 1, "additionalProperties": _CONDITION}
_STEP = {"oneOf": [{"type": "string", "minLength": 1},
                   {"type": "object", "additionalProperties": False, "required": ["python"],
                    "properties": {"python": {"type": "string", "minLength": 1}}}]}
EVALS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "skill evals",
    "type": "object",
    "additionalProperties": False,
    "required": ["skill", "trigger", "tasks"],
    "properties": {
        "skill": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "trigger": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["query", "should_trigger"],
            "properties": {"query": {"type": "string", "minLength": 10}, "should_trigger": {"type": "boolean"},
                           "near_miss": {"type": "string"}}}},
        "tasks": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "prompt", "setup", "reference_solution", "assertions"],
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                "prompt": {"type": "string", "minLength": 20},
                "covers": {"type": "string"},
                "slow": {"type": "boolean"},
                "timeout_s": {"type": "integer", "minimum": 10, "maximum": 3600},
                "setup": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "synthetic": {"type": "object", "additionalProperties": False, "properties": {
                            "num_train": {"type": "integer", "minimum": 0},
                            "num_val": {"type": "integer", "minimum": 0},
                            "size": {"type": "integer", "minimum": 32},
                            "max_objects": {"type": "integer", "minimum": 1},
                            "seed": {"type": "integer"},
                            "colors": {"type": "array", "items": {"type": "string"}},
                            "shapes": {"type": "array", "items": {"type": "string"}}}},
                        "tao_layout": {"type": "boolean"},
                        "one_based_ids": {"type": "boolean"},
                        "s3": {"type": "boolean"},
                        "spec": {"enum": ["base_model"]},
                        "before": {"type": "array", "items": _STEP},
                    }},
                "reference_solution": {"type": "array", "minItems": 1, "items": _STEP},
                "assertions": {"type": "array", "minItems": 1, "items": {"oneOf": [
                    {"type": "object", "additionalProperties": False, "required": ["check", "glob"], "properties": {
                        "check": {"const": "files"}, "glob": {"type": "string"}, "why": {"type": "string"},
                        "min": {"type": "integer", "minimum": 0}, "max": {"type": "integer", "minimum": 0}}},
                    {"type": "object", "additionalProperties": False, "required": ["check", "glob", "where"],
                     "properties": {"check": {"enum": ["json", "kpi"]}, "glob": {"type": "string"},
                                    "where": _WHERE, "why": {"type": "string"}}},
                    {"type": "object", "additionalProperties": False, "required": ["check", "program"],
                     "properties": {"check": {"const": "called"}, "program": {"enum": list(PROGRAMS)},
                                    "args_contain": {"type": "array", "items": {"type": "string"}},
                                    "exit_code": {"type": "integer"},
                                    "stderr_contains": {"type": "array", "items": {"type": "string"}},
                                    "why": {"type": "string"}}},
                ]}},
            }}},
    },
}


class EvalError(Exception):
    """A problem with an evals file or a task's setup (not a failed assertion)."""


# ---------------------------------------------------------------------------------------------------------------
# evals files


def skill_names() -> list[str]:
    return sorted(p.parent.name for p in SKILLS_DIR.glob("*/SKILL.md"))


def skill_description(skill: str) -> str:
    import yaml

    text = (SKILLS_DIR / skill / "SKILL.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---", 2)[1])["description"]


def schema_problems(evals: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(EVALS_SCHEMA)
    problems = []
    for error in sorted(validator.iter_errors(evals), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(top)"
        problems.append(f"{where}: {error.message}")
    ids = [t.get("id") for t in evals.get("tasks", [])] if isinstance(evals, dict) else []
    problems += [f"tasks: id {i!r} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    return problems


def load_evals(skill: str) -> dict:
    path = SKILLS_DIR / skill / "evals" / "evals.json"
    if not path.is_file():
        raise EvalError(f"skill {skill!r} has no {path}")
    evals = json.loads(path.read_text(encoding="utf-8"))
    problems = schema_problems(evals)
    if problems:
        raise EvalError(f"{path} does not match the evals schema:\n  " + "\n  ".join(problems))
    if evals["skill"] != skill:
        raise EvalError(f"{path} says skill {evals['skill']!r}, its folder is {skill!r}")
    return evals


# ---------------------------------------------------------------------------------------------------------------
# a task's scratch folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SHIM = '''#!{python}
# Logs how {program} was called and how it ended (for the eval's assertions), then passes its exit code on.
import json, subprocess, sys, time
start = time.time()
proc = subprocess.Popen([{real!r}, *sys.argv[1:]], stderr=subprocess.PIPE)
kept = b""
for line in proc.stderr:  # passed through as it comes: the caller sees progress and errors live
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()
    kept = (kept + line)[-{kept}:]
rc = proc.wait()
with open({log!r}, "a", encoding="utf-8") as fh:
    fh.write(json.dumps({{"program": {program!r}, "args": sys.argv[1:], "exit_code": rc,
                         "stderr": kept.decode("utf-8", "replace"), "seconds": round(time.time() - start, 2)}}) + "\\n")
sys.exit(rc)
'''


@dataclass
class Scratch:
    root: Path
    env: dict[str, str]
    calls_log: Path
    base_path: str  # PATH without the shims, for setup commands that must not count as the solution's calls
    servers: list[Any] = field(default_factory=list)

    @property
    def workspace(self) -> Path:
        return Path(self.env["WORKSPACE"])

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


def _real_program(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise EvalError(f"{name} is not installed next to {sys.executable} or on PATH")
    return found


def base_model_path() -> Path:
    import importlib.util

    package = importlib.util.find_spec("grounding_dino")
    return Path(next(iter(package.submodule_search_locations))) / "assets" / "base_model.pth"


def _base_model_spec(path: Path) -> None:
    """The shipped base model's architecture (from its card) at CPU sizes: 128 px, batch 4, 1 epoch, no workers."""
    import yaml

    card = json.loads(base_model_path().with_suffix(".card.json").read_text(encoding="utf-8"))
    # backbone_norm stays 'auto': frozen norm layers while fine-tuning a pretrained backbone, as the demo does
    model = {k: v for k, v in card["model"].items() if k != "backbone_norm"}
    size = {"scales": [128], "train_random_resize": [128], "train_random_crop_min": 96, "train_random_crop_max": 128,
            "random_resize_max_size": 128, "test_random_resize": 128, "fixed_padding": False}
    spec = {"model": model,
            "dataset": {"batch_size": 4, "workers": 0, "augmentation": size},
            "train": {"pretrained_model_path": str(base_model_path()), "num_epochs": 1,
                      "activation_checkpoint": False}}
    path.write_text("# The shipped base model's architecture, sized for a CPU.\n"
                    + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def _shift_category_ids(coco_file: Path) -> None:
    coco = json.loads(coco_file.read_text(encoding="utf-8"))
    for category in coco["categories"]:
        category["id"] += 1
    for annotation in coco["annotations"]:
        annotation["category_id"] += 1
    coco_file.write_text(json.dumps(coco) + "\n", encoding="utf-8")


def _to_tao_layout(data: Path) -> None:
    """images/ folders become images.tar.gz, as TAO's data sources hold them (jobs extract them)."""
    from grounding_dino.data.synthetic import pack_images

    for images in sorted(data.glob("*/images")):
        pack_images(str(images))
        shutil.rmtree(images)


def _upload_to_s3(scratch: Scratch, data: Path) -> None:
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        raise EvalError(f"this task's setup asks for S3, which needs boto3 and moto[server] ({err}): "
                        "pip install -e '.[test]'") from None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    scratch.servers.append(server)
    host, port = server.get_host_and_port()
    # Credentials for the loopback server only; moto accepts any.
    scratch.env.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "AKIAEVALLOOPBACK0000",
                        "AWS_SECRET_ACCESS_KEY": "loopback-only-not-a-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    scratch.env.pop("AWS_PROFILE", None)
    client = boto3.client("s3", endpoint_url=scratch.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=scratch.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=scratch.env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=S3_BUCKET)
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        client.upload_file(str(path), S3_BUCKET, f"data/{path.relative_to(data).as_posix()}")
    scratch.env["S3_DATA"] = f"s3://{S3_BUCKET}/data"
    shutil.rmtree(data)  # the data lives only in S3 now: a solution that reads the local copy fails
    scratch.env.pop("DATA")


def prepare(task: dict, skill: str, root: Path) -> Scratch:
    """The scratch folder of one task: workspace (the cwd, bank folders copied in), data, shims, env."""
    root.mkdir(parents=True, exist_ok=True)
    workspace, data, bin_dir = root / "work", root / "data", root / "bin"
    workspace.mkdir()
    bin_dir.mkdir()
    for name in BANK_FOLDERS:
        if (BANK_ROOT / name).is_dir():
            # Copies, not links: an agent's edits stay in its scratch folder. The evals (answers) are left out.
            shutil.copytree(BANK_ROOT / name, workspace / name, ignore=shutil.ignore_patterns("evals"))
    calls_log = root / "calls.jsonl"
    for program in PROGRAMS:
        shim = bin_dir / program
        shim.write_text(_SHIM.format(python=sys.executable, program=program, real=_real_program(program),
                                     log=str(calls_log), kept=STDERR_KEPT), encoding="utf-8")
        shim.chmod(0o755)
    base_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SKILL_EVAL_"))}
    env.update({"WORKSPACE": str(workspace), "BANK": str(BANK_ROOT.resolve()),
                "BASE_MODEL": str(base_model_path()), "PATH": os.pathsep.join([str(bin_dir), base_path]),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SKILL_EVAL_SKILL": skill,
                "SKILL_EVAL_TASK": task["id"], "PYTHONUNBUFFERED": "1"})
    env.pop("SKILLBANK_WORKSPACE", None)
    scratch = Scratch(root, env, calls_log, base_path)
    setup = task["setup"]
    try:
        if "synthetic" in setup:
            from grounding_dino.data.synthetic import generate

            opts = {"num_train": 16, "num_val": 8, "size": 128, "max_objects": 3, "seed": 0,
                    "colors": ["red", "green", "blue"], "shapes": ["circle", "square"], **setup["synthetic"]}
            generate(str(data), num_train=opts["num_train"], num_val=opts["num_val"], image_size=opts["size"],
                     max_objects=opts["max_objects"], seed=opts["seed"], colors=opts["colors"],
                     shapes=opts["shapes"])
            env["DATA"] = str(data)
            if setup.get("one_based_ids"):
                _shift_category_ids(data / "eval_dataset" / "annotations.json")
            if setup.get("tao_layout") or setup.get("s3"):
                _to_tao_layout(data)
            if setup.get("s3"):
                _upload_to_s3(scratch, data)
        elif setup.get("s3") or setup.get("one_based_ids") or setup.get("tao_layout"):
            raise EvalError(f"task {task['id']}: s3, one_based_ids and tao_layout need synthetic data")
        if setup.get("spec") == "base_model":
            _base_model_spec(workspace / "spec.yaml")
            env["SPEC"] = str(workspace / "spec.yaml")
        for step in setup.get("before", []):
            result = run_step(step, {**env, "PATH": base_path}, workspace, timeout=DEFAULT_TIMEOUT_S)
            if result["exit_code"] != 0:
                raise EvalError(f"task {task['id']}: setup step failed (exit {result['exit_code']}): "
                                f"{_describe_step(step)}\n{result['output'][-2000:]}")
    except BaseException:
        scratch.close()
        raise
    return scratch


def fill(text: str, env: dict[str, str]) -> str:
    """The prompt with $NAME / ${NAME} placeholders replaced by this scratch folder's values."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return env.get(name, match.group(0))

    names = "|".join(PLACEHOLDERS)
    return re.sub(rf"\$\{{({names})\}}|\$({names})\b", value, text)


# ---------------------------------------------------------------------------------------------------------------
# running commands


def _run(argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float, stdin: str | None = None) -> dict:
    """Run in its own process group, killed whole on timeout (jobs' workers included)."""
    start = time.time()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return {"exit_code": proc.returncode, "stdout": out, "stderr": err, "timed_out": timed_out,
            "seconds": round(time.time() - start, 2)}


def _describe_step(step) -> str:
    return step if isinstance(step, str) else "python: " + step["python"].strip().splitlines()[0]


def run_step(step, env: dict[str, str], cwd: Path, timeout: float) -> dict:
    argv = ["bash", "-c", step] if isinstance(step, str) else [sys.executable, "-c", step["python"]]
    result = _run(argv, env, cwd, timeout)
    result["output"] = result.pop("stdout") + result.pop("stderr")
    result["step"] = _describe_step(step)
    return result


def run_steps(steps: Sequence, env: dict[str, str], cwd: Path, deadline: float) -> list[dict]:
    """Every step, in order, even after one fails: a refusal (exit 2) is an expected outcome of some tasks."""
    results = []
    for step in steps:
        left = deadline - time.time()
        if left <= 0:
            results.append({"step": _describe_step(step), "exit_code": None, "timed_out": True, "output": ""})
            continue
        results.append(run_step(step, env, cwd, left))
    return results


def reference_steps(skill: str, task_id: str) -> list:
    """A task's reference solution (for scripted agents that replay it)."""
    return next(t for t in load_evals(skill)["tasks"] if t["id"] == task_id)["reference_solution"]


TOKENS_LINE = re.compile(r'^\s*\{\s*"tokens"\s*:\s*(\d+)\s*\}\s*$', re.MULTILINE)


def reported_tokens(stderr: str) -> int | None:
    """The agent's token count: the sum of its `{"tokens": N}` lines on stderr, None when it reports none."""
    found = [int(n) for n in TOKENS_LINE.findall(stderr or "")]
    return sum(found) if found else None


# ---------------------------------------------------------------------------------------------------------------
# assertions


_PART = re.compile(r'([^.\[\]"]+)|\[(\d+)\]|\["([^"]+)"\]')


def lookup(document: Any, dotted: str) -> Any:
    """`a.b[0].c` in nested dicts/lists, `params["train.optim.lr"]` for a key holding dots; raises KeyError when a
    part is missing."""
    value = document
    for plain, index, quoted in _PART.findall(dotted):
        name = plain or quoted
        if name:
            if not isinstance(value, dict) or name not in value:
                raise KeyError(dotted)
            value = value[name]
        else:
            if not isinstance(value, list) or int(index) >= len(value):
                raise KeyError(dotted)
            value = value[int(index)]
    return value


def condition_problem(document: Any, dotted: str, condition: dict) -> str | None:
    """None when `document`'s `dotted` value meets `condition`, else what is wrong."""
    try:
        value = lookup(document, dotted)
    except KeyError:
        return None if condition.get("exists") is False else f"{dotted} is missing"
    if condition.get("exists") is False:
        return f"{dotted} exists ({value!r})"
    wanted = []
    if "equals" in condition and value != condition["equals"]:
        wanted.append(f"== {condition['equals']!r}")
    for bound, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
        if bound in condition and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                       and ok(value, condition[bound])):
            wanted.append(f"{bound} {condition[bound]}")
    for test in ("startswith", "endswith"):
        if test in condition and not (isinstance(value, str) and getattr(value, test)(condition[test])):
            wanted.append(f"{test} {condition[test]!r}")
    if "contains" in condition:
        needle = condition["contains"]
        items = value if isinstance(value, (list, dict)) else [value]
        if not any(needle in str(item) for item in items):
            wanted.append(f"contains {needle!r}")
    return f"{dotted} = {value!r}, wanted {', '.join(wanted)}" if wanted else None


def matching_files(workspace: Path, pattern: str) -> list[Path]:
    """Files under the workspace matching a glob, leaving out the copied bank folders."""
    found = []
    for path in sorted(workspace.glob(pattern)):
        parts = path.relative_to(workspace).parts
        if parts and parts[0] not in BANK_FOLDERS and path.is_file():
            found.append(path)
    return found


def _read_document(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _merged_kpis(path: Path) -> dict:
    merged: dict = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            merged.update(json.loads(line).get("kpi", {}))
    return merged


def _called_problem(assertion: dict, calls: list[dict]) -> str | None:
    def fits(call: dict) -> bool:
        return (call["program"] == assertion["program"]
                and all(any(want in arg for arg in call["args"]) for want in assertion.get("args_contain", []))
                and ("exit_code" not in assertion or call["exit_code"] == assertion["exit_code"])
                and all(want in call["stderr"] for want in assertion.get("stderr_contains", [])))

    if any(fits(call) for call in calls):
        return None
    seen = [f"{c['program']} {' '.join(c['args'][:3])}... -> {c['exit_code']}" for c in calls
            if c["program"] == assertion["program"]]
    return (f"no {assertion['program']} call with args containing {assertion.get('args_contain', [])}"
            + (f", exit code {assertion['exit_code']}" if "exit_code" in assertion else "")
            + (f", stderr containing {assertion['stderr_contains']}" if "stderr_contains" in assertion else "")
            + f"; calls seen: {seen or 'none'}")


def describe_assertion(assertion: dict) -> str:
    if assertion.get("why"):
        return assertion["why"]
    if assertion["check"] == "files":
        bounds = f"{assertion.get('min', 1)}..{assertion.get('max', 'any')}"
        return f"{bounds} files match {assertion['glob']}"
    if assertion["check"] == "called":
        return f"{assertion['program']} called with {assertion.get('args_contain', [])}"
    return f"{assertion['glob']}: {', '.join(assertion['where'])}"


def check_assertion(assertion: dict, workspace: Path, calls: list[dict]) -> str | None:
    """None when the assertion holds, else why not."""
    kind = assertion["check"]
    if kind == "called":
        return _called_problem(assertion, calls)
    files = matching_files(workspace, assertion["glob"])
    if kind == "files":
        low, high = assertion.get("min", 1), assertion.get("max")
        if len(files) < low or (high is not None and len(files) > high):
            names = [str(p.relative_to(workspace)) for p in files[:5]]
            wanted = f"{low}..{high if high is not None else 'any'}"
            return f"{len(files)} files match {assertion['glob']} (wanted {wanted})" + (f": {names}" if names else "")
        return None
    if not files:
        return f"no file matches {assertion['glob']}"
    problems = []
    for path in files:  # passes when one matching file meets every condition
        try:
            document = _merged_kpis(path) if kind == "kpi" else _read_document(path)
        except (ValueError, OSError) as err:
            problems.append(f"{path.relative_to(workspace)}: unreadable ({err})")
            continue
        found = [p for p in (condition_problem(document, k, c) for k, c in assertion["where"].items()) if p]
        if not found:
            return None
        problems.append(f"{path.relative_to(workspace)}: {'; '.join(found)}")
    return " | ".join(problems[:4])


def read_calls(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def grade(task: dict, scratch: Scratch) -> list[dict]:
    calls = read_calls(scratch.calls_log)
    results = []
    for assertion in task["assertions"]:
        assertion = json.loads(fill(json.dumps(assertion), scratch.env))  # "$WORKSPACE" in a condition's value
        problem = check_assertion(assertion, scratch.workspace, calls)
        results.append({"assertion": describe_assertion(assertion), "passed": problem is None,
                        **({"problem": problem} if problem else {})})
    return results


def _stop_leftover_jobs(workspace: Path) -> None:
    """Jobs a solution started and left running are canceled: they must not outlive the scratch folder."""
    from sdk.jobs import SkillBank

    for record in workspace.glob("**/jobs/*/job.json"):
        if record.relative_to(workspace).parts[0] in BANK_FOLDERS:
            continue
        try:
            status = json.loads(record.read_text(encoding="utf-8")).get("status")
            if status in ("pending", "running"):
                SkillBank(record.parent.parent.parent).cancel(record.parent.name, grace_s=2)
        except Exception as err:  # noqa: BLE001 - cleanup must go on to the next job
            print(f"[evals] could not cancel {record.parent}: {err}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# tasks and triggers


def run_task(skill: str, task: dict, scratch_root: Path, agent: str | None = None, keep: bool = False,
             log=print, grade_before: bool = False) -> dict:
    """Run one task (its reference solution, or the agent) in a fresh scratch folder and grade it.

    grade_before: also grade the workspace as setup left it (result["assertions_before"]), which is what an agent
    that does nothing would be graded on; a task must fail there, or its assertions prove nothing.
    """
    Path(scratch_root).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{task['id']}-", dir=scratch_root))
    timeout = task.get("timeout_s", DEFAULT_TIMEOUT_S)
    started = time.time()
    result: dict[str, Any] = {"id": task["id"], "passed": False}
    scratch = None
    try:
        scratch = prepare(task, skill, root)
        setup_s = time.time() - started
        if grade_before:
            result["assertions_before"] = grade(task, scratch)
        run_start = time.time()
        if agent is None:
            steps = run_steps(task["reference_solution"], scratch.env, scratch.workspace, run_start + timeout)
            result["steps"] = [{"step": s["step"], "exit_code": s["exit_code"], "seconds": s.get("seconds"),
                                **({"output_tail": s["output"][-1500:]} if s["exit_code"] not in (0, 2) else {})}
                               for s in steps]
        else:
            env = {**scratch.env, "SKILL_EVAL_MODE": "task"}
            ran = _run(["bash", "-c", agent], env, scratch.workspace, timeout, stdin=fill(task["prompt"], env))
            result.update({"agent_exit_code": ran["exit_code"], "timed_out": ran["timed_out"],
                           "tokens": reported_tokens(ran["stderr"]),
                           "agent_output_tail": (ran["stdout"] + ran["stderr"])[-1500:]})
        result["seconds"] = round(time.time() - run_start, 1)
        result["setup_seconds"] = round(setup_s, 1)
        result["assertions"] = grade(task, scratch)
        result["passed"] = all(a["passed"] for a in result["assertions"])
    except EvalError as err:
        result["error"] = str(err)
    finally:
        if scratch is not None:
            _stop_leftover_jobs(scratch.workspace)
            scratch.close()
        if keep:
            result["scratch"] = str(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    result.setdefault("seconds", round(time.time() - started, 1))
    verdict = "PASS" if result["passed"] else "FAIL"
    log(f"[evals] {skill}/{task['id']}: {verdict} in {result['seconds']} s")
    for line in [result.get("error")] + [f"  {a['assertion']}: {a['problem']}" for a in result.get("assertions", [])
                                        if not a["passed"]]:
        if line:
            log(f"[evals]   {line}")
    return result


TRIGGER_PROMPT = """You are deciding which skill to use for a user's request. Reply with exactly one skill name \
from the list below, or "none" if no skill fits. Put the answer on the last line of your output.

Skills:
{skills}

Request: {query}
"""


def run_triggers(skill: str, evals: dict, agent: str, cwd: Path, log=print) -> dict:
    """Each query goes to the agent (TRIGGER_PROMPT on stdin, SKILL_EVAL_MODE=trigger); its last output line is
    the chosen skill. A query that should trigger must get this skill's name; one that should not, anything else."""
    names = skill_names()
    listing = "\n".join(f"- {name}: {skill_description(name)}" for name in names)
    env = {**os.environ, "SKILL_EVAL_MODE": "trigger", "SKILL_EVAL_SKILL": skill,
           "SKILL_EVAL_SKILLS": ",".join(names)}
    rows, tokens = [], []
    for item in evals["trigger"]:
        ran = _run(["bash", "-c", agent], env, cwd, 300, stdin=TRIGGER_PROMPT.format(skills=listing,
                                                                                    query=item["query"]))
        lines = [line.strip().strip('"`.').lower() for line in ran["stdout"].splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
        correct = (answer == skill) == item["should_trigger"]
        rows.append({"query": item["query"], "should_trigger": item["should_trigger"], "answer": answer,
                     "correct": correct})
        if ran["exit_code"] != 0:
            rows[-1]["agent_exit_code"] = ran["exit_code"]
        count = reported_tokens(ran["stderr"])
        if count is not None:
            tokens.append(count)
    positives = [r for r in rows if r["should_trigger"]]
    negatives = [r for r in rows if not r["should_trigger"]]
    summary = {"accuracy": round(sum(r["correct"] for r in rows) / len(rows), 3) if rows else None,
               "recall": round(sum(r["correct"] for r in positives) / len(positives), 3) if positives else None,
               "specificity": round(sum(r["correct"] for r in negatives) / len(negatives), 3) if negatives else None,
               "tokens": sum(tokens) if tokens else None, "queries": rows}
    log(f"[evals] {skill} trigger: accuracy {summary['accuracy']} (recall {summary['recall']}, "
        f"specificity {summary['specificity']}) over {len(rows)} queries")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# reports


def _fmt(value, unit: str = "") -> str:
    return "–" if value is None else f"{value}{unit}"


def write_benchmark(out_dir: Path) -> Path:
    """BENCHMARK.md: one row per results file, then the newest run's tasks."""
    runs = []
    for path in sorted((out_dir / "results").glob("*.json")):
        try:
            runs.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except ValueError:
            continue
    lines = ["# Eval results", "",
             ("Written by `skillbank skills eval` from `results/*.json`. Mode `reference` runs each task's reference "
              "solution (do the documented recipes work here?); `agent` grades the agent command given."), "",
             "| run | mode | agent | tasks passed | pass rate | task time | trigger accuracy | tokens | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, run in runs:
        s = run["summary"]
        trigger = run.get("trigger") or {}
        lines.append(f"| {path.stem} | {run['mode']} | {('`' + run['agent'] + '`') if run.get('agent') else '–'} | "
                     f"{s['passed']}/{s['total']} | {s['pass_rate']:.0%} | {s['seconds']:.0f} s | "
                     f"{_fmt(trigger.get('accuracy'))} | {_fmt(s.get('tokens'))} | {run.get('machine', '')} |")
    if runs:
        path, run = runs[-1]
        lines += ["", f"## Newest run: {path.stem}", "", "| task | result | time | tokens | first problem |",
                  "|---|---|---|---|---|"]
        for task in run["tasks"]:
            problems = [a["problem"] for a in task.get("assertions", []) if not a["passed"]]
            first = task.get("error") or (problems[0] if problems else "")
            first = first.replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {task['id']} | {'pass' if task['passed'] else 'FAIL'} | {task['seconds']} s | "
                         f"{_fmt(task.get('tokens'))} | {first} |")
    target = out_dir / "BENCHMARK.md"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def evaluate_skill(skill: str, task_ids: Sequence[str] | None = None, agent: str | None = None,
                   out_dir: Path | None = None, scratch_root: Path | None = None, keep: bool = False,
                   log=print) -> dict:
    evals = load_evals(skill)
    tasks = evals["tasks"]
    if task_ids:
        unknown = sorted(set(task_ids) - {t["id"] for t in tasks})
        if unknown:
            raise EvalError(f"skill {skill} has no task {', '.join(unknown)}; its tasks: "
                            f"{', '.join(t['id'] for t in tasks)}")
        tasks = [t for t in tasks if t["id"] in task_ids]
    own_scratch = scratch_root is None
    scratch_root = Path(tempfile.mkdtemp(prefix="skill-evals-")) if own_scratch else scratch_root
    scratch_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        results = [run_task(skill, t, scratch_root, agent, keep, log) for t in tasks]
        trigger = run_triggers(skill, evals, agent, scratch_root, log) if agent and not task_ids else None
    finally:
        if own_scratch and not keep:
            shutil.rmtree(scratch_root, ignore_errors=True)
    passed = sum(r["passed"] for r in results)
    tokens = [r["tokens"] for r in results if r.get("tokens") is not None]
    if trigger and trigger["tokens"] is not None:
        tokens.append(trigger["tokens"])
    run = {"skill": skill, "mode": "agent" if agent else "reference", "agent": agent,
           "date": datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": f"{os.cpu_count()} CPUs", "tasks": results, "trigger": trigger,
           "summary": {"passed": passed, "total": len(results),
                       "pass_rate": passed / len(results) if results else 0.0,
                       "seconds": round(time.time() - started, 1),
                       "tokens": sum(tokens) if tokens else None}}
    out_dir = out_dir or SKILLS_DIR / skill / "evals"
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = out_dir / "results" / f"{stamp}.json"
    path.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    write_benchmark(out_dir)
    run["results_file"] = str(path)
    log(f"[evals] {skill}: {passed}/{len(results)} tasks passed; results in {path}")
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillbank skills", description="skill evals")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("eval", help="run skills' eval tasks (reference solutions, or an agent) and grade them")
    run.add_argument("--skill", action="append", help="a skill to evaluate (repeatable; default: every skill)")
    run.add_argument("--task", action="append", help="only this task id (repeatable)")
    run.add_argument("--agent", help="agent command run with bash per task (prompt on stdin, cwd the scratch "
                                     "workspace) and per trigger query; see skills/<skill>/evals/README.md")
    run.add_argument("--out", type=Path, help="where results/ and BENCHMARK.md go (default skills/<skill>/evals; "
                                              "only with one --skill)")
    run.add_argument("--scratch", type=Path, help="folder for the tasks' scratch folders (default: a temp folder)")
    run.add_argument("--keep", action="store_true", help="keep the scratch folders for inspection")
    commands.add_parser("check", help="validate every skill's evals.json against the schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            for skill in skill_names():
                load_evals(skill)
                print(f"{skill}: evals.json is valid")
            return 0
        skills = args.skill or skill_names()
        if args.out and len(skills) != 1:
            raise EvalError("--out needs exactly one --skill")
        if args.task and len(skills) != 1:
            raise EvalError("--task needs exactly one --skill")
        failed = 0
        for skill in skills:
            if skill not in skill_names():
                raise EvalError(f"no skill {skill!r}; skills: {', '.join(skill_names())}")
            run = evaluate_skill(skill, args.task, args.agent, args.out, args.scratch, args.keep)
            failed += run["summary"]["total"] - run["summary"]["passed"]
        return 1 if failed else 0
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
