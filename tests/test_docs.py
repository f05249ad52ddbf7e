"""Docs that are executed: every shell and Python block of the skill bank's prose runs here, or says why not.

Documents: README.md, skills/*/SKILL.md, skills/*/references/*.md, references/grounding_dino/*.md.

Blocks fenced as ```bash, ```sh, ```console or ```python either run (the slow tests below) or carry a marker on
the line right above the fence (blank lines between are allowed):

    <!-- not-run: needs a CUDA GPU and TensorRT -->

The reason is required. Blocks under a README heading listed in COVERED_ELSEWHERE ("Section" or
"Section/Subheading") are run by the test file named there. Other fences (yaml, text, json) are not run; a ```yaml
block marked `<!-- spec: <action> -->` is a complete spec and is validated against that action's schema (fast test).

How a document runs (slow tests, one per document): its blocks run in order, in one scratch folder, each block as
`bash -e -o pipefail` (shell) or `python -c` (Python) with .venv/bin first on PATH. The scratch folder holds:

    references/, schemas/, skills/   links to the checkout (the docs' paths are relative to the repository root)
    examples/demo_workflow.yaml      a copy (the runner generator writes next to it)
    data/shapes/                     synthetic shapes, 16 train / 8 val images of 128 px (the docs' own generator)
    spec.yaml                        the shipped base model's architecture at CPU sizes: 128 px, batch 4, 1 epoch,
                                     no data-loader workers, data sources pointing at data/shapes, results_dir runs/spec

Substitution table, applied to a block's text before it runs (SUBSTITUTIONS, then the job placeholders):

    in the docs                                          replaced by
    /data/val/images, /data/val/annotations.json         <scratch>/data/shapes/eval_dataset/images, .../annotations.json
    /data/val (a dataset folder)                         <scratch>/data/shapes/eval_dataset
    --num-train 600 --num-val 100 --size 256             --num-train 16 --num-val 8 --size 128
    num_epochs=20, =10, =4; "num_epochs": 20, 6          num_epochs=1; "num_epochs": 1
    "automl.max_trials": 8; automl.max_trials=6          2
    export.input_width=960 export.input_height=544       export.input_width=160 export.input_height=128
    postgresql://... storage                             not run (marked)
    <train_job_id>                                       the newest train job in the scratch workspace
    <job_id>                                             the newest job there
    <study_name>                                         the newest AutoML train job's id (its study name)
    /abs/path/results                                    that job's results folder

The job placeholders become a shell lookup ("$(python .docs_job.py train)") evaluated when the command runs, so a
block may use the id of a job that an earlier line of the same block created.

Nothing else changes: a command that fails as written fails the test.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUN_LANGS = {"bash": "shell", "sh": "shell", "console": "shell", "python": "python"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
SPEC_MARK = re.compile(r"<!--\s*spec:\s*(?P<action>[a-z_]+)\s*-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<lang>[\w+-]*)\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")

# README sections whose blocks another test file runs as written.
COVERED_ELSEWHERE = {
    ("README.md", "Use your own data"): "tests/test_readme_commands.py",
    ("README.md", "Use pretrained weights"): "tests/test_readme_commands.py",
    ("README.md", "Scaling out/Multi-node training"): "tests/test_multinode.py",
    ("README.md", "Scaling out/AutoML across machines"): "tests/test_automl_postgres.py",
}

SUBSTITUTIONS = [
    ("/data/val/images", "{scratch}/data/shapes/eval_dataset/images"),
    ("/data/val/annotations.json", "{scratch}/data/shapes/eval_dataset/annotations.json"),
    ("/data/val", "{scratch}/data/shapes/eval_dataset"),
    ("--num-train 600 --num-val 100 --size 256", "--num-train 16 --num-val 8 --size 128"),
    ("num_epochs=20", "num_epochs=1"), ("num_epochs=10", "num_epochs=1"), ("num_epochs=4", "num_epochs=1"),
    ('"num_epochs": 20', '"num_epochs": 1'), ('"num_epochs": 6', '"num_epochs": 1'),
    ('"automl.max_trials": 8', '"automl.max_trials": 2'), ("automl.max_trials=6", "automl.max_trials=2"),
    ("export.input_width=960 export.input_height=544", "export.input_width=160 export.input_height=128"),
]


def documents() -> list[Path]:
    found = [ROOT / "README.md"]
    found += sorted((ROOT / "skills").glob("*/SKILL.md"))
    found += sorted((ROOT / "skills").glob("*/references/*.md"))
    found += sorted((ROOT / "references" / "grounding_dino").glob("*.md"))
    return [p for p in found if p.is_file()]


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    heading: str  # the nearest heading above (level 2 or deeper keeps its level-2 parent for COVERED_ELSEWHERE)
    section: str  # the nearest level-2 heading above
    not_run: Optional[str]
    spec_action: Optional[str]

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> Optional[str]:
        return RUN_LANGS.get(self.lang)

    @property
    def covered_by(self) -> Optional[str]:
        name = self.doc.name if self.doc.parent == ROOT else ""
        subsection = COVERED_ELSEWHERE.get((name, f"{self.section}/{self.heading}"))
        return subsection or COVERED_ELSEWHERE.get((name, self.section))


def blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    heading = section = ""
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            head = HEADING.match(lines[i])
            if head:
                heading = head.group(2)
                if len(head.group(1)) <= 2:
                    section = heading
            i += 1
            continue
        fence, start = match.group("fence"), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = lines[above] if above >= 0 else ""
        not_run = NOT_RUN.search(marker)
        spec = SPEC_MARK.search(marker)
        out.append(Block(doc, start + 1, match.group("lang").lower(), "\n".join(body) + "\n", heading, section,
                         not_run.group("reason") if not_run else None, spec.group("action") if spec else None))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in documents() for b in blocks(doc)]


# ---------------------------------------------------------------------------------------------------------------
# fast checks


def test_every_runnable_block_runs_or_says_why_not():
    problems = []
    for block in all_blocks():
        if block.kind is None:
            continue
        if block.not_run is not None and not block.not_run:
            problems.append(f"{block.where}: not-run marker without a reason")
        if block.not_run is None and block.covered_by is None and _runner_for(block.doc) is None:
            problems.append(f"{block.where}: no test runs this document; add it to DOC_RUNS or mark the block")
    assert not problems, "\n".join(problems)


def test_not_run_markers_sit_on_runnable_blocks():
    """A stray marker (above a yaml block, or a typo in the fence) would silently exempt nothing."""
    problems = []
    for doc in documents():
        lines = doc.read_text(encoding="utf-8").splitlines()
        marked = {b.line for b in blocks(doc) if b.not_run is not None and b.kind is not None}
        for n, line in enumerate(lines, 1):
            if NOT_RUN.search(line):
                nxt = n + 1
                while nxt <= len(lines) and not lines[nxt - 1].strip():
                    nxt += 1
                if nxt not in marked:
                    problems.append(f"{doc.relative_to(ROOT)}:{n}: not-run marker is not right above a "
                                    "bash/sh/console/python block")
    assert not problems, "\n".join(problems)


def test_marked_specs_validate(tmp_path):
    from sdk.spec import resolve_spec, validate

    marked = [b for b in all_blocks() if b.spec_action]
    assert marked, "no ```yaml block is marked <!-- spec: <action> -->"
    for block in marked:
        text = block.text.replace("$BASE", str(_base_model()))
        path = tmp_path / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        spec = resolve_spec(block.spec_action, str(path), ["results_dir=runs/x"])
        validate(spec, block.spec_action)


CATALOGUE_ENTRY = re.compile(r"^\|\s*`(?P<fragment>[^`]+)`")
CODE_DIRS = ("sdk", "runner", "grounding_dino")


def catalogue_fragments() -> list[tuple[str, str]]:
    """(fragment, where) for the first backticked cell of every table row in the error catalogue."""
    path = ROOT / "skills" / "grounding-dino" / "references" / "errors.md"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = CATALOGUE_ENTRY.match(line)
        if match:
            out.append((match.group("fragment"), f"{path.relative_to(ROOT)}:{n}"))
    return out


def test_error_catalogue_messages_exist_in_code():
    fragments = catalogue_fragments()
    assert len(fragments) >= 40, "the error catalogue lost its entries"
    code = "\n".join(p.read_text(encoding="utf-8") for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))
    missing = [f"{where}: `{fragment}`" for fragment, where in fragments if fragment not in code]
    assert not missing, ("catalogued messages no longer in sdk/, runner/ or grounding_dino/ (update "
                         "skills/grounding-dino/references/errors.md):\n" + "\n".join(missing))


def test_skill_bodies_stay_short_and_name_their_references():
    for skill in sorted((ROOT / "skills").glob("*/SKILL.md")):
        text = skill.read_text(encoding="utf-8")
        assert len(text.splitlines()) < 500, f"{skill}: keep SKILL.md under 500 lines; move details to references/"
        for ref in sorted((skill.parent / "references").glob("*.md")):
            assert f"references/{ref.name}" in text, f"{skill} does not name {ref.name} (say when to read it)"
        assert (skill.parent / "skill-card.md").is_file(), f"{skill.parent} has no skill-card.md"


def test_fast_python_blocks_run(tmp_path):
    """Python blocks that only read specs and schemas run in every test session."""
    scratch = _scratch(tmp_path, data=False)
    for block in all_blocks():
        if block.kind == "python" and block.not_run is None and "create_job" not in block.text:
            _run(block, scratch)
    for block in all_blocks():
        if block.kind == "shell" and block.not_run is None and "from sdk.schema_gen" in block.text:
            _run(block, scratch)


# ---------------------------------------------------------------------------------------------------------------
# running documents


def _base_model() -> Path:
    from runner.base_model import BASE_MODEL

    return Path(BASE_MODEL)


def _tiny_spec(data: Path) -> dict:
    card = json.loads(_base_model().with_suffix(".card.json").read_text(encoding="utf-8"))
    model = {k: v for k, v in card["model"].items() if k != "backbone_norm"}
    size = {"scales": [128], "train_random_resize": [128], "train_random_crop_min": 96, "train_random_crop_max": 128,
            "random_resize_max_size": 128, "test_random_resize": 128, "fixed_padding": False}
    val = {"image_dir": str(data / "eval_dataset" / "images"),
           "json_file": str(data / "eval_dataset" / "annotations.json")}
    return {
        "results_dir": "runs/spec",
        "model": model,
        "dataset": {
            "train_data_sources": [{"image_dir": str(data / "train_datasets" / "images"),
                                    "json_file": str(data / "train_datasets" / "annotations_odvg.jsonl"),
                                    "label_map": str(data / "train_datasets" / "annotations_odvg_labelmap.json")}],
            "val_data_sources": val, "test_data_sources": dict(val),
            "batch_size": 4, "workers": 0, "augmentation": size,
        },
        "train": {"pretrained_model_path": str(_base_model()), "num_epochs": 1, "activation_checkpoint": False},
        "automl": {"max_trials": 2},
    }


def _scratch(tmp_path: Path, data: bool = True) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("references", "schemas", "skills"):
        (scratch / name).symlink_to(ROOT / name)
    (scratch / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "demo_workflow.yaml", scratch / "examples")
    shapes = scratch / "data" / "shapes"
    if data:
        subprocess.run([sys.executable, "-m", "grounding_dino.data.synthetic", "--out", str(shapes), "--num-train",
                        "16", "--num-val", "8", "--size", "128", "--seed", "0"], check=True, capture_output=True,
                       cwd=scratch)
    (scratch / "spec.yaml").write_text(yaml.safe_dump(_tiny_spec(shapes.resolve()), sort_keys=False))
    return scratch


JOB_LOOKUP = r"""
import json, sys
from pathlib import Path
jobs = sorted((json.loads(p.read_text()) | {"dir": str(p.parent)} for p in Path(".").glob("*/jobs/*/job.json")),
              key=lambda r: r["created_at"])
