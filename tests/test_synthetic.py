"""Synthetic shapes set: byte-for-byte determinism, TAO layout, COCO validity, vocabulary splits, archives."""
import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
from faster_coco_eval import COCO
from PIL import Image

from grounding_dino.data.synthetic import generate, main, pack_images

SMALL = dict(num_train=8, num_val=4, image_size=64, max_objects=4)


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, generate(str(root), seed=3, **SMALL)


def test_same_arguments_give_identical_bytes(tmp_path, dataset):
    root, _ = dataset
    generate(str(tmp_path / "again"), seed=3, **SMALL)
    assert tree(tmp_path / "again") == tree(root)
    generate(str(tmp_path / "other"), seed=4, **SMALL)
    assert tree(tmp_path / "other") != tree(root)


def test_tao_layout(dataset):
    root, paths = dataset
    assert sorted(tree(root)) == sorted(
        ["train_datasets/annotations_odvg.jsonl", "train_datasets/annotations_odvg_labelmap.json",
         "eval_dataset/annotations.json"]
        + [f"train_datasets/images/train_{i:06d}.jpg" for i in range(8)]
        + [f"eval_dataset/images/val_{i:06d}.jpg" for i in range(4)]
    )
    assert paths == {
        "train_image_dir": str(root / "train_datasets/images"),
        "train_json_file": str(root / "train_datasets/annotations_odvg.jsonl"),
        "label_map": str(root / "train_datasets/annotations_odvg_labelmap.json"),
        "val_image_dir": str(root / "eval_dataset/images"),
        "val_json_file": str(root / "eval_dataset/annotations.json"),
    }


def test_odvg_records_match_their_images_and_label_map(dataset):
    root, paths = dataset
    label_map = json.loads(Path(paths["label_map"]).read_text())
    assert list(label_map) == [str(i) for i in range(30)] and label_map["0"] == "red circle"
    lines = [json.loads(line) for line in Path(paths["train_json_file"]).read_text().splitlines()]
    assert len(lines) == 8
    for line in lines:
        with Image.open(Path(paths["train_image_dir"]) / line["file_name"]) as image:
            assert image.size == (line["width"], line["height"]) == (64, 64) and image.mode == "RGB"
        instances = line["detection"]["instances"]
        assert 1 <= len(instances) <= 4
        for inst in instances:
            x1, y1, x2, y2 = inst["bbox"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert label_map[str(inst["label"])] == inst["category"]


def test_val_is_valid_coco_with_zero_based_ids_in_label_map_order(dataset):
    _, paths = dataset
    coco = COCO(paths["val_json_file"])
    label_map = json.loads(Path(paths["label_map"]).read_text())
    categories = coco.loadCats(sorted(coco.getCatIds()))
    assert [c["id"] for c in categories] == list(range(len(label_map)))
    assert [c["name"] for c in categories] == list(label_map.values())
    assert len(coco.getImgIds()) == 4 and coco.getAnnIds()
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x + w <= 64 and y + h <= 64 and ann["area"] == w * h and ann["iscrowd"] == 0


def test_holdout_and_new_vocabulary_reach_only_val(tmp_path):
    paths = generate(str(tmp_path), num_train=30, num_val=30, image_size=64, max_objects=5, seed=0,
                     colors=["red", "blue"], shapes=["circle", "square"], holdout=["red circle"],
                     val_colors=["red", "blue", "pink"], val_shapes=["circle", "square", "star"])
    train_names = list(json.loads(Path(paths["label_map"]).read_text()).values())
    assert train_names == ["red square", "blue circle", "blue square"]
    seen_train = {inst["category"] for line in Path(paths["train_json_file"]).read_text().splitlines()
                  for inst in json.loads(line)["detection"]["instances"]}
    assert seen_train <= set(train_names) and "red circle" not in seen_train
    val = json.loads(Path(paths["val_json_file"]).read_text())
    val_names = [c["name"] for c in sorted(val["categories"], key=lambda c: c["id"])]
    assert val_names[:3] == train_names  # known names keep their label-map ids
    assert set(val_names[3:]) == {"red circle", "red star", "blue star", "pink circle", "pink square", "pink star"}
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        generate(str(tmp_path / "bad"), colors=["teal"])


def test_archive_members_are_safe_relative_paths_and_reproducible(dataset, tmp_path):
    root, paths = dataset
    archive = pack_images(paths["train_image_dir"])
    assert archive == str(root / "train_datasets" / "images.tar.gz")
    first = Path(archive).read_bytes()
    assert Path(pack_images(paths["train_image_dir"])).read_bytes() == first
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == [f"train_{i:06d}.jpg" for i in range(8)]
        for member in members:
            assert member.isfile() and not member.name.startswith("/") and ".." not in Path(member.name).parts
        tar.extractall(tmp_path / "out", filter="data")
    assert tree(tmp_path / "out") == tree(Path(paths["train_image_dir"]))


def test_generated_set_loads_cleanly(dataset):
    from grounding_dino.config import load_experiment
    from grounding_dino.data import build_dataset

    _, paths = dataset
    cfg = load_experiment({"dataset": {
        "train_data_sources": [{"image_dir": paths["train_image_dir"], "json_file": paths["train_json_file"],
                                "label_map": paths["label_map"]}],
        "val_data_sources": {"image_dir": paths["val_image_dir"], "json_file": paths["val_json_file"]},
        "augmentation": {"scales": [64], "train_random_resize": [64], "train_random_crop_min": 32,
                         "train_random_crop_max": 48, "test_random_resize": 64},
    }})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropped boxes, no other data warnings
        train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 8 and len(val) == 4 and len(val[0][1]["phrases"]) == 30


def test_cli_writes_and_packs(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "48", "--seed", "1", "--pack"])
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["train_archive"]).is_file() and Path(printed["val_archive"]).is_file()
    assert (tmp_path / "eval_dataset" / "images" / "val_000000.jpg").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--shapes", "blob"])


def test_generator_imports_without_torch():
    code = "import sys, grounding_dino.data.synthetic; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
