"""NVIDIA TAO's public Grounding DINO tutorial, replayed with this package instead of the TAO container.

The notebook (tao_tutorials, notebooks/tao_launcher_starter_kit/grounding_dino/finetune_grounding_dino.ipynb)
converts HardHat's COCO annotations (train to ODVG, val to contiguous ids), evaluates the NGC model zero-shot,
fine-tunes it, evaluates and runs inference with the result, exports it to ONNX and builds a TensorRT engine. Each
step here is the notebook's command with `tao model grounding_dino` read as `grounding_dino` and `tao dataset
annotations convert` as the matching `skillbank data` tool, on the tutorial's spec files (tests/data/tao_tutorial/,
TAO's layout and values) and its own overrides (results_dir=..., evaluate.checkpoint=..., export.onnx_file=...).

What differs, and why:
- the TAO launcher mounts host folders at /data, /results and /workspace/tao-experiments; without a container the
  spec files' paths are mapped to the scratch folder by prefix, as the mounts would;
- HardHat and the NGC model cannot be downloaded here: the data is grounding_dino.data.synthetic's shapes in
  HardHat's folder layout (COCO with 1-based category ids, as the notebook expects to remap), and the NGC file is a
  randomly initialised model of the same layout (TAO's Lightning state_dict) at the NGC path;
- CPU time: the model is shrunk only by overrides appended to every model command (SHRINK: encoder and decoder
  layers, queries, image size, one epoch) and its text encoder is a tiny random BERT-style folder (bert-base-uncased
  is not downloadable here); backbone (swin_tiny_224_1k), widths, freezing, bf16 and the rest are the tutorial's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about 3 minutes on 2 CPU cores

REPO = Path(__file__).resolve().parents[1]
TUTORIAL_SPECS = REPO / "tests" / "data" / "tao_tutorial"
BIN = Path(sys.executable).parent
NGC_MODEL = ("/workspace/tao-experiments/grounding_dino/grounding_dino_vgrounding_dino_swin_tiny_commercial_trainable"
             "_v1.1/grounding_dino_swin_tiny_commercial_trainable.pth")
IMAGE = 128


def shrink(text_encoder: str) -> list:
    size = [f"dataset.augmentation.scales=[{IMAGE}]", f"dataset.augmentation.train_random_resize=[{IMAGE}]",
            f"dataset.augmentation.train_random_crop_min={IMAGE - 32}",
            f"dataset.augmentation.train_random_crop_max={IMAGE}",
            f"dataset.augmentation.random_resize_max_size={IMAGE}", f"dataset.augmentation.test_random_resize={IMAGE}"]
    return ["model.enc_layers=1", "model.dec_layers=1", "model.num_queries=50", "model.num_select=50",
            f"model.text_encoder_type={text_encoder}", *size]


class Tutorial:
    """The notebook's folders (HOST_DATA_DIR, HOST_SPECS_DIR, HOST_RESULTS_DIR under LOCAL_PROJECT_DIR) and its shell."""

    def __init__(self, root: Path):
        self.project = root / "tao-experiments"
        self.data = self.project / "data"
        self.specs = self.project / "specs"
        self.results = self.project / "grounding_dino" / "results"
        for folder in (self.data, self.specs, self.results):
            folder.mkdir(parents=True)
        self.mounts = {"/workspace/tao-experiments": str(self.project), "/data": str(self.data),
                       "/results": str(self.results)}
        for spec in TUTORIAL_SPECS.glob("*.yaml"):
            (self.specs / spec.name).write_text(self.host(spec.read_text()))

    def host(self, text: str) -> str:
        """Container paths as the launcher's mounts map them (longest mount first)."""
        for inside, outside in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            text = text.replace(f"{inside}/", f"{outside}/")
        return text

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=self.project, env=env, capture_output=True,
                              text=True, timeout=600)


def _hardhat_layout(tutorial: Tutorial) -> None:
    """Synthetic shapes as HardHatWorkers/raw/{train,valid}/: images beside annotations_without_background.json,
    COCO with category ids from 1."""
    from grounding_dino.data.synthetic import generate
    from sdk.data_convert import odvg_to_coco

    paths = generate(str(tutorial.project / "synthetic"), num_train=8, num_val=4, image_size=IMAGE, max_objects=3,
                     seed=0, colors=("red", "blue"), shapes=("circle", "square"))
    raw = tutorial.data / "HardHatWorkers" / "raw"
    for split, images in (("train", paths["train_image_dir"]), ("valid", paths["val_image_dir"])):
        shutil.copytree(images, raw / split)
    train = json.loads(odvg_to_coco(paths["train_json_file"], paths["label_map"],
                                    tutorial.project / "synthetic" / "train_coco.json").read_text())
    val = json.loads(Path(paths["val_json_file"]).read_text())
    for coco, split in ((train, "train"), (val, "valid")):
        for item in coco["categories"] + coco["annotations"]:
            key = "id" if "name" in item else "category_id"
            item[key] += 1
        (raw / split / "annotations_without_background.json").write_text(json.dumps(coco))


