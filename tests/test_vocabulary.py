"""Open-vocabulary evaluation (grounding_dino.evaluation.vocabulary): the groups are known by construction on the tiny
set's 6 names (red/green/blue x circle/square) against a fine-tuning label map of "red circle" and "blue square"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_spec

from grounding_dino.evaluation import vocabulary

TRAINED = {"0": "red circle", "1": "blue square"}
EXPECTED = {"seen": ["blue square", "red circle"], "unseen_combination": ["blue circle", "red square"],
            "unseen_word": ["green circle", "green square"]}


def _label_map(folder: Path) -> Path:
    path = folder / "finetune_labelmap.json"
    path.write_text(json.dumps(TRAINED))
    return path


def test_groups_by_construction(tmp_path):
    seen = vocabulary.training_phrases([_label_map(tmp_path)])
    assert seen == {"red circle", "blue square"}
    rows = [{"name": name, "AP": ap, "AP50": ap50} for name, ap, ap50 in (
        ("Red Circle", 0.5, 0.9), ("blue square", 0.3, 0.7), ("red square", 0.2, 0.4), ("blue circle", None, None),
        ("green circle", 0.1, 0.2), ("green square", 0.0, 0.0))]
    groups = vocabulary.split(rows, seen)
    assert {name: sorted(map(str.lower, g["categories"])) for name, g in groups.items()} == EXPECTED
    assert groups["seen"]["AP"] == pytest.approx(0.4) and groups["seen"]["AP50"] == pytest.approx(0.8)
    # a category without ground truth is left out of its group's mean, as COCO leaves it out of mAP
    assert groups["unseen_combination"]["AP"] == pytest.approx(0.2) and groups["unseen_combination"]["scored"] == 1
    assert groups["unseen_word"]["AP50"] == pytest.approx(0.1)
    values, reasons = vocabulary.metrics(vocabulary.split(rows[:2], seen))
    assert values["mAP50_seen"] == pytest.approx(0.8) and values["mAP_unseen_word"] is None
    assert reasons["mAP_unseen_word"] == "no test category is a word never seen"


def test_phrases_come_from_label_maps_coco_and_grounding_odvg(tmp_path):
    coco = tmp_path / "train.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "Hard Hat"}]}))
    grounding = tmp_path / "grounding.jsonl"
    grounding.write_text(json.dumps({"file_name": "a.jpg", "height": 8, "width": 8, "grounding": {
        "caption": "a person", "regions": [{"bbox": [0, 0, 4, 4], "phrase": "a person "}]}}) + "\n")
    assert vocabulary.training_phrases([coco, grounding, _label_map(tmp_path)]) == {
        "hard hat", "a person", "red circle", "blue square"}
    detection = tmp_path / "detection.jsonl"
    detection.write_text(json.dumps({"file_name": "a.jpg", "height": 8, "width": 8,
                                     "detection": {"instances": [{"bbox": [0, 0, 4, 4], "label": 0}]}}) + "\n")
    with pytest.raises(vocabulary.VocabularyError, match="names no phrase. Fix: give the training label maps"):
        vocabulary.training_phrases([detection])


def _random_model_spec(tiny_train_spec, root: Path) -> dict:
    import torch

    from grounding_dino.config import load_experiment
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import native_checkpoint

    paths = tiny_train_spec["_paths"]
    spec = tiny_spec(tiny_train_spec, root / "out", **{"model.enc_layers": 1, "model.dec_layers": 1})
    spec["dataset"]["test_data_sources"] = {"image_dir": paths["val_image_dir"], "json_file": paths["val_json_file"]}
    torch.manual_seed(0)
    torch.save(native_checkpoint(build_model(load_experiment(spec).model)), root / "random.pth")
    spec["evaluate"] = {"checkpoint": str(root / "random.pth")}
    return spec


def test_evaluate_reports_each_group_and_they_add_up_to_the_mean(tiny_train_spec, tmp_path, capsys):
    from grounding_dino.actions import run_action
    from grounding_dino.status import read_status

    spec = _random_model_spec(tiny_train_spec, tmp_path)
    spec["evaluate"]["train_vocabulary"] = [str(_label_map(tmp_path))]
    assert run_action("evaluate", spec) == 0
    out = tmp_path / "out" / "evaluate"
    results = json.loads((out / "results.json").read_text())
    groups = json.loads((out / "vocabulary.json").read_text())
    per_class = {row["name"]: row for row in json.loads((out / "per_class.json").read_text())}
    assert {name: sorted(g["categories"]) for name, g in groups.items()} == EXPECTED
    for name, names in EXPECTED.items():
        scored = [per_class[n]["AP50"] for n in names if per_class[n]["AP50"] is not None]
        assert results[f"mAP50_{name}"] == pytest.approx(sum(scored) / len(scored))
    # the groups partition the categories: their AP, weighted by scored categories, is the overall mAP
    total = sum(g["AP"] * g["scored"] for g in groups.values() if g["scored"])
    assert total / sum(g["scored"] for g in groups.values()) == pytest.approx(results["mAP"], abs=1e-9)
    kpi = read_status(out / "status.json")[-1]["kpi"]
    assert kpi["test_mAP50_unseen_word"] == results["mAP50_unseen_word"]
    printed = capsys.readouterr().out
    assert "words seen, never together: red square, blue circle" in printed or \
        "words seen, never together: blue circle, red square" in printed


def test_a_vocabulary_file_without_phrases_stops_evaluate_before_anything_is_written(tiny_train_spec, tmp_path):
    from grounding_dino.actions import run_action
    from grounding_dino.errors import UserError

    spec = _random_model_spec(tiny_train_spec, tmp_path)
    spec["evaluate"]["train_vocabulary"] = [tiny_train_spec["_paths"]["train_json_file"]]  # detection ODVG
    with pytest.raises(UserError, match="evaluate.train_vocabulary: .* names no phrase"):
        run_action("evaluate", spec)
    spec["evaluate"]["train_vocabulary"] = [str(tmp_path / "missing_labelmap.json")]
    with pytest.raises(UserError, match="evaluate.train_vocabulary: .*missing_labelmap.json"):
        run_action("evaluate", spec)
    assert not (tmp_path / "out").exists()


def test_an_evaluate_job_takes_its_train_parents_label_maps(tmp_path):
    from sdk.mappings import KEEP, MappingContext, ParentJob, parent_train_vocabulary

    sources = [{"image_dir": "/d/a", "json_file": "/d/a.jsonl", "label_map": "/d/a_labelmap.json"},
               {"image_dir": "/d/b", "json_file": "/d/b_grounding.jsonl"},
               {"image_dir": "s3://bucket/c", "json_file": "s3://bucket/c.jsonl", "label_map": "s3://bucket/c.json"}]
    parent = ParentJob(tmp_path, {"id": "train-1", "action": "train"}, {"dataset": {"train_data_sources": sources}})
    key = "evaluate.train_vocabulary"
    ctx = MappingContext("evaluate", {"evaluate": {}}, tmp_path, parent)
    assert parent_train_vocabulary(ctx, key) == ["/d/a_labelmap.json", "/d/b_grounding.jsonl"]
    asked = MappingContext("evaluate", {"evaluate": {"train_vocabulary": ["/mine.json"]}}, tmp_path, parent)
    assert parent_train_vocabulary(asked, key) is KEEP  # the request's own list wins
    export_parent = ParentJob(tmp_path, {"id": "export-1", "action": "export"}, {})
    assert parent_train_vocabulary(MappingContext("evaluate", {}, tmp_path, export_parent), key) is KEEP
