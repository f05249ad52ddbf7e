"""Dataset tools: COCO <-> ODVG round trips, contiguous ids, statistics, the `skillbank data` CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grounding_dino.formats import TokenCounter, caption_tokens
from sdk import data_convert, data_stats
from sdk.data_files import DataToolError

REPO = Path(__file__).resolve().parents[1]


def coco_sample() -> dict:
    """Three images (2, 3 and 0 boxes, one crowd region), COCO-style ids 1, 3, 7 (not contiguous)."""
    return {
        "images": [{"id": 10, "file_name": "a.jpg", "height": 100, "width": 200},
                   {"id": 11, "file_name": "b.jpg", "height": 50, "width": 60},
                   {"id": 12, "file_name": "c.jpg", "height": 40, "width": 40}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10.5, 20.0, 30.25, 40.0], "area": 1210, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [5, 6, 7, 8], "area": 56, "iscrowd": 0},
            {"id": 5, "image_id": 11, "category_id": 1, "bbox": [9, 9, 9, 9], "area": 81, "iscrowd": 0},
            {"id": 6, "image_id": 12, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "traffic light", "supercategory": "outdoor"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"}],
    }


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def boxes_by_image(coco: dict, names: bool = True) -> dict:
    name_of = {c["id"]: c["name"] for c in coco["categories"]}
    out = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            out.setdefault(ann["image_id"], []).append((name_of[ann["category_id"]] if names else ann["category_id"],
                                                        ann["bbox"]))
    return {k: sorted(v) for k, v in out.items()}


def test_coco_to_odvg_writes_records_and_label_map(tmp_path):
    source = write(tmp_path / "val.json", coco_sample())
    jsonl, label_map = data_convert.coco_to_odvg(source, tmp_path / "out")
    assert (jsonl.name, label_map.name) == ("val_odvg.jsonl", "val_odvg_labelmap.json")
    assert json.loads(label_map.read_text()) == {"0": "person", "1": "car", "2": "traffic light"}  # id order
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    first = records[0]
    assert (first["image_id"], first["height"], first["width"]) == (10, 100, 200)
    assert first["detection"]["instances"][0] == {"bbox": [10.5, 20.0, 40.75, 60.0], "label": 1, "category": "car"}
    assert records[2]["detection"]["instances"] == []  # the crowd region is left out, the image is kept


def test_odvg_records_load_in_the_training_reader(tmp_path):
    from grounding_dino.data.errors import BoxAudit
    from grounding_dino.data.odvg import label_names, odvg_records

    jsonl, label_map = data_convert.coco_to_odvg(write(tmp_path / "val.json", coco_sample()))
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    records, vocabulary = odvg_records(str(jsonl), str(tmp_path), label_names(str(label_map), "k"), BoxAudit(),
                                       "k", source=0)
    assert vocabulary == ["person", "car", "traffic light"]
    assert [len(r["labels"]) for r in records] == [2, 3, 0]


def test_coco_odvg_coco_round_trip_with_contiguous_ids(tmp_path):
    coco, _ = data_convert.make_contiguous(write(tmp_path / "val.json", coco_sample()))
    original = json.loads(coco.read_text())
    jsonl, label_map = data_convert.coco_to_odvg(coco)
    back = json.loads(data_convert.odvg_to_coco(jsonl, label_map).read_text())
    assert back["categories"] == [{"id": c["id"], "name": c["name"]} for c in original["categories"]]
    assert back["images"] == original["images"]
    got, want = boxes_by_image(back, names=False), boxes_by_image(original, names=False)
    assert got.keys() == want.keys()
    for image_id in want:
        assert [c for c, _ in got[image_id]] == [c for c, _ in want[image_id]]
        for (_, a), (_, b) in zip(got[image_id], want[image_id]):
            assert a == pytest.approx(b, abs=1e-9)
    assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) for a in back["annotations"])


def test_round_trip_from_non_contiguous_ids_keeps_names_and_boxes(tmp_path):
    original = coco_sample()
    jsonl, label_map = data_convert.coco_to_odvg(write(tmp_path / "val.json", original))
    back = json.loads(data_convert.odvg_to_coco(jsonl, label_map, tmp_path / "back.json").read_text())
    assert [c["id"] for c in back["categories"]] == [0, 1, 2]
    got, want = boxes_by_image(back), boxes_by_image(original)
    assert {k: [n for n, _ in v] for k, v in got.items()} == {k: [n for n, _ in v] for k, v in want.items()}


def test_odvg_to_coco_without_label_map_uses_instance_categories(tmp_path):
    jsonl, _ = data_convert.coco_to_odvg(write(tmp_path / "val.json", coco_sample()))
    back = json.loads(data_convert.odvg_to_coco(jsonl).read_text())
    assert back["categories"] == [{"id": 0, "name": "person"}, {"id": 1, "name": "car"},
                                  {"id": 2, "name": "traffic light"}]


def test_grounding_odvg_to_coco(tmp_path):
    lines = [
        {"file_name": "g1.jpg", "height": 10, "width": 10, "grounding": {"caption": "x", "regions": [
            {"bbox": [1, 1, 4, 5], "phrase": "A Dog"}, {"bbox": [2, 2, 3, 3], "phrase": "ball"}]}},
        {"file_name": "g2.jpg", "height": 10, "width": 10, "grounding": {"caption": "y", "regions": [
            {"bbox": [0, 0, 9, 9], "phrase": "a dog"}]}},
    ]
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    back = json.loads(data_convert.odvg_to_coco(jsonl).read_text())
    assert back["categories"] == [{"id": 0, "name": "a dog"}, {"id": 1, "name": "ball"}]
    assert [img["id"] for img in back["images"]] == [0, 1]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in back["annotations"]] == [
        (0, 0, [1, 1, 3, 4]), (0, 1, [2, 2, 1, 1]), (1, 0, [0, 0, 9, 9])]


def test_make_contiguous_rewrites_ids_in_order_and_writes_the_map(tmp_path):
    coco, mapping = data_convert.make_contiguous(write(tmp_path / "val.json", coco_sample()))
    assert (coco.name, mapping.name) == ("val_contiguous.json", "val_contiguous_category_map.json")
    assert json.loads(mapping.read_text()) == {"1": 0, "3": 1, "7": 2}
    data = json.loads(coco.read_text())
    assert data["categories"] == [{"id": 0, "name": "person", "supercategory": "person"},
                                  {"id": 1, "name": "car", "supercategory": "vehicle"},
                                  {"id": 2, "name": "traffic light", "supercategory": "outdoor"}]
    assert [a["category_id"] for a in data["annotations"]] == [1, 0, 2, 2, 0, 0]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5, 6]  # order and everything else kept
    assert boxes_by_image(data) == boxes_by_image(coco_sample())
    from grounding_dino.evaluation import load_coco

    load_coco(str(coco))  # the evaluator accepts it now


def test_stats_on_a_known_file(tmp_path):
    source = write(tmp_path / "val.json", coco_sample())
    stats = data_stats.dataset_stats(source, text_encoder="minilm")
    assert (stats["images"], stats["boxes"], stats["boxes_per_image_max"], stats["classes"]) == (3, 5, 3, 3)
    # image b: "person . traffic light ." = [CLS] person . traffic light . [SEP]
    assert stats["tokens_per_caption_max"] == 7
    assert stats["tokens_all_classes"] == 9  # [CLS] person . car . traffic light . [SEP]
    jsonl, label_map = data_convert.coco_to_odvg(source)
    assert {k: v for k, v in data_stats.dataset_stats(jsonl, label_map, "minilm").items() if k != "file"} == \
        {k: v for k, v in stats.items() if k != "file"}


def test_token_counts_match_the_real_tokenizer():
    from transformers import AutoTokenizer

    from grounding_dino.formats import build_caption

    vocab = data_stats.find_vocab("minilm")
    tokenizer = AutoTokenizer.from_pretrained(str(vocab.parent))
    counter = TokenCounter.from_folder(vocab.parent)
    names = ["person", "hot dog", "teddy bear", "hair drier", "Café crème", "xylophonist's  kit-bag?", "北京"]
    for name in names:
        assert counter.count(name) == len(tokenizer(name, add_special_tokens=False)["input_ids"]), name
    caption, _ = build_caption(names)
    assert caption_tokens(counter.costs(names)) == len(tokenizer(caption)["input_ids"])
    # without a vocabulary: words and punctuation, a lower bound
    estimate = TokenCounter.estimate()
    assert caption_tokens(estimate.costs(["hair drier"])) == 5 <= caption_tokens(counter.costs(["hair drier"]))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"][0].update(category_id=99), r"annotations\[0\]\.category_id \(id 1\): found an integer 99; expected the id of a category"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2]), r"annotations\[1\]\.bbox \(id 2\): found a list \[1, 2\]; expected 4 finite numbers"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images\[3\]\.id: image id 10 appears twice"),
    (lambda d: d.pop("categories"), r"categories: missing; expected a list \(a COCO file needs 'images', 'annotations' and 'categories'\)"),
])
def test_bad_coco_is_named(tmp_path, mutate, message):
    data = coco_sample()
    mutate(data)
    with pytest.raises(DataToolError, match=message):
        data_convert.coco_to_odvg(write(tmp_path / "bad.json", data))


def test_bad_odvg_is_named_by_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"file_name": "a.jpg", "height": 5, "width": 5, "detection": {"instances": []}}\n\n'
                     '{"file_name": "b.jpg", "height": 5, "width": 5, "detection": {"instances": '
                     '[{"bbox": [0, 0, 1, 1], "label": 4}]}}\n')
    label_map = write(tmp_path / "map.json", {"0": "cat"})
    with pytest.raises(DataToolError, match=r"bad.jsonl line 3 detection.instances\[0\]: label 4 is not in the label"):
        data_convert.odvg_to_coco(jsonl, label_map)
    with pytest.raises(DataToolError, match="line 3 detection.instances.0.: no label map was given"):
        data_convert.odvg_to_coco(jsonl)
    jsonl.write_text("{not json\n")
    with pytest.raises(DataToolError, match="bad.jsonl line 1: not valid JSON"):
        data_stats.dataset_stats(jsonl)


def test_cli_runs_the_tools_and_exits_2_on_bad_input(tmp_path):
    source = write(tmp_path / "val.json", coco_sample())
    run = [sys.executable, "-m", "runner.cli", "data"]
    done = subprocess.run(run + ["coco2odvg", str(source), "--name", "x"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x_odvg.jsonl").is_file() and (tmp_path / "x_odvg_labelmap.json").is_file()
    done = subprocess.run(run + ["stats", str(source), "--json"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["boxes_per_image_max"] == 3
    done = subprocess.run(run + ["contiguous", str(tmp_path / "missing.json")], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "missing.json does not exist" in done.stderr
    code = "import sys, sdk.data_convert, sdk.data_stats, runner.data_cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