def _ngc_model(tutorial: Tutorial, overrides: list) -> Path:
    """A randomly initialised model of the tutorial's architecture (train.yaml plus `overrides`), saved the way TAO
    saves its models (Lightning state_dict, model.model. prefix, official names), at the NGC model's path."""
    import torch

    from grounding_dino.config import load_experiment
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import to_tao
    from sdk.spec import resolve_spec

    cfg = load_experiment(resolve_spec("train", tutorial.specs / "train.yaml", overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = Path(tutorial.host(NGC_MODEL))
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": to_tao(model.state_dict(), cfg.model.backbone), "epoch": 0}, path)
    return path


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def test_the_tao_grounding_dino_tutorial_runs_end_to_end(tmp_path):
    from grounding_dino.model.text import write_small_text_encoder

    tutorial = Tutorial(tmp_path)
    small = shrink(write_small_text_encoder(tmp_path / "tiny-bert", hidden_size=64))
    _hardhat_layout(tutorial)
    data, specs, results = tutorial.data, tutorial.specs, tutorial.results

    # "Convert COCO to ODVG format required for Grounding DINO", then the val set to contiguous ids
    annotations = data / "odvg" / "annotations"
    annotations.mkdir(parents=True)
    _ok(tutorial.run("skillbank", "data", "coco2odvg",
                     str(data / "HardHatWorkers/raw/train/annotations_without_background.json"),
                     "--out-dir", str(annotations)))
    _ok(tutorial.run("skillbank", "data", "contiguous",
                     str(data / "HardHatWorkers/raw/valid/annotations_without_background.json"),
                     "--out", str(annotations / "annotations_without_background_remapped.json")))
    assert json.loads((annotations / "annotations_without_background_odvg_labelmap.json").read_text()) == {
        "0": "red circle", "1": "red square", "2": "blue circle", "3": "blue square"}
    remapped = json.loads((annotations / "annotations_without_background_remapped.json").read_text())
    assert [c["id"] for c in remapped["categories"]] == [0, 1, 2, 3]

    ngc = _ngc_model(tutorial, small)

    # "Zero-shot evaluation" of the NGC model (a TAO file: its settings are read off its tensors)
    _ok(tutorial.run("grounding_dino", "evaluate", "-e", f"{specs}/evaluate.yaml", f"evaluate.checkpoint={ngc}",
                     f"results_dir={results}", *small))
    zero_shot = json.loads((results / "evaluate" / "results.json").read_text())
    assert "mAP" in zero_shot

    # fine-tune from it (train.num_gpus=$NUM_TRAIN_GPUS), one epoch
    _ok(tutorial.run("grounding_dino", "train", "-e", f"{specs}/train.yaml", "train.num_gpus=1",
                     f"results_dir={results}", *small, "train.num_epochs=1"))
    latest = results / "train" / "gdino_model_latest.pth"
    assert (results / "train" / "model_epoch_000_step_00001.pth").is_file() and latest.exists()
    status = [json.loads(line) for line in (results / "train" / "status.json").read_text().splitlines()]
    assert status[-1]["status"] == "SUCCESS", status[-1]
    # "Rename a trained model"
    model = results / "train" / "grounding_dino_model.pth"
    shutil.copy(latest, model)

    _ok(tutorial.run("grounding_dino", "evaluate", "-e", f"{specs}/evaluate.yaml", f"evaluate.checkpoint={model}",
                     f"results_dir={results}", *small))
    evaluated = json.loads((results / "evaluate" / "results.json").read_text())
    assert set(evaluated) >= {"mAP", "mAP50"}

    _ok(tutorial.run("grounding_dino", "inference", "-e", f"{specs}/infer.yaml", f"inference.checkpoint={model}",
                     f"results_dir={results}/", *small))
    annotated = sorted(p.name for p in (results / "inference" / "images_annotated").iterdir())
    assert annotated == sorted(p.name for p in (data / "HardHatWorkers/raw/valid").glob("*.jpg"))
    assert len(list((results / "inference" / "labels").glob("*.txt"))) == len(annotated)

    onnx_file = results / "export" / "grounding_dino_model.onnx"
    _ok(tutorial.run("grounding_dino", "export", "-e", f"{specs}/export.yaml", f"export.checkpoint={model}",
                     f"export.onnx_file={onnx_file}", f"results_dir={results}/", *small,
                     f"export.input_width={IMAGE}", f"export.input_height={IMAGE}"))
    assert onnx_file.stat().st_size > 0

    # "Generate TensorRT engine using tao deploy"
    engine = results / "gen_trt_engine" / "grounding_dino_model.engine"
    built = tutorial.run("grounding_dino", "gen_trt_engine", "-e", f"{specs}/gen_trt_engine.yaml",
                         f"gen_trt_engine.onnx_file={onnx_file}", f"gen_trt_engine.trt_engine={engine}",
                         f"results_dir={results}")
    if importlib.util.find_spec("tensorrt") is not None:
        _ok(built)
        assert engine.stat().st_size > 0
    else:
        assert built.returncode == 2, built.stderr
        assert "Traceback" not in built.stderr, built.stderr
        assert "gen_trt_engine.onnx_file" in built.stderr and "TensorRT is not installed" in built.stderr
        assert not engine.exists() and not (results / "gen_trt_engine").exists()
