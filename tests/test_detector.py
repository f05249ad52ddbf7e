"""grounding_dino.Detector and batch invariance: an image's boxes and scores are the same (<= 1e-5) alone or in a
padded batch with images of other sizes and other prompts, in PyTorch, in ONNX Runtime and in the evaluate action.

A random-init tiny model (resnet_18, hidden 64, 1+1 layers, a random 2-layer BERT) is enough: the property holds for
any weights, and random ones give every query a score to compare.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from grounding_dino import Detector
from grounding_dino.config import load_experiment
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import native_checkpoint
from grounding_dino.model.postprocess import post_process
from grounding_dino.model.text import write_small_text_encoder

SIZES = ((96, 128), (128, 160), (72, 72))  # (height, width) of the test images
PROMPTS = (["red circle"], ["blue square", "green triangle"], ["a yellow star", "circle", "square"])
OPTIONS = {"resize": 96, "max_size": 160, "threshold": 0.0, "num_select": 30}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny checkpoint, its spec, and three noise images of different sizes saved as PNG."""
    root = tmp_path_factory.mktemp("detector")
    spec = {"model": {"backbone": "resnet_18", "hidden_dim": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 1,
                      "dim_feedforward": 128, "num_queries": 50, "num_select": 30, "max_text_len": 256,
                      "text_encoder_type": write_small_text_encoder(root / "bert", hidden_size=64),
                      "log_scale": "auto", "class_embed_bias": True}}
    torch.manual_seed(0)
    model = build_model(load_experiment(spec).model).eval()
    torch.save(native_checkpoint(model), root / "model.pth")
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate(SIZES):
        paths.append(root / f"image_{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    return {"root": root, "spec": spec, "model": model, "checkpoint": root / "model.pth", "images": paths}


def assert_same(alone, batched):
    assert alone.phrases == batched.phrases and np.array_equal(alone.labels, batched.labels)
    assert np.abs(alone.scores - batched.scores).max() <= 1e-5
    assert np.abs(alone.boxes - batched.boxes).max() <= 1e-5 * max(SIZES[-1])


def test_an_image_gives_the_same_detections_alone_and_in_a_mixed_batch(tiny):
    detector = Detector.load(tiny["checkpoint"], batch_size=3, **OPTIONS)
    batched = detector.predict(tiny["images"], list(PROMPTS))
    for path, prompt, result in zip(tiny["images"], PROMPTS, batched):
        assert len(result) == OPTIONS["num_select"]
        assert_same(detector.predict(path, prompt), result)


def test_onnx_runtime_gives_the_same_detections_alone_and_in_a_mixed_batch(tiny, tmp_path):
    from grounding_dino.actions.export import export_model

    spec = {**tiny["spec"], "export": {"input_width": 128, "input_height": 96, "verify": False}}
    path, _ = export_model(tiny["model"], load_experiment(spec), tmp_path / "model.onnx")
    detector = Detector.load(path, text_encoder_type=tiny["spec"]["model"]["text_encoder_type"], batch_size=3,
                             **OPTIONS)
    assert detector.predictor.name == "onnx"
    batched = detector.predict(tiny["images"], list(PROMPTS))
    for path, prompt, result in zip(tiny["images"], PROMPTS, batched):
        assert_same(detector.predict(path, prompt), result)


def test_evaluate_scores_an_image_the_same_at_any_batch_size(tiny, tmp_path):
    """Batches padded to their largest image (fixed_padding false) used to change the smaller images' scores."""
    from grounding_dino.actions.evaluate import evaluate
    from grounding_dino.predictor import load_predictor

    images = [{"id": i, "file_name": p.name, "height": h, "width": w}
              for i, (p, (h, w)) in enumerate(zip(tiny["images"], SIZES))]
    annotations = [{"id": i + 1, "image_id": i, "category_id": 0, "bbox": [4, 4, 30, 30], "area": 900, "iscrowd": 0}
                   for i in range(len(images))]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 0, "name": "red circle"},
                                                                         {"id": 1, "name": "blue square"}]}
    (tmp_path / "test.json").write_text(json.dumps(coco))
    detections = []
    for batch_size in (1, 3):
        spec = {**tiny["spec"], "dataset": {
            "test_data_sources": {"image_dir": str(tiny["root"]), "json_file": str(tmp_path / "test.json")},
            "batch_size": batch_size, "workers": 0,
            "augmentation": {"test_random_resize": 96, "random_resize_max_size": 160, "fixed_padding": False}}}
        cfg = load_experiment(spec)
        evaluate(cfg, load_predictor(tiny["checkpoint"], cfg), tmp_path / f"detections_{batch_size}.json")
        found = json.loads((tmp_path / f"detections_{batch_size}.json").read_text())
        detections.append(sorted(found, key=lambda d: (d["image_id"], -d["score"], d["category_id"])))
    alone, batched = detections
    assert len(alone) == len(batched) > 0
    assert [d["category_id"] for d in alone] == [d["category_id"] for d in batched]
    assert np.abs(np.array([d["score"] for d in alone]) - [d["score"] for d in batched]).max() <= 1e-5
    assert np.abs(np.array([d["bbox"] for d in alone]) - [d["bbox"] for d in batched]).max() <= 1e-3


