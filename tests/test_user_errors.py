"""A user's mistakes in files, data and environment, through the real `grounding_dino` CLI.

Each case: exit code 2, no traceback, the spec key and the path named on stderr, and nothing written (the folder
tree is the same before and after). Most fail in the preflight the CLI shares with jobs (sdk.preflight) or in the
backend's pre-check (grounding_dino.actions.precheck), before any model is built; the mid-run cases (data that only
fails when it is read) build a tiny model and leave only the results folder with its status lines.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import pytest
import yaml

from grounding_dino import config as gd_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
CLI = Path(sys.executable).with_name("grounding_dino")


@dataclass
class Files:
    """The tiny dataset (conftest's tiny_data) plus the model files a case asks for, made on demand."""

    root: Path

    @property
    def images(self) -> str:
        return str(self.root / "images")

    @property
    def odvg(self) -> str:
        return str(self.root / "train_odvg.jsonl")

    @property
    def labelmap(self) -> str:
        return str(self.root / "labelmap.json")

    @property
    def val(self) -> str:
        return str(self.root / "val.json")

    def missing(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, content) -> str:
        path = self.root / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    def foreign_checkpoint(self, name: str = "other_arch.pth") -> str:
        """A checkpoint of ours saved with num_queries 50. A spec that leaves num_queries at its default takes the
        checkpoint's value; one that sets another (SPEC_QUERIES) contradicts it."""
        import torch

        saved = dataclasses.asdict(gd_config.ModelConfig())
        saved["num_queries"] = 50
        path = self.root / name
        torch.save({"model": {"class_embed.bias": torch.zeros(1)}, "model_config": saved}, path)
        return str(path)


def base_spec(action: str, f: Files, results: Path) -> dict:
    """A valid spec for `action` on the tiny dataset; model files are placeholders the cases replace."""
    test = {"image_dir": f.images, "json_file": f.val}
    model = f.write("model.pth", b"placeholder: the cases that reach the pre-check replace it")
    onnx = f.write("model.onnx", b"placeholder")
    sections = {
        "train": {"dataset": {"train_data_sources": [{"image_dir": f.images, "json_file": f.odvg,
                                                      "label_map": f.labelmap}],
                              "val_data_sources": test}},
        "evaluate": {"dataset": {"test_data_sources": test}, "evaluate": {"checkpoint": model}},
        "inference": {"dataset": {"infer_data_sources": {"image_dir": [f.images], "captions": ["cat"]}},
                      "inference": {"checkpoint": model}},
        "export": {"export": {"checkpoint": model}},
        "quantize": {"quantize": {"model_path": onnx, "evaluate": False},
                     "dataset": {"quant_calibration_data_sources": test}},
        "gen_trt_engine": {"gen_trt_engine": {"onnx_file": onnx}},
    }
    return {"results_dir": str(results), **sections[action]}


@dataclass
class Case:
    name: str
    action: str
    # the overrides, the spec key and the path (or value) stderr must name; may create files under Files.root
    setup: Callable[[Files], tuple]
    marks: List = field(default_factory=list)


def _python_code_checkpoint(f: Files) -> str:
    """A .pth whose pickle calls a function when loaded: weights_only refuses it."""
    import torch

    path = f.root / "code.pth"
    torch.save({"model": _CallsOsGetcwd()}, path)
    return str(path)


class _CallsOsGetcwd:
    def __reduce__(self):
        return (os.getcwd, ())


def _archive(f: Files) -> str:
    path = f.root / "images.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(f.images, arcname="images")
    return str(path)


def _coco_one_based(f: Files) -> str:
    data = json.loads(Path(f.val).read_text())
    data["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    data["annotations"][0]["category_id"] = 1
    return f.write("val_1based.json", json.dumps(data))


def _long_grounding_odvg(f: Files) -> str:
    phrase = " ".join(f"word{i}" for i in range(200))  # far more than 32 tokens
    line = {"file_name": "a.jpg", "height": 10, "width": 10,
            "grounding": {"caption": phrase, "regions": [{"bbox": [1, 1, 5, 5], "phrase": phrase}]}}
    return f.write("long_odvg.jsonl", json.dumps(line) + "\n")


def _bad_json_line(f: Files) -> str:
    lines = Path(f.odvg).read_text().splitlines()
    return f.write("broken_odvg.jsonl", "\n".join([lines[0], "{\"file_name\": \"b.jpg\", ", *lines[1:]]) + "\n")


# The spec sets num_queries, so a checkpoint saved with another value is a real contradiction, not a default to fill.
SPEC_QUERIES = "model.num_queries=300"
NO_TRT = pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the engine would be tried for real")
TRAIN0 = "dataset.train_data_sources[0]"
CASES = [
    Case("missing-train-images", "train",
         lambda f: ([f"{TRAIN0}.image_dir={f.missing('gone')}"], f"{TRAIN0}.image_dir", f.missing("gone"))),
    Case("missing-train-annotations", "train",
         lambda f: ([f"{TRAIN0}.json_file={f.missing('gone.jsonl')}"], f"{TRAIN0}.json_file",
                    f.missing("gone.jsonl"))),
    Case("missing-val-images", "train",
         lambda f: ([f"dataset.val_data_sources.image_dir={f.missing('gone')}"], "dataset.val_data_sources.image_dir",
                    f.missing("gone"))),
    Case("missing-val-annotations", "train",
         lambda f: ([f"dataset.val_data_sources.json_file={f.missing('gone.json')}"],
                    "dataset.val_data_sources.json_file", f.missing("gone.json"))),
    Case("missing-test-images", "evaluate",
         lambda f: ([f"dataset.test_data_sources.image_dir={f.missing('gone')}"],
                    "dataset.test_data_sources.image_dir", f.missing("gone"))),
    Case("missing-test-annotations", "evaluate",
         lambda f: ([f"dataset.test_data_sources.json_file={f.missing('gone.json')}"],
                    "dataset.test_data_sources.json_file", f.missing("gone.json"))),
    Case("missing-inference-images", "inference",
         lambda f: ([f"dataset.infer_data_sources.image_dir=[{f.missing('gone')}]"],
                    "dataset.infer_data_sources.image_dir", f.missing("gone"))),
    Case("missing-label-map-file", "train",
         lambda f: ([f"{TRAIN0}.label_map={f.missing('gone_labelmap.json')}"], f"{TRAIN0}.label_map",
                    f.missing("gone_labelmap.json"))),
    Case("detection-odvg-without-label-map", "train",
         lambda f: ([f"{TRAIN0}.label_map=null"], f"{TRAIN0}.label_map", f.odvg)),
    Case("missing-evaluate-checkpoint", "evaluate",
         lambda f: ([f"evaluate.checkpoint={f.missing('gone.pth')}"], "evaluate.checkpoint", f.missing("gone.pth"))),
    Case("missing-inference-checkpoint", "inference",
         lambda f: ([f"inference.checkpoint={f.missing('gone.pth')}"], "inference.checkpoint",
                    f.missing("gone.pth"))),
    Case("missing-export-checkpoint", "export",
         lambda f: ([f"export.checkpoint={f.missing('gone.pth')}"], "export.checkpoint", f.missing("gone.pth"))),
    Case("missing-quantize-model", "quantize",
         lambda f: ([f"quantize.model_path={f.missing('gone.onnx')}"], "quantize.model_path",
                    f.missing("gone.onnx"))),
    Case("missing-resume-checkpoint", "train",
         lambda f: ([f"train.resume_training_checkpoint_path={f.missing('gone.pth')}"],
                    "train.resume_training_checkpoint_path", f.missing("gone.pth"))),
    Case("missing-pretrained-model", "train",
         lambda f: ([f"train.pretrained_model_path={f.missing('gone.pth')}"], "train.pretrained_model_path",
                    f.missing("gone.pth"))),
    Case("evaluate-trt-engine-without-tensorrt", "evaluate",
         lambda f: (["evaluate.checkpoint=null", f"evaluate.trt_engine={f.write('m.engine', b'engine')}"],
                    "evaluate.trt_engine", str(f.root / "m.engine")), [NO_TRT]),
    Case("inference-trt-engine-without-tensorrt", "inference",
         lambda f: (["inference.checkpoint=null", f"inference.trt_engine={f.write('m.engine', b'engine')}"],
                    "inference.trt_engine", str(f.root / "m.engine")), [NO_TRT]),
    Case("gen-trt-engine-without-tensorrt", "gen_trt_engine",
         lambda f: ([], "gen_trt_engine.onnx_file", str(f.root / "model.onnx")), [NO_TRT]),
    Case("evaluate-checkpoint-of-another-architecture", "evaluate",
         lambda f: ([f"evaluate.checkpoint={f.foreign_checkpoint()}", SPEC_QUERIES], "evaluate.checkpoint",
                    str(f.root / "other_arch.pth"))),
    Case("export-checkpoint-of-another-architecture", "export",
         lambda f: ([f"export.checkpoint={f.foreign_checkpoint()}", SPEC_QUERIES], "export.checkpoint",
                    str(f.root / "other_arch.pth"))),
    Case("pretrained-model-of-another-architecture", "train",
         lambda f: ([f"train.pretrained_model_path={f.foreign_checkpoint()}", SPEC_QUERIES],
                    "train.pretrained_model_path",
                    str(f.root / "other_arch.pth"))),
    Case("resume-from-a-checkpoint-that-is-not-a-training-checkpoint", "train",
         lambda f: ([f"train.resume_training_checkpoint_path={f.foreign_checkpoint()}"],
                    "train.resume_training_checkpoint_path", str(f.root / "other_arch.pth"))),
    Case("checkpoint-of-random-bytes", "export",
         lambda f: ([f"export.checkpoint={f.write('random.pth', bytes(range(256)) * 8)}"], "export.checkpoint",
                    str(f.root / "random.pth"))),
    Case("checkpoint-empty-file", "evaluate",
         lambda f: ([f"evaluate.checkpoint={f.write('empty.pth', b'')}"], "evaluate.checkpoint",
                    str(f.root / "empty.pth"))),
    Case("checkpoint-of-text", "quantize",
         lambda f: ([f"quantize.model_path={f.write('notes.pth', 'these are my notes')}"], "quantize.model_path",
                    str(f.root / "notes.pth"))),
    Case("checkpoint-holding-python-code", "export",
         lambda f: ([f"export.checkpoint={_python_code_checkpoint(f)}"], "export.checkpoint",
                    f"{f.root / 'code.pth'}: refused: the file holds Python objects, not tensors")),
    Case("category-ids-not-0-based", "evaluate",
         lambda f: ([f"dataset.test_data_sources.json_file={_coco_one_based(f)}"],
                    "dataset.test_data_sources.json_file", str(f.root / "val_1based.json"))),
    Case("caption-over-max-text-len", "train",
         lambda f: ([f"{TRAIN0}.json_file={_long_grounding_odvg(f)}", f"{TRAIN0}.label_map=null",
                     "model.text_encoder_type=minilm", "model.max_text_len=32"],
                    f"{TRAIN0}.json_file", str(f.root / "long_odvg.jsonl"))),
    Case("archive-as-image-folder", "train",
         lambda f: ([f"{TRAIN0}.image_dir={_archive(f)}"], f"{TRAIN0}.image_dir", str(f.root / "images.tar.gz"))),
    Case("odvg-line-not-json", "train",
         lambda f: ([f"{TRAIN0}.json_file={_bad_json_line(f)}"], f"{TRAIN0}.json_file",
                    str(f.root / "broken_odvg.jsonl") + ":2")),
    Case("negative-batch-size", "train", lambda f: (["dataset.batch_size=-4"], "dataset.batch_size", "-4")),
]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def run_cli(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_table_has_at_least_twenty_distinct_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_user_error_exits_2_names_key_and_path_and_writes_nothing(tmp_path, tiny_data, case):
    f = Files(tiny_data["root"])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(base_spec(case.action, f, tmp_path / "results")))
    overrides, key, path = case.setup(f)
    before = snapshot(tmp_path)
    result = run_cli([case.action, "-e", str(spec_path), *overrides], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert key in result.stderr and path in result.stderr, result.stderr
    assert snapshot(tmp_path) == before, "a run that cannot start wrote files"


# ---------------------------------------------------------------------------------------------------------------
# found mid-run: the images are only decoded when a batch is built


def _truncate_one_image(spec: dict, tmp_path: Path) -> Path:
    """A copy of the tiny training images with the first one cut in half (a broken download)."""
    images = tmp_path / "train_images"
    shutil.copytree(spec["dataset"]["train_data_sources"][0]["image_dir"], images)
    broken = sorted(images.iterdir())[0]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    spec["dataset"]["train_data_sources"][0]["image_dir"] = str(images)
    return broken


def _tiny_run_spec(tiny_train_spec: dict, tmp_path: Path) -> tuple[dict, Path]:
    from tests.conftest import tiny_spec

    spec = tiny_spec(tiny_train_spec, tmp_path / "results", **{"train.num_epochs": 1})
    return spec, _truncate_one_image(spec, tmp_path)


def test_an_unreadable_image_names_its_key_and_the_fix(tmp_path, tiny_train_spec):
    from grounding_dino.data import DataError, build_dataset

    spec, broken = _tiny_run_spec(tiny_train_spec, tmp_path)
    dataset = build_dataset(gd_config.load_experiment(spec), "train")
    index = next(i for i, r in enumerate(dataset.records) if r["file"] == str(broken))
    with pytest.raises(DataError) as error:
        dataset[index]
    assert str(error.value).startswith(f"{TRAIN0}.image_dir: cannot read image {broken}")
    assert "set dataset.skip_bad_images=true" in str(error.value)


def test_a_data_error_from_a_loader_worker_keeps_its_message_alone(tmp_path, tiny_train_spec):
    from torch.utils.data import DataLoader

    from grounding_dino.data import DataError, build_dataset

    spec, broken = _tiny_run_spec(tiny_train_spec, tmp_path)
    dataset = build_dataset(gd_config.load_experiment(spec), "train")
    with pytest.raises(DataError) as error:
        list(DataLoader(dataset, batch_size=None, num_workers=1))
    assert str(error.value).startswith(f"{TRAIN0}.image_dir: cannot read image {broken}")
    assert "Traceback" not in str(error.value) and "worker" not in str(error.value)


def test_skip_bad_images_drops_them_with_one_counted_warning(tmp_path, tiny_train_spec):
    from grounding_dino.data import DataWarning, build_dataset

    spec, broken = _tiny_run_spec(tiny_train_spec, tmp_path)
    spec["dataset"]["skip_bad_images"] = True
    total = len(list(broken.parent.iterdir()))
    with pytest.warns(DataWarning) as caught:
        dataset = build_dataset(gd_config.load_experiment(spec), "train")
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(skipped) == 1, skipped
    assert skipped[0].startswith(f"dataset.skip_bad_images: skipped 1 unreadable image of {total} (first: {broken}: ")
    assert len(dataset) == total - 1 and str(broken) not in [r["file"] for r in dataset.records]
    for i in range(len(dataset)):
        dataset[i]


@pytest.mark.slow  # builds and starts training a tiny model (about 30 s on 2 cores)
def test_unreadable_image_mid_run_exits_2_with_the_message_alone(tmp_path, tiny_train_spec):
    spec, broken = _tiny_run_spec(tiny_train_spec, tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    before = snapshot(tmp_path)
    result = run_cli(["train", "-e", str(spec_path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{TRAIN0}.image_dir" in result.stderr and str(broken) in result.stderr
    assert "dataset.skip_bad_images=true" in result.stderr
    written = {k for k in set(snapshot(tmp_path)) - set(before)}
    assert written and all(k.startswith("results") for k in written), written


@pytest.mark.slow  # the same through a job (about 25 s)
def test_a_job_with_a_data_error_ends_as_error_with_the_message(tmp_path, tiny_train_spec):
    from sdk import SkillBank

    spec, broken = _tiny_run_spec(tiny_train_spec, tmp_path)
    spec.pop("results_dir")
    bank = SkillBank(tmp_path / "workspace")
    job = bank.wait(bank.create_job("train", spec=spec, automl_policy="off").id, timeout=300)
    assert job.status == "error", job.record
    assert job.error.startswith(f"{TRAIN0}.image_dir: cannot read image {broken}"), job.error
    assert "Traceback" not in bank.logs(job.id)