what = sys.argv[1]
if what == "train":
    jobs = [j for j in jobs if j["action"] == "train"]
elif what in ("study", "study_results"):
    jobs = [j for j in jobs if j["action"] == "train" and j.get("automl_policy") == "on"]
if not jobs:
    sys.exit(f"docs test: a block needs a {what} job, but none was created before it")
job = jobs[-1]
print(str(Path(job["dir"]).resolve() / "results") if what == "study_results" else job["id"])
"""
# placeholder -> shell text that looks the job up when the command runs (a block may create the job itself)
JOB_PLACEHOLDERS = {
    "<train_job_id>": '"$(python .docs_job.py train)"',
    "<job_id>": '"$(python .docs_job.py any)"',
    "<study_name>": '"$(python .docs_job.py study)"',
    "/abs/path/results": '"$(python .docs_job.py study_results)"',
}


def _job_placeholders(text: str, scratch: Path) -> str:
    (scratch / ".docs_job.py").write_text(JOB_LOOKUP)
    for placeholder, lookup in JOB_PLACEHOLDERS.items():
        text = text.replace(placeholder, lookup)
    return text


def _run(block: Block, scratch: Path, timeout: int = 600) -> None:
    text = block.text
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new.replace("{scratch}", str(scratch.resolve())))
    text = _job_placeholders(text, scratch)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               SKILLBANK_WORKSPACE="workspace", HF_HUB_OFFLINE="1")
    if block.kind == "shell":
        command = ["bash", "-e", "-o", "pipefail", "-c", text]
    else:
        command = [sys.executable, "-c", text]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{block.where} ({block.lang}) failed with exit code {done.returncode}:\n{text}\n"
                                  f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}")


def _run_document(doc: Path, tmp_path: Path) -> list[str]:
    scratch = _scratch(tmp_path)
    ran = []
    for block in blocks(doc):
        if block.kind is None or block.not_run is not None or block.covered_by is not None:
            continue
        _run(block, scratch)
        ran.append(block.where)
    return ran


# the documents whose blocks a test below runs (a runnable block of any other document fails the fast check)
DOC_RUNS = {
    "README.md": "test_readme_runs",
    "skills/grounding-dino/SKILL.md": "test_grounding_dino_skill_runs",
    "skills/grounding-dino/references/fine-tuning.md": "test_grounding_dino_fine_tuning_runs",
    "skills/run-automl/SKILL.md": "test_run_automl_skill_runs",
    "references/grounding_dino/deploy.md": "test_deploy_notes_runs",
}


def _runner_for(doc: Path) -> Optional[str]:
    return DOC_RUNS.get(str(doc.relative_to(ROOT)))


def _doc_test(relative: str, tmp_path: Path) -> None:
    doc = ROOT / relative
    if not doc.is_file():
        pytest.skip(f"{relative} does not exist")
    ran = _run_document(doc, tmp_path)
    print(f"{relative}: ran {len(ran)} block(s): {', '.join(ran)}")


@pytest.mark.slow
def test_readme_runs(tmp_path):
    _doc_test("README.md", tmp_path)


@pytest.mark.slow
def test_grounding_dino_skill_runs(tmp_path):
    _doc_test("skills/grounding-dino/SKILL.md", tmp_path)


@pytest.mark.slow
def test_grounding_dino_fine_tuning_runs(tmp_path):
    _doc_test("skills/grounding-dino/references/fine-tuning.md", tmp_path)


@pytest.mark.slow
def test_run_automl_skill_runs(tmp_path):
    _doc_test("skills/run-automl/SKILL.md", tmp_path)


@pytest.mark.slow
def test_deploy_notes_runs(tmp_path):
    _doc_test("references/grounding_dino/deploy.md", tmp_path)