def test_one_label_per_box_keeps_each_boxs_best_phrase_of_the_same_detections(tiny):
    prompt = ["red circle", "blue square", "green triangle"]
    every = Detector.load(tiny["checkpoint"], **OPTIONS).predict(tiny["images"][1], prompt)
    one = Detector.load(tiny["checkpoint"], one_label_per_box=True, **OPTIONS).predict(tiny["images"][1], prompt)
    boxes = [tuple(np.round(b, 3)) for b in every.boxes]
    assert len(set(boxes)) < len(boxes)  # the default gives some box several phrases
    best: dict = {}
    for box, score, phrase in zip(boxes, every.scores, every.phrases):
        if box not in best or score > best[box][0]:
            best[box] = (score, phrase)
    one_boxes = [tuple(np.round(b, 3)) for b in one.boxes]
    assert len(set(one_boxes)) == len(one_boxes) == len(one) <= OPTIONS["num_select"]
    for box, score, phrase in zip(one_boxes, one.scores, one.phrases):
        if box in best:  # every box the default kept carries its best phrase here too
            assert (phrase, score) == (best[box][1], pytest.approx(best[box][0], abs=1e-6))


def test_paths_pil_images_and_arrays_give_one_result(tiny, tmp_path):
    detector = Detector.load(tiny["checkpoint"], **OPTIONS)
    path = tiny["images"][0]
    pil = Image.open(path).convert("RGB")
    by_path, by_pil, by_array = detector.predict([path, pil, np.asarray(pil)], "red circle, blue square")
    for other in (by_pil, by_array):
        assert_same(by_path, other)
    assert by_path.names == ("red circle", "blue square")
    assert set(by_path.phrases) <= set(by_path.names)
    assert by_path.phrases == [by_path.names[i] for i in by_path.labels]
    height, width = SIZES[0]
    assert by_path.image_size == by_array.image_size == (width, height)
    assert (by_path.boxes >= 0).all() and (by_path.boxes[:, [0, 2]] <= width).all()
    assert (by_path.boxes[:, [1, 3]] <= height).all()
    assert list(by_path.scores) == sorted(by_path.scores, reverse=True)
    gap = int(np.argmax(-np.diff(by_path.scores[:10])))  # a threshold far from any score: an exact count
    threshold = float(by_path.scores[gap] + by_path.scores[gap + 1]) / 2
    strict = detector.predict(path, ["red circle", "blue square"], threshold=threshold)
    assert len(strict) == gap + 1 and np.abs(strict.boxes - by_path.boxes[:gap + 1]).max() <= 1e-3

    drawn = detector.annotate(pil, by_path)
    assert drawn.size == pil.size and drawn.tobytes() != pil.tobytes()
    written = detector.annotate(path, by_path, tmp_path / "out" / "annotated.jpg")
    assert written == tmp_path / "out" / "annotated.jpg" and Image.open(written).format == "JPEG"


