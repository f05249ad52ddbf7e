"""Bad specs through the real `grounding_dino` CLI: exit code 2, the key path named, nothing written anywhere."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grounding_dino import actions
from grounding_dino import config as gd_config
from runner import gdino_cli

REPO_ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "train": {
        "train": {"num_epochs": 2},
        "dataset": {
            "train_data_sources": [{"image_dir": "/data/train/images", "json_file": "/data/train/a_odvg.jsonl",
                                    "label_map": "/data/train/a_odvg_labelmap.json"}],
            "val_data_sources": {"image_dir": "/data/val/images", "json_file": "/data/val/annotations.json"},
        },
    },
    "evaluate": {"dataset": {"test_data_sources": {"image_dir": "/data/val/images",
                                                   "json_file": "/data/val/annotations.json"}},
                 "evaluate": {"checkpoint": "/models/model_epoch_001_step_00010.pth"}},
    "quantize": {"quantize": {"model_path": "/models/model.onnx", "evaluate": False},
                 "dataset": {"quant_calibration_data_sources": {"image_dir": "/data/cal/images",
                                                                "json_file": "/data/cal/annotations.json"}}},
    "export": {"export": {"checkpoint": "/models/model_epoch_001_step_00010.pth"}},
    "gen_trt_engine": {"gen_trt_engine": {"onnx_file": "/models/model.onnx"}},
    "inference": {"inference": {"checkpoint": "/models/model.pth"},
                  "dataset": {"infer_data_sources": {"image_dir": ["/data/images"], "captions": ["person"]}}},
}

# (id, action, spec file text (RESULTS = a results folder in the test's temp dir) or None for the good spec,
#  overrides, text that must appear in stderr)
CASES = [
    ("unknown-top-level-key", "train", "results_dir: RESULTS\ntrian:\n  num_epochs: 3\n", [], "trian"),
    ("unknown-nested-key", "train", None, ["model.nqueries=5"], "model.nqueries"),
    ("shorthand-at-spec-root", "train", "results_dir: RESULTS\nnum_epochs: 3\n", [], "did you mean train.num_epochs"),
    ("int-given-text", "train", None, ["train.num_epochs=ten"], "train.num_epochs"),
    ("float-given-text", "train", None, ["train.optim.lr=fast"], "train.optim.lr"),
    ("int-given-bool", "train", None, ["dataset.batch_size=true"], "dataset.batch_size"),
    ("null-for-required-int", "train", None, ["train.num_epochs=null"], "train.num_epochs"),
    ("list-given-text", "train", None, ["train.freeze=bert"], "train.freeze"),
    ("section-given-text", "train", "results_dir: RESULTS\nmodel: swin_tiny_224_1k\n", [], "model"),
    ("bad-list-element", "train", None, ["train.optim.lr_steps=[10, x]"], "train.optim.lr_steps[1]"),
    ("below-minimum", "train", None, ["model.num_queries=0"], "model.num_queries"),
    ("above-maximum", "train", None, ["model.num_select=5000"], "model.num_select"),
    ("exclusive-minimum", "train", None, ["train.optim.lr=0"], "train.optim.lr"),
    ("probability-above-one", "train", None, ["dataset.augmentation.horizontal_flip_prob=1.5"],
     "dataset.augmentation.horizontal_flip_prob"),
    ("bad-enum-backbone", "train", None, ["model.backbone=vgg16"], "model.backbone"),
    ("bad-enum-precision", "train", None, ["train.precision=fp8"], "train.precision"),
    ("enum-unknown-in-any-case", "train", None, ["train.optim.optimizer=SGD"], "train.optim.optimizer"),
    ("bad-model-name", "train", None, ["model_name=yolo"], "model_name"),
    ("list-index-beyond-end", "train", None, ["dataset.train_data_sources[5].json_file=/x.jsonl"],
     "dataset.train_data_sources[5]"),
    ("index-into-a-section", "train", None, ["dataset.val_data_sources[0].image_dir=/x"],
     "dataset.val_data_sources"),
    ("key-inside-a-value", "train", None, ["model.backbone.depth=3"], "model.backbone"),
    ("override-without-equals", "train", None, ["train.num_epochs"], "train.num_epochs"),
    ("override-malformed-key", "train", None, ["train..num_epochs=3"], "train..num_epochs"),
    ("override-empty-value", "train", None, ["train.num_epochs="], "train.num_epochs"),
    ("override-unparsable-value", "train", None, ["train.optim.lr_steps=[1,2"], "train.optim.lr_steps"),
    ("missing-val-annotations", "train", None, ["dataset.val_data_sources.json_file=null"],
     "dataset.val_data_sources.json_file"),
    ("no-train-sources", "train", None, ["dataset.train_data_sources=[]"], "dataset.train_data_sources"),
    ("train-source-without-images", "train",
     "results_dir: RESULTS\ndataset:\n  train_data_sources:\n    - json_file: /d/a_odvg.jsonl\n"
     "  val_data_sources: {image_dir: /d/val, json_file: /d/val.json}\n",
     [], "dataset.train_data_sources[0].image_dir"),
    ("evaluate-without-model", "evaluate", None, ["evaluate.checkpoint=null"], "evaluate.checkpoint"),
    ("static-quantize-without-calibration", "quantize", None,
     ["dataset.quant_calibration_data_sources.image_dir=null"], "dataset.quant_calibration_data_sources.image_dir"),
    ("inference-captions-not-a-list", "inference", None, ["dataset.infer_data_sources.captions=person"],
     "dataset.infer_data_sources.captions"),
    ("color-map-value-not-text", "inference", None, ["inference.color_map={person: 3}"],
     "inference.color_map.person"),
    ("export-opset-too-old", "export", None, ["export.opset_version=9"], "export.opset_version"),
    ("trt-profile-out-of-order", "gen_trt_engine", None, ["gen_trt_engine.tensorrt.min_batch_size=8"],
     "gen_trt_engine.tensorrt.opt_batch_size"),
    ("no-results-dir", "train", None, ["results_dir=null"], "results_dir"),
    ("placeholder-left-in", "train", None, ["train.pretrained_model_path=???"], "train.pretrained_model_path"),
    ("levels-and-indices-disagree", "train", None, ["model.num_feature_levels=3"], "model.return_interm_indices"),
    ("crop-min-above-max", "train", None, ["dataset.augmentation.train_random_crop_min=800"],
     "dataset.augmentation.train_random_crop_min"),
    ("yaml-is-a-list", "train", "- model\n- train\n", [], "spec.yaml"),
    ("yaml-is-a-scalar", "train", "just some text\n", [], "spec.yaml"),
    ("yaml-syntax-error", "train", "train:\n  num_epochs: [1, 2\n", [], "line"),
    ("yaml-duplicate-key", "train", "train:\n  num_epochs: 3\n  num_epochs: 4\n", [], "num_epochs"),
    ("yaml-non-string-key", "train", "model:\n  1: resnet_18\n", [], "model"),
    ("yaml-python-tag", "train", "train: !!python/object/apply:os.system [echo hi]\n", [], "spec.yaml"),
    ("spec-not-utf8", "train", b"train:\n  freeze: [\xff\xfe]\n", [], "spec.yaml"),
]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def good_spec(action: str, results: Path) -> dict:
    return {"results_dir": str(results), **GOOD[action]}


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "runner.gdino_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_there_are_at_least_thirty_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name, action, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_2_names_the_key_and_writes_nothing(tmp_path, name, action, text, overrides, expected):
    spec_path = tmp_path / "spec.yaml"
    if text is None:
        spec_path.write_text(yaml.safe_dump(good_spec(action, tmp_path / "results")))
    elif isinstance(text, bytes):
        spec_path.write_bytes(text)
    else:
        spec_path.write_text(text.replace("RESULTS", str(tmp_path / "results")))
    before = snapshot(tmp_path)
    result = run_cli([action, "-e", str(spec_path), *overrides], tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert "Nothing was written" in result.stderr
    assert snapshot(tmp_path) == before
    assert result.stdout == ""


@pytest.mark.parametrize("target", ["missing.yaml", "a_folder"])
def test_unreadable_spec_file(tmp_path, target):
    (tmp_path / "a_folder").mkdir()
    before = snapshot(tmp_path)
    result = run_cli(["train", "-e", str(tmp_path / target)], tmp_path)
    assert result.returncode == 2
    assert target in result.stderr
    assert snapshot(tmp_path) == before


def test_unknown_action_and_missing_arguments(tmp_path):
    result = run_cli(["trainn"], tmp_path)
    assert result.returncode == 2 and "trainn" in result.stderr
    assert run_cli([], tmp_path).returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_every_problem_is_printed_once(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec("train", tmp_path / "results")))
    result = run_cli(["train", "-e", str(spec_path), "model.num_queries=0", "model.backbone=vgg",
                      "train.optim.lr=fast", "dataset.val_data_sources.json_file=null"], tmp_path)
    assert result.returncode == 2
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert [line.split(" ")[0].rstrip(":") for line in lines] == [
        "dataset.val_data_sources.json_file", "model.backbone", "model.num_queries", "train.optim.lr"]
    assert 'model.num_queries = 0: out of range: must be between 1 and 5000' in result.stderr


def test_help_lists_actions_and_override_rules(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    for action in gd_config.ACTIONS:
        assert action in result.stdout
    assert "num_epochs (train.num_epochs)" in result.stdout
    result = run_cli(["train", "--help"], tmp_path)
    assert result.returncode == 0 and "-e" in result.stdout and "spec_template_train.yaml" in result.stdout


# The good spec above is valid: the cases fail because of their one change. These run the CLI in-process with the
# action lookup replaced, so no model is built, and with the file checks off: GOOD's paths are not on this disk
# (missing files have their own table in test_user_errors.py).


@pytest.fixture
def files_not_checked(monkeypatch):
    monkeypatch.setattr(gdino_cli, "check", lambda *args, **kwargs: [])
    monkeypatch.setattr(actions, "REGISTRY", {name: dataclasses.replace(entry, precheck=None)
                                              for name, entry in actions.REGISTRY.items()})


def test_good_spec_writes_experiment_yaml_and_runs_the_backend(tmp_path, monkeypatch, capsys, files_not_checked):
    received = []

    def backend(config, run):
        received.append(config)

    monkeypatch.setattr(actions, "get_action", lambda action: backend)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec("train", tmp_path / "results")))
    assert gdino_cli.main(["train", "-e", str(spec_path), "num_epochs=5", "learning_rate=1e-4"]) == 0
    config = received[0]
    assert isinstance(config, gd_config.ExperimentConfig)
    assert config.train.num_epochs == 5 and config.train.optim.lr == 1e-4
    written = yaml.safe_load((tmp_path / "results" / "train" / "experiment.yaml").read_text())
    assert written == gd_config.to_dict(config)


def test_unimportable_backend_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys, files_not_checked):
    monkeypatch.setitem(actions.REGISTRY, "export", actions.Entry("grounding_dino.not_built:run", "export"))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec("export", tmp_path / "results")))
    before = snapshot(tmp_path)
    assert gdino_cli.main(["export", "-e", str(spec_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "importing grounding_dino.not_built failed" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("action", list(GOOD))
def test_good_specs_pass_validation(tmp_path, monkeypatch, action, files_not_checked):
    monkeypatch.setattr(actions, "get_action", lambda name: lambda config, run: None)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(action, tmp_path / "results")))
    assert gdino_cli.main([action, "-e", str(spec_path)]) == 0
    assert (tmp_path / "results" / action / "experiment.yaml").is_file()
