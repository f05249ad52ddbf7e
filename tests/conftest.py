"""Shared fixtures: an offline environment, a workspace, and a tiny on-disk dataset (ODVG + COCO)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in the tests may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict:
    """Two images of detection ODVG (boxes per image: 2 and 1), a label map, and a COCO val set (ids 0..1)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "images" / name).write_bytes(b"not decoded by these tests")
    box = {"bbox": [1, 1, 5, 5], "label": 0, "category": "cat"}
    write_jsonl(root / "train_odvg.jsonl", [
        {"file_name": "a.jpg", "height": 10, "width": 10, "detection": {"instances": [box, {**box, "label": 1}]}},
        {"file_name": "b.jpg", "height": 10, "width": 10, "detection": {"instances": [box]}},
    ])
    (root / "labelmap.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    (root / "val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}],
    }))
    spec = {
        "dataset": {
            "train_data_sources": [{"image_dir": str(root / "images"), "json_file": str(root / "train_odvg.jsonl"),
                                    "label_map": str(root / "labelmap.json")}],
            "val_data_sources": {"image_dir": str(root / "images"), "json_file": str(root / "val.json")},
            "test_data_sources": {"image_dir": str(root / "images"), "json_file": str(root / "val.json")},
        },
    }
    return {"root": root, "spec": spec}