def test_bad_inputs_are_refused_with_the_fix(tiny):
    with pytest.raises(TypeError, match=r"unknown Detector option\(s\) \['treshold'\]"):
        Detector.load(tiny["checkpoint"], treshold=0.3)
    detector = Detector.load(tiny["checkpoint"], **OPTIONS)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        detector.predict(tiny["images"], [["red circle"], ["blue square"]])
    with pytest.raises(ValueError, match="repeats a phrase"):
        detector.predict(tiny["images"][0], "circle, circle")
    with pytest.raises(ValueError, match="must be uint8 HxW or HxWx3"):
        detector.predict(np.zeros((8, 8, 3), np.float32), "circle")


def test_to_supervision(tiny):
    supervision = pytest.importorskip("supervision")
    result = Detector.load(tiny["checkpoint"], **OPTIONS).predict(tiny["images"][0], "red circle, blue square")
    converted = result.to_supervision()
    assert isinstance(converted, supervision.Detections) and len(converted) == len(result)
    assert np.array_equal(converted.xyxy, result.boxes) and list(converted.data["class_name"]) == result.phrases


def test_top_k_ties_keep_index_order():
    """Equal scores (here: every query and phrase alike) are ranked by query, then phrase, in any batch."""
    logits = torch.zeros(2, 40, 8)
    boxes = torch.full((2, 40, 4), 0.5)
    positive_map = torch.eye(3, 8)
    first, second = post_process(logits, boxes, positive_map, torch.tensor([[10, 10], [10, 10]]), num_select=7)
    expected = torch.arange(7)
    assert torch.equal(first["labels"], expected % 3) and torch.equal(second["labels"], expected % 3)


def _mixed_size_val(root):
    """Eight 256 px synthetic val images of the base vocabulary, every other one cropped to 256x160 (boxes inside the
    crop kept), so the test resize gives two shapes and batches need padding."""
    from grounding_dino.data.synthetic import generate

    paths = generate(str(root), num_train=4, num_val=8, image_size=256, max_objects=3, seed=5,
                     colors=("red", "blue"), shapes=("circle", "square"))
    coco = json.loads(open(paths["val_json_file"]).read())
    for image in coco["images"][1::2]:
        path = f"{paths['val_image_dir']}/{image['file_name']}"
        Image.open(path).crop((0, 0, 256, 160)).save(path, quality=95)
        image["height"] = 160
    heights = {image["id"]: image["height"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["bbox"][1] + a["bbox"][3] <= heights[a["image_id"]]]
    with open(paths["val_json_file"], "w") as f:
        json.dump(coco, f)
    return paths


@pytest.mark.slow
def test_training_validation_of_padded_batches_equals_evaluate_at_batch_1(tmp_path):
    """Validation pads each batch to its largest image (fixed_padding false); it must still score what evaluate
    scores one image at a time. One epoch of the base model on four images: 3 to 60 s on 2 CPUs (measured)."""
    from grounding_dino.actions import run_action
    from grounding_dino.status import read_status
    from runner.base_model import BASE_MODEL, train_spec

    paths = _mixed_size_val(tmp_path / "data")
    spec = train_spec(paths, str(tmp_path / "runs"), epochs=1, batch_size=4, cuda=False, workers=0,
                      validation_interval=1, decay_by_epoch=True, lr=1e-6)
    spec["train"]["pretrained_model_path"] = str(BASE_MODEL)
    spec["train"]["precision"] = "fp32"  # the recipe's "auto" is bf16 on some CPUs; evaluate below runs fp32
    assert run_action("train", spec) == 0
    kpi = [r["kpi"] for r in read_status(tmp_path / "runs" / "train" / "status.json") if "val_mAP50" in r.get("kpi",
                                                                                                             {})][-1]
    assert kpi["val_mAP50"] > 0.1, "the base model found nothing: the comparison would be vacuous"
    spec["dataset"]["test_data_sources"] = dict(spec["dataset"]["val_data_sources"])
    spec["dataset"]["batch_size"] = 1
    spec["evaluate"] = {"checkpoint": str(tmp_path / "runs" / "train" / "gdino_model_latest.pth"),
                        "results_dir": str(tmp_path / "eval")}
    assert run_action("evaluate", spec) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["mAP50"] == pytest.approx(kpi["val_mAP50"], abs=1e-6)
    assert results["mAP"] == pytest.approx(kpi["val_mAP"], abs=1e-6)
