"""`skillbank data autolabel`: synthetic images labelled by the packaged base model, read back with the repo's own
readers, close to the images' ground truth, and trained on for one epoch (ODVG as train data, COCO as val)."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_spec

from grounding_dino.formats.coco import read_coco
from grounding_dino.formats.odvg import read_label_map, read_odvg
from runner.base_model import AUGMENTATION, BASE_MODEL
from runner.data_cli import main as data_main

PROMPTS = ("red circle", "blue square", "green circle", "green square")


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Six 256 px synthetic images of the base vocabulary, auto-labelled by the base model through the CLI."""
    from grounding_dino.data.synthetic import generate

    root = tmp_path_factory.mktemp("autolabel")
    paths = generate(str(root / "data"), num_train=6, num_val=0, image_size=256, max_objects=3, seed=3,
                     colors=("red", "blue", "green"), shapes=("circle", "square"))
    out = root / "labels"
    code = data_main(["autolabel", paths["train_image_dir"], "--prompts", ", ".join(PROMPTS), "--checkpoint",
                      str(BASE_MODEL), "--out", str(out), "--threshold", "0.3", "--batch-size", "4",
                      "--resize", str(AUGMENTATION["test_random_resize"]),
                      "--max-size", str(AUGMENTATION["random_resize_max_size"])])
    assert code == 0
    return {"paths": paths, "out": out}


def test_files_parse_and_agree_with_each_other_and_the_ground_truth(labelled):
    out, paths = labelled["out"], labelled["paths"]
    label_map = read_label_map(out / "autolabel_odvg_labelmap.json")
    assert label_map == dict(enumerate(PROMPTS))
    records = list(read_odvg(out / "autolabel_odvg.jsonl"))
    assert [r.file_name for r in records] == [f"train_{i:06d}.jpg" for i in range(6)]
    assert all(r.kind == "detection" and (r.width, r.height) == (256, 256) for r in records)
    coco = read_coco(out / "autolabel_coco.json")
    assert [c["name"] for c in coco["categories"]] == list(PROMPTS)
    odvg_boxes = sorted((r.image_id, region["label"], tuple(region["bbox"])) for r in records
                        for region in r.regions)
    coco_boxes = sorted((a["image_id"], a["category_id"], (x, y, round(x + w, 2), round(y + h, 2)))
                        for a in coco["annotations"] for x, y, w, h in [a["bbox"]])
    assert len(odvg_boxes) == len(coco_boxes) > 0
    assert [b[:2] for b in odvg_boxes] == [b[:2] for b in coco_boxes]
    assert max(abs(p - q) for a, b in zip(odvg_boxes, coco_boxes) for p, q in zip(a[2], b[2])) <= 0.011
    assert all(a["score"] >= 0.3 for a in coco["annotations"])
    assert len({b[0::2] for b in odvg_boxes}) == len(odvg_boxes), "a box carries two labels"

    truth = {}
    for record in read_odvg(paths["train_json_file"]):
        truth[record.file_name] = [(region["category"], region["bbox"]) for region in record.regions
                                   if region["category"] in PROMPTS]
    found = [(r.file_name, label_map[region["label"]], region["bbox"]) for r in records for region in r.regions]
    right = sum(any(name == phrase and _iou(box, gt) >= 0.5 for name, gt in truth[file]) for file, phrase, box in found)
    assert right >= 0.7 * len(found), f"only {right} of {len(found)} auto-labels match a ground-truth box"


def test_a_training_run_takes_the_labels_as_they_are(labelled, tiny_train_spec, tmp_path):
    from grounding_dino.actions import run_action
    from grounding_dino.config import load_experiment
    from grounding_dino.status import read_status

    out, images = labelled["out"], labelled["paths"]["train_image_dir"]
    spec = tiny_spec(tiny_train_spec, tmp_path, **{
        "train.num_epochs": 1, "model.enc_layers": 1, "model.dec_layers": 1,
        "dataset.train_data_sources": [{"image_dir": images, "json_file": str(out / "autolabel_odvg.jsonl"),
                                        "label_map": str(out / "autolabel_odvg_labelmap.json")}],
        "dataset.val_data_sources": {"image_dir": images, "json_file": str(out / "autolabel_coco.json")},
    })
    assert run_action("train", load_experiment(spec)) == 0
    status = read_status(tmp_path / "train" / "status.json")
    assert status[-1]["status"] == "SUCCESS"
    assert any("val_mAP50" in r.get("kpi", {}) for r in status)
    assert sorted(p.name for p in (tmp_path / "train").glob("model_epoch_000_step_*.pth"))


def test_bad_requests_exit_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["autolabel", str(tmp_path / "empty"), "--prompts", "circle", "--checkpoint", str(BASE_MODEL), "--out",
            str(tmp_path / "out")]
    assert data_main(args) == 2
    assert "holds no image" in capsys.readouterr().err
    args[1] = json.__file__  # a file, not a folder
    assert data_main(args) == 2
    assert "is not a folder of images" in capsys.readouterr().err


def test_each_box_gets_one_label_even_when_a_query_scores_several_phrases(labelled, tmp_path):
    """At threshold 0 the top (query, phrase) pairs repeat queries; the training data keeps each box once."""
    from grounding_dino.autolabel import autolabel

    images = tmp_path / "images"
    images.mkdir()
    for name in ("train_000000.jpg", "train_000001.jpg"):
        (images / name).write_bytes((labelled["out"].parent / "data" / "train_datasets" / "images" / name).read_bytes())
    done = autolabel(images, PROMPTS, BASE_MODEL, tmp_path / "out", threshold=0.0, num_select=100,
                     resize=AUGMENTATION["test_random_resize"], max_size=AUGMENTATION["random_resize_max_size"])
    records = list(read_odvg(done["odvg"]))
    for record in records:
        boxes = [tuple(region["bbox"]) for region in record.regions]
        assert len(boxes) == len(set(boxes)) and 0 < len(boxes) < 100  # 100 pairs, fewer distinct queries
    assert done["boxes"] == sum(len(r.regions) for r in records) == len(read_coco(done["coco"])["annotations"])
