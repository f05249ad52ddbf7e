"""`skillbank demo`: its dataset (TAO layout, held-out names, reuse) and, reduced in size, the whole run."""
from __future__ import annotations

import json
import os
import tarfile

import pytest

from grounding_dino.data.synthetic import vocabulary
from runner import demo
from runner.base_model import read_card

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_dataset_layout_holdout_and_reuse(tmp_path, capsys):
    root = tmp_path / "data"
    demo.make_data(root, num_train=6, num_val=4, num_infer=6, prompts=demo.HOLDOUT)
    expected = {"manifest.json", "train_datasets/images.tar.gz", "train_datasets/annotations_odvg.jsonl",
                "train_datasets/annotations_odvg_labelmap.json", "base_datasets/images.tar.gz",
                "base_datasets/annotations_odvg.jsonl", "base_datasets/annotations_odvg_labelmap.json",
                "eval_dataset/images.tar.gz",
                "eval_dataset/annotations.json", "test_dataset/images.tar.gz", "test_dataset/annotations.json",
                "inference_dataset/images.tar.gz",
                "inference_dataset/annotations.json"}
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == expected
    label_map = set(json.loads((root / "train_datasets" / "annotations_odvg_labelmap.json").read_text()).values())
    val = {c["name"] for c in json.loads((root / "eval_dataset" / "annotations.json").read_text())["categories"]}
    assert label_map == val and not label_map & set(demo.HOLDOUT)
    assert {"orange circle", "purple square", "red hexagon"} <= label_map  # new colours and shape, with known ones
    infer = json.loads((root / "inference_dataset" / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in infer["categories"]}
    assert {names[a["category_id"]] for a in infer["annotations"]} & set(demo.HOLDOUT)
    replay = set(json.loads((root / "base_datasets" / "annotations_odvg_labelmap.json").read_text()).values())
    base = read_card()["data"]
    assert replay == set(vocabulary(base["colors"], base["shapes"])) - set(demo.HOLDOUT)  # the base's own names
    test = json.loads((root / "test_dataset" / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in test["categories"]}
    assert set(names.values()) == label_map | set(demo.HOLDOUT)  # the test set scores the held-out names too
    with tarfile.open(root / "train_datasets" / "images.tar.gz") as tar:
        assert len(tar.getnames()) == 6 and all("/" not in n for n in tar.getnames())

    stamp = (root / "train_datasets" / "images.tar.gz").stat().st_mtime_ns
    capsys.readouterr()
    demo.make_data(root, num_train=6, num_val=4, num_infer=6, prompts=demo.HOLDOUT)
    assert "reusing the dataset" in capsys.readouterr().out
    assert (root / "train_datasets" / "images.tar.gz").stat().st_mtime_ns == stamp
    demo.make_data(root, num_train=8, num_val=4, num_infer=6, prompts=demo.HOLDOUT)  # other settings: written again
    with tarfile.open(root / "train_datasets" / "images.tar.gz") as tar:
        assert len(tar.getnames()) == 8


def test_workflow_fine_tunes_the_base_architecture():
    from runner.base_model import MODEL
    from runner.runner_gen import load_workflow

    steps = load_workflow(demo.WORKFLOW.with_suffix(".yaml"))["steps"]
    train = next(s for s in steps if s["action"] == "train")
    # backbone_norm is left to 'auto': the pretrained backbone's norm layers stay frozen while fine-tuning
    assert train["spec"]["model"] == {k: v for k, v in MODEL.items() if k != "backbone_norm"}
    assert train["spec"]["train"]["pretrained_model_path"] == "${base_model}"


def test_found_per_phrase_matches_each_object_once():
    truth = {"images": [{"id": 0, "file_name": "a.jpg"}], "categories": [{"id": 0, "name": "red circle"}],
             "annotations": [{"image_id": 0, "category_id": 0, "bbox": [10, 10, 20, 20]}]}
    detections = [{"file_name": "a.jpg", "category_name": "red circle", "bbox": [11, 11, 20, 20], "score": 0.9},
                  {"file_name": "a.jpg", "category_name": "red circle", "bbox": [10, 10, 20, 20], "score": 0.8},
                  {"file_name": "a.jpg", "category_name": "blue star", "bbox": [50, 50, 5, 5], "score": 0.7}]
    found = demo.found_per_phrase(detections, truth)
    assert found["red circle"] == {"objects": 1, "found": 1, "false": 1}
    assert found["blue star"] == {"objects": 0, "found": 0, "false": 1}


def test_ap50_is_split_by_whether_a_name_has_a_word_new_to_the_base_model():
    assert "purple" not in read_card()["data"]["colors"]  # the demo's new colour
    rows = [{"name": "red circle", "AP50": 0.8, "objects": 3}, {"name": "blue square", "AP50": 0.6, "objects": 2},
            {"name": "purple circle", "AP50": 0.3, "objects": 4}, {"name": "purple star", "AP50": 0.1, "objects": 1},
            {"name": "purple square", "AP50": -1.0, "objects": 0}]  # no ground truth: not averaged
    split = demo.ap50_by_vocabulary(rows)
    assert split["known_words"] == pytest.approx(0.7) and split["new_words"] == pytest.approx(0.2)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_reduced_size(tmp_path, capsys):
    summary = demo.run_demo(tmp_path / "ws", num_train=12, num_val=6, num_infer=3, max_trials=1, num_epochs=1,
                            num_test=12)
    out = capsys.readouterr().out
    assert "[automl] trial 0 epoch 1/1" in out and "demo summary" in out
    assert list(summary["jobs"]) == ["train", "evaluate", "inference", "export", "evaluate_onnx"]
    assert set(summary["seconds"]) == {"data", "total", *summary["jobs"]}
    assert set(summary["best_trial"]["params"]) == {"train.optim.lr", "train.optim.lr_backbone"}
    assert 0.0 <= summary["best_trial"]["val_mAP50"] <= 1.0
    assert abs(summary["onnx_minus_torch_mAP50"]) < 0.02
    assert set(summary["test_AP50_by_vocabulary"]) == {"known_words", "new_words"}
    # the evaluate job got its train parent's label map: the fine-tuning split is measured, not left out
    assert set(summary["test_mAP50_by_finetuning"]) == {"seen", "unseen_combination", "unseen_word"}
    assert summary["test_mAP50_by_finetuning"]["seen"] is not None
    assert summary["test_mAP50_by_finetuning"]["unseen_combination"] is not None  # orange hexagon is in the test set
    assert set(summary["held_out_test_AP50"]) == set(summary["held_out"])
    assert summary["held_out"][0] in summary["prompts"] and summary["held_out"][0] in summary["found"]
    assert len(list((tmp_path / "ws").rglob("images_annotated/*.jpg"))) == 3
    assert json.loads((tmp_path / "ws" / "demo_summary.json").read_text()) == summary
