"""Shared fixtures: an offline environment, a workspace, and a tiny on-disk dataset (ODVG + COCO).

`make test` runs the suite on pytest-xdist workers; each worker's share of the cores is THREADS. Two workers each
running torch on both cores would oversubscribe them, and OpenMP's spinning barriers then make a training several
times slower (a 57 s run took 8 minutes), so a worker's torch, and every process it starts, uses THREADS threads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREADS = max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    # Set before the test modules import torch; the processes the tests start inherit it.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in the tests may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_spec(tiny_train_spec: dict, results_dir, **overrides) -> dict:
    """A copy of the `tiny_train_spec` fixture with results_dir set and dotted overrides ("train.num_epochs": 3)."""
    import copy

    from sdk.spec import set_path

    spec = copy.deepcopy(tiny_train_spec)
    spec.pop("_paths")
    spec["results_dir"] = str(results_dir)
    for dotted, value in overrides.items():
        set_path(spec, dotted, value)
    return spec


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


@pytest.fixture(scope="session")
def tiny_train_spec(tmp_path_factory) -> dict:
    """A complete CPU-sized training spec: resnet_18, hidden 64, 2+2 layers, 100 queries, max_text_len 256, a random
    2-layer BERT, on 8 synthetic 128 px images (6 names) trained from ODVG and validated on 8 COCO images.

    Callers deep-copy it and set results_dir (plus any overrides). `spec["_paths"]` is not part of the spec: it
    holds the generated files (train/val image dirs and annotation files) and must be popped before use.
    """
    from grounding_dino.data.synthetic import generate
    from grounding_dino.model.text import write_small_text_encoder

    root = tmp_path_factory.mktemp("tiny_train")
    paths = generate(str(root / "data"), num_train=8, num_val=8, image_size=128, max_objects=3, seed=0,
                     colors=("red", "green", "blue"), shapes=("circle", "square"))
    size = {"scales": [128], "train_random_resize": [128], "train_random_crop_min": 96, "train_random_crop_max": 128,
            "random_resize_max_size": 128, "test_random_resize": 128}
    return {
        "model": {"backbone": "resnet_18", "hidden_dim": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2,
                  "dim_feedforward": 128, "num_queries": 100, "num_select": 100, "max_text_len": 256,
                  "text_encoder_type": write_small_text_encoder(root / "bert", hidden_size=64),
                  "log_scale": "auto", "class_embed_bias": True},
        "dataset": {
            "train_data_sources": [{"image_dir": paths["train_image_dir"], "json_file": paths["train_json_file"],
                                    "label_map": paths["label_map"]}],
            "val_data_sources": {"image_dir": paths["val_image_dir"], "json_file": paths["val_json_file"]},
            "batch_size": 4, "workers": 0, "augmentation": size,
        },
        "train": {"num_epochs": 2, "activation_checkpoint": False, "optim": {"lr": 1e-3, "lr_backbone": 1e-4}},
        "_paths": paths,
    }
