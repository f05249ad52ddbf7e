"""Data pipeline: readers and their errors, captions, sampling, transforms, collate, storage, loaders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from grounding_dino.config import load_experiment
from grounding_dino.data import DataError, DataWarning, build_caption, build_dataloader, build_dataset, collate_fn
from grounding_dino.data.captions import sample_names
from grounding_dino.data.transforms import RandomHorizontalFlip, RandomSizeCrop, build_transforms

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_AUG = {
    "scales": [56, 64, 72], "train_random_resize": [50, 60], "train_random_crop_min": 32, "train_random_crop_max": 48,
    "random_resize_max_size": 96, "test_random_resize": 64,
}
LABELS = {"0": "cat", "1": "dog", "2": "bird", "3": "fish", "4": "horse"}


def write_image(path, width=64, height=48, color=(120, 130, 140)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)


def odvg_line(name, instances, width=64, height=48, **extra):
    return json.dumps({"file_name": name, "height": height, "width": width,
                       "detection": {"instances": [{"bbox": b, "label": lab} for b, lab in instances]}, **extra})


def write_source(tmp_path, lines, label_map=LABELS, images=None, name="ann.jsonl"):
    """ODVG file + label map + the images its lines name (or `images`, to leave some out)."""
    for line in lines:
        try:
            file_name = json.loads(line)["file_name"]
        except (ValueError, KeyError):
            continue
        if images is None or file_name in images:
            write_image(tmp_path / "images" / file_name)
    json_file = tmp_path / name
    json_file.write_text("\n".join(lines) + "\n")
    source = {"image_dir": str(tmp_path / "images"), "json_file": str(json_file)}
    if label_map is not None:
        (tmp_path / "labels.json").write_text(json.dumps(label_map))
        source["label_map"] = str(tmp_path / "labels.json")
    return source


def write_coco(tmp_path, categories, annotations, name="val.json", images=(("v0.jpg", 0),)):
    for file_name, _ in images:
        write_image(tmp_path / "val_images" / file_name)
    coco = {"images": [{"id": i, "file_name": f, "width": 64, "height": 48} for f, i in images],
            "annotations": annotations, "categories": categories}
    (tmp_path / name).write_text(json.dumps(coco))
    return {"image_dir": str(tmp_path / "val_images"), "json_file": str(tmp_path / name)}


def config(train=None, val=None, **dataset):
    spec = {"dataset": {"workers": 0, "batch_size": 2, "augmentation": dict(SMALL_AUG), **dataset}}
    if train is not None:
        spec["dataset"]["train_data_sources"] = train
    if val is not None:
        spec["dataset"]["val_data_sources"] = val
    return load_experiment(spec)


@pytest.fixture
def tokenizer():
    from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder

    return CaptionTokenizer(resolve_text_encoder("minilm"), max_text_len=16)


@pytest.fixture
def good_source(tmp_path):
    lines = [odvg_line(f"im{i}.jpg", [([4, 4, 30, 20], i % 5), ([20, 10, 60, 44], (i + 2) % 5)]) for i in range(6)]
    return write_source(tmp_path, lines)


# ------------------------------------------------------------------------------------------------ captions


def test_caption_spans_point_at_each_name_even_inside_an_earlier_name():
    caption, spans = build_caption(["Race Car ", "car", " RED car", "race"])
    assert caption == "race car . car . red car . race ."
    assert [caption[s:e] for s, e in spans] == ["race car", "car", "red car", "race"]
    assert spans[1] == (11, 14)  # not (5, 8), the "car" inside "race car"
    assert spans[3] == (27, 31)


def test_sampling_keeps_positives_fills_negatives_and_is_seeded():
    vocab = [f"name{i}" for i in range(20)]
    names = sample_names(["name3", "name7", "name3"], vocab, 6, np.random.default_rng(0))
    assert len(names) == 6 and {"name3", "name7"} <= set(names) and len(set(names)) == 6
    again = sample_names(["name7", "name3"], list(reversed(vocab)), 6, np.random.default_rng(0))
    assert again == names  # input order does not matter, only the rng
    many = [f"name{i}" for i in range(9)]
    over = sample_names(many, vocab, 4, np.random.default_rng(1))
    assert sorted(over) == sorted(many)  # positives are never dropped for max_labels


def test_sampling_trims_negatives_to_fit():
    names = sample_names(["a"], ["b", "c", "d", "e"], 5, np.random.default_rng(0), lambda n: len(n) <= 3)
    assert "a" in names and len(names) == 3


def test_hard_negatives_share_a_word_with_a_positive_and_come_first():
    vocab = ["orange circle", "orange square", "red hexagon", "blue star", "green ring", "pink cross", "red star"]
    positives = ["orange hexagon"]
    for seed in range(20):
        names = sample_names(positives, vocab, 4, np.random.default_rng(seed), hard_negatives=True)
        negatives = set(names) - set(positives)
        # three names share "orange" or "hexagon"; all three fit in max_labels 4, so no easy one gets in
        assert negatives == {"orange circle", "orange square", "red hexagon"}
    easy = [sorted(set(sample_names(positives, vocab, 4, np.random.default_rng(s))) - set(positives))
            for s in range(20)]
    assert any("blue star" in n or "pink cross" in n for n in easy)  # the default draws from the whole pool
    few = sample_names(positives, vocab, 3, np.random.default_rng(0), hard_negatives=True)
    assert len(few) == 3 and set(few) - set(positives) <= {"orange circle", "orange square", "red hexagon"}
    more = sample_names(positives, vocab, 6, np.random.default_rng(0), hard_negatives=True)
    assert {"orange circle", "orange square", "red hexagon"} <= set(more) and len(more) == 6


def test_hard_negatives_reach_the_training_caption(tmp_path):
    labels = {"0": "orange circle", "1": "orange square", "2": "blue star", "3": "pink cross", "4": "green ring"}
    lines = [odvg_line(f"im{i}.jpg", [([4, 4, 30, 20], 0)]) for i in range(4)]
    source = write_source(tmp_path, lines, label_map=labels)
    ds = build_dataset(config([source], max_labels=2, hard_negatives=True), "train", train=False)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert all(sorted(ds[i][1]["phrases"]) == ["orange circle", "orange square"] for i in range(len(ds)))


def sourced(tmp_path, name, count, label):
    lines = [odvg_line(f"{name}{i}.jpg", [([4, 4, 30, 20], label)]) for i in range(count)]
    return write_source(tmp_path / name, lines, name=f"{name}.jsonl")


def test_sampling_weights_set_how_often_each_source_is_drawn_per_epoch(tmp_path):
    base, new = sourced(tmp_path, "base", 10, 0), sourced(tmp_path, "new", 4, 1)
    ds = build_dataset(config([{**base, "sampling_weight": 0.3}, {**new, "sampling_weight": 2}]), "train")
    assert len(ds) == 3 + 8
    seen = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        files = [os.path.basename(ds.records[int(i)]["file"]) for i in ds.draws.table(epoch)]
        assert sorted(f for f in files if f.startswith("new")) == sorted(f"new{i}.jpg" for i in range(4) for _ in "ab")
        picked = sorted(f for f in files if f.startswith("base"))
        assert len(picked) == len(set(picked)) == 3
        seen.append(tuple(picked))
        assert [t["phrases"] for _, t in (ds[i] for i in range(len(ds)))]  # every index reads a record
    assert len(set(seen)) > 1  # a different share of the down-weighted source each epoch
    again = build_dataset(config([{**base, "sampling_weight": 0.3}, {**new, "sampling_weight": 2}]), "train")
    assert np.array_equal(again.draws.table(3), ds.draws.table(3))  # seeded: workers and ranks agree


def test_weight_one_everywhere_keeps_one_pass_and_zero_leaves_a_source_out(tmp_path):
    base, new = sourced(tmp_path, "base", 5, 0), sourced(tmp_path, "new", 3, 1)
    assert build_dataset(config([base, new]), "train").draws is None
    ds = build_dataset(config([{**base, "sampling_weight": 0}, new]), "train")
    assert len(ds) == 3 and all(ds.records[int(i)]["source"] == 1 for i in ds.draws.table(0))
    with pytest.raises(DataError, match="every source's sampling_weight is 0"):
        build_dataset(config([{**base, "sampling_weight": 0}, {**new, "sampling_weight": 0}]), "train")


def test_sampling_does_not_depend_on_hash_seed():
    code = ("import numpy as np; from grounding_dino.data.captions import sample_names;"
            "print(sample_names({'dog', 'cat', 'emu'}, {f'n{i}' for i in range(30)}, 8, np.random.default_rng(5)))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                       capture_output=True, text=True).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


# ------------------------------------------------------------------------------------------------ bad data


def test_malformed_jsonl_line_is_named(tmp_path):
    lines = [odvg_line("a.jpg", [([1, 1, 9, 9], 0)]), odvg_line("b.jpg", [([1, 1, 9, 9], 0)]), '{"file_name": "c.jpg",']
    cfg = config([write_source(tmp_path, lines)])
    with pytest.raises(DataError, match=r"ann\.jsonl line 3: not valid JSON"):
        build_dataset(cfg, "train")


def test_missing_image_is_named_at_build_time(tmp_path):
    lines = [odvg_line("a.jpg", [([1, 1, 9, 9], 0)]), odvg_line("gone.jpg", [([1, 1, 9, 9], 0)])]
    cfg = config([write_source(tmp_path, lines, images={"a.jpg"})])
    with pytest.raises(DataError, match=r"1 image\(s\) not found .*gone\.jpg \(file .*ann\.jsonl line 2\)"):
        build_dataset(cfg, "train")


def test_unknown_label_is_named(tmp_path):
    lines = [odvg_line("a.jpg", [([1, 1, 9, 9], 0)]), odvg_line("b.jpg", [([1, 1, 9, 9], 1), ([2, 2, 8, 8], 7)])]
    cfg = config([write_source(tmp_path, lines)])
    with pytest.raises(DataError, match=r"ann\.jsonl line 2: detection\.instances\[1\]\.label 7 is not in the "
                                        r"label map"):
        build_dataset(cfg, "train")


def test_detection_without_label_map_is_refused(tmp_path):
    cfg = config([write_source(tmp_path, [odvg_line("a.jpg", [([1, 1, 9, 9], 0)])], label_map=None)])
    with pytest.raises(DataError, match=r"ann\.jsonl line 1: detection records need a label map; set "
                                        r"dataset\.train_data_sources\[0\]\.label_map"):
        build_dataset(cfg, "train")


def test_bad_boxes_are_dropped_with_one_summary_line(tmp_path):
    lines = [
        odvg_line("a.jpg", [([1, 1, 9, 9], 0)]),
        odvg_line("b.jpg", [([5, 5, 5, 20], 1), ([2, 2, 10, 10], 2)]),  # zero width
        odvg_line("c.jpg", [([70, 10, 90, 20], 1)]),  # right of a 64-wide image
        odvg_line("d.jpg", [([3, 9, 12, 9], 3), ([-5, -5, 70, 60], 4)]),  # zero height; one clamped, kept
    ]
    cfg = config([write_source(tmp_path, lines)])
    with pytest.warns(DataWarning) as caught:
        ds = build_dataset(cfg, "train")
    messages = [str(w.message) for w in caught]
    assert messages == [f"dropped 3 boxes: 2 zero-area, 1 outside image (first: file {tmp_path}/ann.jsonl line 2)"]
    assert [len(r["boxes"]) for r in ds.records] == [1, 1, 0, 1]
    assert ds.records[3]["boxes"].tolist() == [[0, 0, 64, 48]]


def test_coco_val_ids_must_be_zero_based_and_contiguous(tmp_path):
    val = write_coco(tmp_path, [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], [])
    with pytest.raises(DataError, match=r"val\.json: category ids must be 0-based and contiguous \(0\.\.1\) "
                                        r".*got \[1, 2\]"):
        build_dataset(config(val=val), "val")


def test_coco_annotation_with_unknown_category_is_named(tmp_path):
    ann = [{"id": 5, "image_id": 0, "category_id": 9, "bbox": [1, 1, 5, 5]}]
    val = write_coco(tmp_path, [{"id": 0, "name": "cat"}], ann)
    with pytest.raises(DataError, match=r"val\.json annotation id 5 \(annotations\[0\]\.category_id\): found an "
                                         r"integer 9; expected the id of a category in 'categories'"):
        build_dataset(config(val=val), "val")


def test_unset_or_archived_sources_are_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.val_data_sources\.json_file is not set"):
        build_dataset(config(), "val")
    with pytest.raises(DataError, match=r"dataset\.train_data_sources is empty"):
        build_dataset(config(), "train")
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"")
    (tmp_path / "a.jsonl").write_text("")
    cfg = config([{"image_dir": str(archive), "json_file": str(tmp_path / "a.jsonl")}])
    with pytest.raises(DataError, match=r"train_data_sources\[0\]\.image_dir: .*images\.tar\.gz is an archive"):
        build_dataset(cfg, "train")


def test_image_size_disagreeing_with_annotation_is_named(tmp_path):
    source = write_source(tmp_path, [odvg_line("a.jpg", [([1, 1, 9, 9], 0)], width=80)])
    ds = build_dataset(config([source]), "train")
    with pytest.raises(DataError, match=r"ann\.jsonl line 1: image .*a\.jpg is 64x48 pixels but the annotation "
                                        r"says 80x48"):
        ds[0]


def test_unreadable_image_is_named(tmp_path):
    source = write_source(tmp_path, [odvg_line("a.jpg", [([1, 1, 9, 9], 0)])])
    (tmp_path / "images" / "a.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset(config([source]), "train")
    with pytest.raises(DataError, match=r"^dataset\.train_data_sources\[0\]\.image_dir: cannot read image .*a\.jpg "
                                        r"\(file .*ann\.jsonl line 1\): .*Fix: .*dataset\.skip_bad_images=true"):
        ds[0]


def test_caption_whose_positives_exceed_max_text_len_is_refused(tmp_path, tokenizer):
    long_names = {"0": "hexagonal prism shaped thing", "1": "small spotted salamander with stripes", "2": "cat"}
    lines = [odvg_line("a.jpg", [([1, 1, 9, 9], 2)]), odvg_line("b.jpg", [([1, 1, 9, 9], 0), ([2, 2, 9, 9], 1)])]
    cfg = config([write_source(tmp_path, lines, label_map=long_names)])
    with pytest.raises(DataError, match=r"ann\.jsonl line 2: the 2 names of this image's boxes need \d+ tokens, "
                                        r"more than model\.max_text_len 16"):
        build_dataset(cfg, "train", tokenizer=tokenizer)


def test_negatives_are_trimmed_to_max_text_len_with_a_warning(tmp_path, tokenizer):
    names = {str(i): f"animal number {i}" for i in range(12)}  # 4 tokens each with its " ."
    lines = [odvg_line(f"{i}.jpg", [([1, 1, 9, 9], i)]) for i in range(4)]
    cfg = config([write_source(tmp_path, lines, label_map=names)], max_labels=10)
    with pytest.warns(DataWarning, match=r"4 of 4 training images may get captions longer than max_text_len 16"):
        ds = build_dataset(cfg, "train", tokenizer=tokenizer, train=False)  # no crop, so every box stays
    for i in range(4):
        _, target = ds[i]
        assert len(tokenizer([target["caption"]])["input_ids"][0]) <= 16
        assert len(target["phrases"]) == 3 and f"animal number {i}" in target["phrases"]


# ------------------------------------------------------------------------------------------------ items


def test_train_item_contract(good_source):
    ds = build_dataset(config([good_source], max_labels=4), "train")
    for index in range(len(ds)):
        image, target = ds[index]
        h, w = target["size"].tolist()
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert target["orig_size"].tolist() == [48, 64]
        assert len(target["phrases"]) == 4 and len(set(target["phrases"])) == 4
        assert [target["caption"][s:e] for s, e in target["spans"]] == target["phrases"]
        boxes = target["boxes"]
        assert boxes.shape == (len(target["labels"]), 4) and ((boxes >= 0) & (boxes <= 1)).all()
        record = ds.records[index]
        kept_names = {target["phrases"][i] for i in target["labels"]}
        assert kept_names <= {LABELS[str(int(label))] for label in record["labels"]}


def test_items_are_deterministic_per_seed_and_epoch(good_source):
    first = build_dataset(config([good_source]), "train")
    second = build_dataset(config([good_source]), "train")
    a, b = first[2], second[2]
    assert torch.equal(a[0], b[0]) and a[1]["caption"] == b[1]["caption"] and torch.equal(a[1]["boxes"], b[1]["boxes"])
    captions = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        captions.add(first[2][1]["caption"])
    assert len(captions) > 1


def test_serialized_and_default_storage_give_identical_items(good_source):
    serialized = build_dataset(config([good_source], dataset_type="serialized"), "train")
    default = build_dataset(config([good_source], dataset_type="default"), "train")
    assert isinstance(default.records, list) and not isinstance(serialized.records, list)
    assert len(serialized) == len(default) == 6
    for index in range(6):
        (img_s, tgt_s), (img_d, tgt_d) = serialized[index], default[index]
        assert torch.equal(img_s, img_d)
        for key in ("boxes", "labels", "orig_size", "size"):
            assert torch.equal(tgt_s[key], tgt_d[key])
        for key in ("phrases", "caption", "spans", "image_id"):
            assert tgt_s[key] == tgt_d[key]


def test_grounding_records_caption_their_own_unique_phrases(tmp_path):
    line = json.dumps({"file_name": "g.jpg", "height": 48, "width": 64, "grounding": {
        "caption": "ignored", "regions": [{"bbox": [1, 1, 20, 20], "phrase": "A Red Ball"},
                                          {"bbox": [30, 5, 60, 40], "phrase": "the table"},
                                          {"bbox": [22, 22, 28, 28], "phrase": "a red ball"}]}})
    ds = build_dataset(config([write_source(tmp_path, [line], label_map=None)], max_labels=50), "train", train=False)
    _, target = ds[0]
    assert sorted(target["phrases"]) == ["a red ball", "the table"]
    assert [target["phrases"][i] for i in target["labels"]] == ["a red ball", "the table", "a red ball"]


def test_coco_as_training_source_uses_category_names(tmp_path):
    ann = [{"id": 1, "image_id": 0, "category_id": 7, "bbox": [2, 2, 20, 10]}]
    source = write_coco(tmp_path, [{"id": 7, "name": "Kite"}, {"id": 3, "name": "boat"}], ann)
    _, target = build_dataset(config([source]), "train", train=False)[0]
    assert sorted(target["phrases"]) == ["boat", "kite"] and target["phrases"][int(target["labels"][0])] == "kite"


def test_val_item_uses_all_categories_in_id_order(tmp_path):
    anns = [{"id": 1, "image_id": 0, "category_id": 2, "bbox": [8, 4, 16, 12]},
            {"id": 2, "image_id": 0, "category_id": 0, "bbox": [0, 0, 32, 24], "iscrowd": 1}]
    val = write_coco(tmp_path, [{"id": 2, "name": "Bird"}, {"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}], anns)
    ds = build_dataset(config(val=val), "val")
    image, target = ds[0]
    assert target["phrases"] == ["cat", "dog", "bird"] and target["caption"] == "cat . dog . bird ."
    assert target["labels"].tolist() == [2]  # the crowd region is left to COCO evaluation
    assert target["size"].tolist() == [64, 85] and image.shape == (3, 64, 85)  # short side 64, aspect kept
    assert torch.allclose(target["boxes"], torch.tensor([[16 / 64, 10 / 48, 16 / 64, 12 / 48]]))
    assert sorted(ds.coco_gt.getCatIds()) == [0, 1, 2]
    fixed = build_dataset(config(val=val), "val", input_size=(96, 32))
    assert fixed[0][0].shape == (3, 32, 96) and fixed.pad_size == (32, 96)


# ------------------------------------------------------------------------------------------------ transforms


def test_flip_mirrors_boxes_onto_the_flipped_pixels():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[5:15, 3:11] = (255, 0, 0)
    target = {"boxes": np.array([[3, 5, 11, 15]], dtype=np.float32), "labels": np.array([0])}
    image, flipped = RandomHorizontalFlip(1.0)(Image.fromarray(pixels), target, np.random.default_rng(0))
    assert flipped["boxes"].tolist() == [[29, 5, 37, 15]]
    red = np.argwhere(np.asarray(image)[..., 0] == 255)
    assert red[:, 1].min() == 29 and red[:, 1].max() + 1 == 37 and red[:, 0].min() == 5 and red[:, 0].max() + 1 == 15
    assert target["boxes"].tolist() == [[3, 5, 11, 15]]  # the record's own array is untouched


def test_crop_clips_boxes_and_drops_those_left_outside():
    target = {"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32), "labels": np.array([4, 9])}
    image = Image.new("RGB", (64, 64))
    for seed in range(20):
        out, cropped = RandomSizeCrop(20, 30)(image, target, np.random.default_rng(seed))
        assert 20 <= out.width <= 30 and 20 <= out.height <= 30
        assert len(cropped["boxes"]) == len(cropped["labels"])
        assert (cropped["boxes"][:, 2:] <= [out.width, out.height]).all() and (cropped["boxes"] >= 0).all()
        boxes = cropped["boxes"]
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


@pytest.mark.parametrize("aug", [SMALL_AUG, {**SMALL_AUG, "fixed_random_crop": 80}])
def test_every_training_output_fits_the_reachable_pad_size(aug):
    transforms = build_transforms(load_experiment({"dataset": {"augmentation": aug}}).dataset.augmentation, True)
    bound_h, bound_w = (max(s) for s in zip(*transforms.reachable(48, 64)))
    target = {"boxes": np.zeros((0, 4), dtype=np.float32), "labels": np.zeros(0, dtype=np.int64)}
    seen = set()
    for seed in range(200):
        image, _ = transforms(Image.new("RGB", (64, 48)), target, np.random.default_rng(seed))
        assert image.shape[1] <= bound_h and image.shape[2] <= bound_w
        seen.add(tuple(image.shape[1:]))
    assert max(h for h, _ in seen) == bound_h  # the bound is reached, not just an overestimate
    if aug.get("fixed_random_crop"):
        assert (bound_h, bound_w) == (80, 80)  # up to 2x the crop size, then cropped to it


# ------------------------------------------------------------------------------------------------ batching


def test_collate_pads_to_batch_max_and_masks_padding():
    a, b = torch.ones(3, 10, 20), torch.full((3, 16, 8), 2.0)
    images, mask, targets = collate_fn([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 16, 20) and mask.shape == (2, 16, 20) and [t["i"] for t in targets] == [0, 1]
    assert not mask[0, :10, :20].any() and mask[0, 10:].all() and torch.equal(images[0, :, :10, :20], a)
    assert not mask[1, :16, :8].any() and mask[1, :, 8:].all() and (images[1, :, :, 8:] == 0).all()
    fixed, fixed_mask, _ = collate_fn([(a, {}), (b, {})], pad_size=(32, 24))
    assert fixed.shape == (2, 3, 32, 24) and fixed_mask[0].sum() == 32 * 24 - 200


def test_dataloader_pads_to_the_reachable_size_not_1333(good_source):
    cfg = config([good_source], batch_size=3)
    loader = build_dataloader(cfg, "train")
    pad = loader.dataset.pad_size
    assert pad[0] <= SMALL_AUG["random_resize_max_size"] and pad[1] <= SMALL_AUG["random_resize_max_size"]
    images, mask, targets = next(iter(loader))
    assert images.shape == (3, 3, *pad) and mask.shape == (3, *pad) and len(targets) == 3
    unpadded = build_dataloader(config([good_source], batch_size=3, augmentation={**SMALL_AUG, "fixed_padding": False}),
                                "train")
    images, _, targets = next(iter(unpadded))
    assert tuple(images.shape[2:]) == tuple(max(s) for s in zip(*(t["size"].tolist() for t in targets)))


def test_persistent_workers_see_the_new_epoch(good_source):
    loader = build_dataloader(config([good_source], batch_size=6, workers=1), "train", shuffle=True)
    assert loader.persistent_workers
    next(iter(loader))  # starts the worker at epoch 0
    loader.sampler.set_epoch(3)
    order = list(loader.sampler)
    _, _, targets = next(iter(loader))
    reference = build_dataset(config([good_source]), "train")
    reference.set_epoch(3)
    assert [t["caption"] for t in targets] == [reference[i][1]["caption"] for i in order]
