"""`skillbank runner generate`: workflow checks, the demo's runner is up to date, a generated runner runs."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner import runner_gen
from runner.cli import main as cli_main
from runner.runner_gen import WorkflowError, load_workflow, render

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "examples" / "demo_workflow.yaml"
DEMO_PY = REPO / "examples" / "demo_workflow.py"


def write(tmp_path: Path, workflow: dict) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return path


def tiny(**changes) -> dict:
    workflow = {"name": "tiny", "params": {"data": "d", "model": "m.pth"},
                "steps": [{"name": "evaluate", "action": "evaluate",
                           "overrides": {"evaluate.checkpoint": "${model}"}}]}
    workflow.update(changes)
    return workflow


def test_demo_runner_is_regenerated_byte_for_byte(tmp_path):
    out = tmp_path / "demo_workflow.py"
    assert cli_main(["runner", "generate", "--workflow", str(DEMO_YAML), "--out", str(out)]) == 0
    assert out.read_bytes() == DEMO_PY.read_bytes(), "examples/demo_workflow.py is stale: run `skillbank runner " \
                                                     "generate --workflow examples/demo_workflow.yaml`"
    assert cli_main(["runner", "generate", "--workflow", str(DEMO_YAML), "--check"]) == 0


def test_check_reports_a_stale_runner(tmp_path, capsys):
    path = write(tmp_path, tiny())
    runner_gen.generate(path)
    assert cli_main(["runner", "generate", "--workflow", str(path), "--check"]) == 0
    path.with_suffix(".py").write_text(path.with_suffix(".py").read_text() + "# edited\n")
    assert cli_main(["runner", "generate", "--workflow", str(path), "--check"]) == 1
    assert "stale" in capsys.readouterr().err


def test_generated_runner_imports_only_the_sdk_and_the_standard_library():
    tree = ast.parse(DEMO_PY.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
            if node.module == "sdk":
                assert [a.name for a in node.names] == ["SkillBank"]
    assert modules - {"sdk"} <= set(sys.stdlib_module_names) | {"__future__"}, modules


def test_runner_chains_parents_and_automl_policy(tmp_path):
    workflow = tiny(steps=[
        {"name": "train", "action": "train", "automl_policy": True, "spec": {"train": {"num_epochs": "${epochs}"}}},
        {"name": "export", "action": "export", "parent": "train"},
    ], params={"epochs": 2})
    text = render(load_workflow(write(tmp_path, workflow)), "wf.yaml", "wf.py")
    assert 'jobs["train"] = submit(bank, params, "train",' in text
    assert 'automl_policy="on"' in text  # YAML's unquoted `on` is a boolean
    assert 'jobs["export"] = submit(bank, params, "export", parent=jobs["train"])' in text
    assert 'type=int, default=PARAMS["epochs"]' in text
    namespace: dict = {}
    exec(compile(text, "wf.py", "exec"), namespace)
    assert namespace["expand"]({"a": "${epochs}", "b": ["x/${epochs}/y"]}, {"epochs": 2}) == {"a": 2, "b": ["x/2/y"]}


def test_the_runner_template_is_python_with_only_known_placeholders():
    text = (REPO / "runner" / runner_gen.TEMPLATE).read_text()
    ast.parse(text)
    names = {m.group("name") for m in runner_gen.PLACEHOLDER.finditer(text)}
    assert names == {"NAME", "DESCRIPTION", "CHAIN", "SOURCE", "SCRIPT", "USAGE", "WORKSPACE", "PARAMS", "CALLS",
                     "OPTIONS"}


def test_only_a_bool_param_brings_the_flag_parser(tmp_path):
    workflow = tiny(params={"model": "m.pth", "verbose": False, "sizes": [True]})
    text = render(load_workflow(write(tmp_path, workflow)), "wf.yaml", "wf.py")
    assert 'type=_flag, default=PARAMS["verbose"]' in text and 'type=_flag, nargs="+"' in text
    namespace: dict = {}
    exec(compile(text, "wf.py", "exec"), namespace)
    assert namespace["_flag"]("Yes") is True and namespace["_flag"]("0") is False
    assert "_flag" not in render(load_workflow(write(tmp_path, tiny())), "wf.yaml", "wf.py")


@pytest.mark.parametrize("changes, message", [
    ({"steps": [{"name": "e", "action": "evaluate", "parent": "t"}]}, "parent must be an earlier step"),
    ({"steps": [{"name": "e", "action": "evalute"}]}, "choose one of"),
    ({"steps": [{"name": "e", "action": "evaluate", "overrides": {"a": "${nope}"}}]}, "${nope}"),
    ({"steps": [{"name": "e", "action": "evaluate", "wait": True}]}, "steps[0].wait: unknown key"),
    ({"steps": [{"name": "e", "action": "evaluate"}, {"name": "e", "action": "export"}]}, "unique identifier"),
    ({"steps": [{"name": "t", "action": "train", "automl_policy": "maybe"}]}, "use on or off"),
    ({"steps": []}, "non-empty list"),
])
def test_bad_workflows_are_refused_with_the_key_and_the_fix(tmp_path, changes, message):
    path = write(tmp_path, tiny(**changes))
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_generated_runner_runs_its_jobs(tmp_path):
    """A two-step workflow on the packaged base model and four val images, run as a plain script."""
    from runner import base_model

    data = base_model.generate_data(tmp_path / "data", num_train=0, num_val=4)
    spec = base_model.eval_spec(data["val_image_dir"], data["val_json_file"], "${model}", "unused")
    del spec["results_dir"]
    workflow = {
        "name": "tiny", "workspace": str(tmp_path / "ws"),
        "params": {"model": "missing.pth", "threshold": 0.2},
        "steps": [
            {"name": "evaluate", "action": "evaluate", "spec": spec},
            {"name": "inference", "action": "inference",
             "spec": {"model": base_model.model_section(), "dataset": {
                 "infer_data_sources": {"image_dir": [data["val_image_dir"]], "captions": ["red circle", "star"]},
                 "workers": 0, "augmentation": {"test_random_resize": 256, "random_resize_max_size": 320}}},
             "overrides": {"inference.checkpoint": "${model}", "inference.conf_threshold": "${threshold}"}},
        ],
    }
    script = runner_gen.generate(write(tmp_path, workflow))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script), "--model", str(base_model.BASE_MODEL)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[workflow] evaluate job" in done.stdout and "mAP50:" in done.stdout
    jobs = json.loads(done.stdout[done.stdout.rindex("{"):])
    assert list(jobs) == ["evaluate", "inference"]
    inference = tmp_path / "ws" / "jobs" / jobs["inference"]
    assert yaml.safe_load((inference / "spec.yaml").read_text())["inference"]["conf_threshold"] == 0.2
    assert len(list((inference / "results").rglob("images_annotated/*.jpg"))) == 4
