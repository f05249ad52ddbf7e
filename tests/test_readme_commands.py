"""Every command README.md shows in "Use your own data" and "Use pretrained weights" runs, as written.

The ```bash blocks of the two sections are taken from README.md and run by bash in a scratch folder holding the data
the first section starts from (`my_data/train.json`, `my_data/val.json` in COCO with category ids from 1, and their
image folders), made from grounding_dino.data.synthetic's shapes. The only changes to the commands are PLACEHOLDERS:
public Hugging Face ids, which cannot be downloaded here, become the tiny models tests/test_hub.py serves on
127.0.0.1 (HF_ENDPOINT points there and HF_HOME at a fresh cache, as a user's mirror and cache would be).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hub import BERT_ID, GDINO_ID, OFFICIAL_FILE, hub, official_file, repos  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # trains four times and evaluates six (about 3 minutes on 2 CPU cores)

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Use your own data", "Use pretrained weights")
# README's public ids -> the loopback hub's tiny models of the same kind
PLACEHOLDERS = {
    "IDEA-Research/grounding-dino-tiny": GDINO_ID,                       # a transformers GroundingDino repository
    "ShilongLiu/GroundingDINO/groundingdino_swint_ogc.pth": OFFICIAL_FILE,  # an official release file in a repository
    "bert-base-uncased": BERT_ID,                                        # a BERT text encoder
}


def bash_blocks(section: str) -> list:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '## {section}'"
    return re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)


def test_the_sections_show_commands_and_only_placeholders_are_replaced():
    blocks = [block for section in SECTIONS for block in bash_blocks(section)]
    assert len(blocks) == 2
    assert all(any(name in block for block in blocks) for name in PLACEHOLDERS)


@pytest.fixture
def my_data(tmp_path) -> Path:
    """The user's data as the first section assumes it: COCO (ids from 1) beside image folders."""
    from grounding_dino.data.synthetic import generate
    from sdk.data_convert import odvg_to_coco

    paths = generate(str(tmp_path / "synthetic"), num_train=8, num_val=4, image_size=128, max_objects=3, seed=0,
                     colors=("red", "blue"), shapes=("circle", "square"))
    data = tmp_path / "scratch" / "my_data"
    shutil.copytree(paths["train_image_dir"], data / "train")
    shutil.copytree(paths["val_image_dir"], data / "val")
    train = json.loads(odvg_to_coco(paths["train_json_file"], paths["label_map"],
                                    tmp_path / "synthetic" / "train_coco.json").read_text())
    val = json.loads(Path(paths["val_json_file"]).read_text())
    for coco, name in ((train, "train.json"), (val, "val.json")):
        for category in coco["categories"]:
            category["id"] += 1
        for annotation in coco["annotations"]:
            annotation["category_id"] += 1
        (data / name).write_text(json.dumps(coco))
    return data.parent


def _run(block: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    for public, local in PLACEHOLDERS.items():
        block = block.replace(public, local)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_readme_commands_run(my_data, hub):
    env = dict(hub["env"], PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    own, = bash_blocks(SECTIONS[0])
    done = _run(own, my_data, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert (my_data / "runs/my_model/train/gdino_model_latest.pth").exists()
    assert "mAP50" in json.loads((my_data / "runs/my_model/evaluate/results.json").read_text())
    jobs = [json.loads(p.read_text()) for p in (my_data / "jobs").rglob("job.json")]
    assert sorted(job["action"] for job in jobs) == ["evaluate", "train"]
    assert all(job["status"] == "done" for job in jobs), jobs

    pretrained, = bash_blocks(SECTIONS[1])
    before = len(hub["requests"])
    done = _run(pretrained, my_data, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    for run in ("base", "hf", "official", "hf_offline"):
        assert "mAP50" in json.loads((my_data / "runs" / run / "evaluate/results.json").read_text()), run
    assert (my_data / "runs/hf/train/gdino_model_latest.pth").exists()
    fetched = {path for method, path in hub["requests"][before:] if method == "GET" and "/resolve/" in path}
    assert any(GDINO_ID in path for path in fetched) and any(OFFICIAL_FILE.split("/")[-1] in p for p in fetched)
