"""Evaluate and inference actions and the predictor backends, on a briefly trained tiny model.

The tiny run (resnet_18, hidden 64, 1+1 layers, 100 queries, random 2-layer BERT, 8 synthetic 128 px images, one
epoch) is shared by the slow tests; the others build what they need.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import THREADS, tiny_spec

from grounding_dino.status import read_status
from sdk.spec import set_path

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def make_spec(tiny_train_spec, results_dir: Path, **overrides) -> dict:
    """The shared tiny spec with 1+1 layers, results_dir, test = val data, and dotted overrides applied."""
    spec = tiny_spec(tiny_train_spec, results_dir, **{"model.enc_layers": 1, "model.dec_layers": 1})
    spec["dataset"]["test_data_sources"] = dict(spec["dataset"]["val_data_sources"])
    for dotted, value in overrides.items():
        set_path(spec, dotted, value)
    return spec


def config(spec: dict):
    from grounding_dino.config import load_experiment

    return load_experiment(spec)


@pytest.fixture(scope="module")
def trained(tiny_train_spec, tmp_path_factory) -> dict:
    """One epoch of real training; returns the spec, the checkpoint and the epoch's validation KPIs."""
    import torch

    from grounding_dino.actions import run_action

    torch.set_num_threads(THREADS)
    out = tmp_path_factory.mktemp("trained")
    spec = make_spec(tiny_train_spec, out, **{"train.num_epochs": 1})
    assert run_action("train", config(spec)) == 0
    kpi = [r["kpi"] for r in read_status(out / "train" / "status.json") if "val_mAP50" in r.get("kpi", {})][-1]
    return {"spec": spec, "checkpoint": out / "train" / "model_epoch_000_step_00002.pth", "kpi": kpi,
            "paths": tiny_train_spec["_paths"]}


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.mark.slow
def test_evaluate_equals_the_training_validation(trained, tmp_path):
    from faster_coco_eval import COCO

    from grounding_dino.actions import run_action

    # A zero mAP would make the comparison vacuous: the fixture must produce some correct detections.
    assert trained["kpi"]["val_mAP50"] > 0, "the tiny run scored no mAP50; make the fixture train longer"
    spec = copy.deepcopy(trained["spec"])
    spec["evaluate"] = {"checkpoint": str(trained["checkpoint"]), "results_dir": str(tmp_path / "eval")}
    assert run_action("evaluate", config(spec)) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["mAP50"] == pytest.approx(trained["kpi"]["val_mAP50"], abs=1e-6)
    assert results["mAP"] == pytest.approx(trained["kpi"]["val_mAP"], abs=1e-6)
    assert {"mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100"} <= set(results)
    status = read_status(tmp_path / "eval" / "status.json")
    assert [r["status"] for r in status] == ["STARTED", "SUCCESS"]
    assert status[-1]["kpi"]["test_mAP50"] == results["mAP50"] and status[-1]["kpi"]["test_mAP"] == results["mAP"]
    gt = COCO(trained["paths"]["val_json_file"])
    detections = gt.loadRes(str(tmp_path / "eval" / "detections.json"))
    assert len(detections.getAnnIds()) == 100 * len(gt.getImgIds())  # num_select per image
    per_class = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    assert [r["name"] for r in per_class] == [c["name"] for c in gt.loadCats(gt.getCatIds())]
    assert sum(r["objects"] for r in per_class) == len(gt.getAnnIds())
    scored = [r["AP50"] for r in per_class if r["objects"]]
    assert results["mAP50"] == pytest.approx(sum(scored) / len(scored), abs=1e-6)


def test_evaluate_refuses_a_checkpoint_of_another_architecture(tiny_train_spec, tmp_path):
    """run_action's pre-check refuses it with the key, the path and each contradicted setting, before anything is
    written."""
    import torch

    from grounding_dino.actions import run_action
    from grounding_dino.errors import UserError

    checkpoint = tmp_path / "other.pth"
    saved = dict(config(make_spec(tiny_train_spec, tmp_path)).model.__dict__, num_queries=300)
    torch.save({"model": {"class_embed.bias": torch.zeros(1)}, "model_config": saved}, checkpoint)
    (tmp_path / "model.bin").write_bytes(b"")
    spec = make_spec(tiny_train_spec, tmp_path, **{"evaluate.checkpoint": str(checkpoint)})
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=rf"^evaluate.checkpoint {checkpoint} was trained with other model settings"
                                        r".*\n  model.num_queries: checkpoint 300, spec 100$"):
        run_action("evaluate", config(spec))
    spec["evaluate"]["checkpoint"] = str(tmp_path / "model.bin")
    with pytest.raises(UserError, match=rf"^evaluate.checkpoint: {tmp_path / 'model.bin'}: unknown model file type "
                                        r"'.bin'"):
        run_action("evaluate", config(spec))
    assert sorted(tmp_path.rglob("*")) == before, "a refused run wrote files"


def test_eighty_classes_run_as_several_prompts(tiny_train_spec, tmp_path):
    """All COCO category names with a 64-token text encoder: split into prompts, every class scored."""
    import torch

    from grounding_dino.actions import run_action
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import native_checkpoint
    from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder
    from grounding_dino.predictor import split_prompt

    torch.manual_seed(0)
    paths = tiny_train_spec["_paths"]
    val = json.loads(Path(paths["val_json_file"]).read_text())
    val["categories"] = [{"id": i, "name": name} for i, name in enumerate(COCO_NAMES)]
    for i, ann in enumerate(val["annotations"]):
        ann["category_id"] = (17 * i) % len(COCO_NAMES)  # ground truth spread over every prompt
    (tmp_path / "coco80.json").write_text(json.dumps(val))
    spec = make_spec(tiny_train_spec, tmp_path, **{
        "model.max_text_len": 64, "model.num_select": 50,
        "dataset.test_data_sources": {"image_dir": paths["val_image_dir"], "json_file": str(tmp_path / "coco80.json")},
    })
    cfg = config(spec)
    torch.save(native_checkpoint(build_model(cfg.model)), tmp_path / "random.pth")
    cfg.evaluate.checkpoint = str(tmp_path / "random.pth")

    chunks = split_prompt(COCO_NAMES, CaptionTokenizer(resolve_text_encoder(cfg.model.text_encoder_type), 64))
    assert len(chunks) >= 3
    assert [n for c in chunks for n in c.names] == list(COCO_NAMES)
    assert [c.offset for c in chunks] == [sum(len(c.names) for c in chunks[:i]) for i in range(len(chunks))]
    for chunk in chunks:
        assert chunk.positive_map.shape == (len(chunk.names), 64) and bool(chunk.positive_map.any(1).all())

    assert run_action("evaluate", cfg) == 0
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert 0.0 <= results["mAP50"] <= 1.0
    detections = json.loads((tmp_path / "evaluate" / "detections.json").read_text())
    per_image = {}
    for d in detections:
        per_image.setdefault(d["image_id"], []).append(d)
    assert len(per_image) == len(val["images"]) and all(len(v) == 50 for v in per_image.values())
    assert max(d["category_id"] for d in detections) >= chunks[1].offset  # labels mapped back to global ids


def test_merge_keeps_the_global_top_k():
    import torch

    from grounding_dino.predictor import merge_detections

    a = {"scores": torch.tensor([0.9, 0.5, 0.1]), "labels": torch.tensor([0, 1, 0]), "boxes": torch.zeros(3, 4)}
    b = {"scores": torch.tensor([0.7, 0.6]), "labels": torch.tensor([5, 6]), "boxes": torch.ones(2, 4)}
    merged = merge_detections([a, b], num_select=3)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert merged["labels"].tolist() == [0, 5, 6]
    assert merged["boxes"][:, 0].tolist() == [0, 1, 1]


# ------------------------------------------------------------------------------------------------ inference
def _png_folder(paths: dict, folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for source in sorted(Path(paths["val_image_dir"]).iterdir())[:count]:
        with Image.open(source) as image:
            image.save(folder / f"{source.stem}.png")
    return folder


@pytest.mark.slow
def test_inference_writes_labels_annotated_images_and_coco_results(trained, tmp_path):
    from faster_coco_eval import COCO
    from PIL import Image

    from grounding_dino.actions import run_action

    images = _png_folder(trained["paths"], tmp_path / "images", 3)
    spec = dict(copy.deepcopy(trained["spec"]), results_dir=str(tmp_path))
    spec["model"]["num_select"] = 4
    spec["dataset"]["infer_data_sources"] = {"image_dir": [str(images)], "captions": ["Red Circle", "blue square"]}
    spec["inference"] = {"checkpoint": str(trained["checkpoint"]), "conf_threshold": 0.0, "outline_width": 2,
                         "color_map": {"red circle": "#00ff00"}, "batch_size": 2}
    assert run_action("inference", config(spec)) == 0
    out = tmp_path / "inference"
    assert read_status(out / "status.json")[-1]["status"] == "SUCCESS"

    records = json.loads((out / "results.json").read_text())
    assert len(records) == 3 * 4
    gt = COCO({"images": [{"id": i, "file_name": p.name, "height": 128, "width": 128}
                          for i, p in enumerate(sorted(images.iterdir()))],
               "annotations": [], "categories": [{"id": 0, "name": "red circle"}, {"id": 1, "name": "blue square"}]})
    loaded = gt.loadRes(records)
    assert len(loaded.getAnnIds()) == 12
    for record in records:
        assert record["category_name"] == ["red circle", "blue square"][record["category_id"]]
        assert record["file_name"] == sorted(p.name for p in images.iterdir())[record["image_id"]]

    from grounding_dino.draw import stable_color

    colors = {"red circle": (0, 255, 0), "blue square": stable_color("blue square")}
    for image_id, source in enumerate(sorted(images.iterdir())):
        lines = (out / "labels" / f"{source.stem}.txt").read_text().splitlines()
        mine = [r for r in records if r["image_id"] == image_id]
        assert len(lines) == len(mine) == 4
        for line, record in zip(lines, mine):
            fields = line.split(" ")
            assert len(fields) == 16 and fields[0] == record["category_name"].replace(" ", "_")
            numbers = [float(f) for f in fields[1:]]
            x, y, w, h = record["bbox"]
            assert numbers[3:7] == pytest.approx([x, y, x + w, y + h], abs=0.006)
            assert numbers[14] == pytest.approx(record["score"], abs=6e-5)
        # The best detection is drawn last, so its whole outline shows its phrase's color.
        best = max(mine, key=lambda r: r["score"])
        x1, y1 = round(best["bbox"][0]), round(best["bbox"][1])
        x2, y2 = round(best["bbox"][0] + best["bbox"][2]), round(best["bbox"][1] + best["bbox"][3])
        assert x2 - x1 >= 4 and y2 - y1 >= 4, "the best box is too small to check its outline"
        drawn = Image.open(out / "images_annotated" / source.name).convert("RGB")
        outline = [(x, y) for x in range(x1, x2) for y in (y1, y2 - 1)] + \
                  [(x, y) for y in range(y1, y2) for x in (x1, x2 - 1)]
        assert {drawn.getpixel(p) for p in outline} == {colors[best["category_name"]]}
        inside = (x1 + 2 + (x2 - x1 - 4) // 2, y1 + 2 + (y2 - y1 - 4) // 2)  # past the 2 px outline
        assert drawn.getpixel(inside) == Image.open(source).convert("RGB").getpixel(inside)


@pytest.mark.slow
def test_images_without_detections_get_empty_labels_and_a_copy(trained, tmp_path):
    from PIL import Image, ImageChops

    from grounding_dino.actions import run_action

    images = _png_folder(trained["paths"], tmp_path / "images", 2)
    spec = dict(copy.deepcopy(trained["spec"]), results_dir=str(tmp_path))
    spec["dataset"]["infer_data_sources"] = {"image_dir": [str(images)], "captions": ["red circle"]}
    spec["inference"] = {"checkpoint": str(trained["checkpoint"]), "conf_threshold": 1.0}
    assert run_action("inference", config(spec)) == 0
    out = tmp_path / "inference"
    assert json.loads((out / "results.json").read_text()) == []
    for source in images.iterdir():
        assert (out / "labels" / f"{source.stem}.txt").read_text() == ""
        copy_ = Image.open(out / "images_annotated" / source.name).convert("RGB")
        assert ImageChops.difference(copy_, Image.open(source).convert("RGB")).getbbox() is None


def test_image_listing_and_output_names(tmp_path):
    from grounding_dino.actions.inference import list_images

    for folder in ("one", "two/sub"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("one/a.jpg", "one/b.PNG", "one/notes.txt", "two/a.png", "two/sub/c.jpeg"):
        (tmp_path / name).write_bytes(b"")
    flat = list_images([str(tmp_path / "one")], keep_structure=False)
    assert [(p.name, str(o)) for p, o in flat] == [("a.jpg", "a.jpg"), ("b.PNG", "b.PNG")]
    with pytest.raises(ValueError, match=r"a.jpg and .*a.png would both write outputs named a\.\*; set "
                                         "inference.is_internal true"):
        list_images([str(tmp_path / "one"), str(tmp_path / "two")], keep_structure=False)
    kept = list_images([str(tmp_path / "one"), str(tmp_path / "two")], keep_structure=True)
    assert [str(o) for _, o in kept] == ["one/a.jpg", "one/b.PNG", "two/a.png", "two/sub/c.jpeg"]
    with pytest.raises(ValueError, match=r"image_dir\[0\]: .* is not a folder"):
        list_images([str(tmp_path / "missing")], keep_structure=False)


def test_kitti_line_and_phrase_colors():
    from grounding_dino.draw import phrase_colors, stable_color
    from grounding_dino.actions.inference import kitti_line

    line = kitti_line("red  sports car", [1, 2.5, 30.125, 40], 0.87654)
    assert line == "red_sports_car 0.00 0 0.00 1.00 2.50 30.12 40.00 0.00 0.00 0.00 0.00 0.00 0.00 0.00 0.8765"
    assert stable_color("dog") == stable_color("dog") != stable_color("cat")
    colors = phrase_colors(["dog", "cat"], {"Dog": "red"})
    assert colors == {"dog": (255, 0, 0), "cat": stable_color("cat")}
    with pytest.raises(ValueError, match=r"inference.color_map\['cat'\]: 'reddish' is not a color"):
        phrase_colors(["cat"], {"cat": "reddish"})


# ------------------------------------------------------------------------------------------------ predictors
def test_pad_text_matches_padding_by_the_tokenizer(tiny_train_spec):
    import torch

    from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder
    from grounding_dino.predictor import pad_text

    tokenizer = CaptionTokenizer(resolve_text_encoder(tiny_train_spec["model"]["text_encoder_type"]), 256)
    captions = ["red circle . blue square .", "a dog ."]
    padded = pad_text(tokenizer(captions), 256)
    full = tokenizer(captions, pad_to_max=True)
    assert set(padded) == set(full)
    for key in full:
        assert torch.equal(padded[key], full[key]), key


def test_backend_registry_by_extension(tiny_train_spec, tmp_path):
    from grounding_dino import predictor

    assert [predictor.backend_for(f"m{ext}") for ext in (".pth", ".ckpt", ".onnx", ".engine")] == \
        ["torch", "torch", "onnx", "tensorrt"]
    cfg = config(make_spec(tiny_train_spec, tmp_path))
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"")
    if "tensorrt" not in predictor._BACKENDS:
        with pytest.raises(ValueError, match="no predictor backend 'tensorrt' is registered"):
            predictor.load_predictor(engine, cfg)
    with pytest.raises(FileNotFoundError, match="inference: model file .*nope.onnx does not exist"):
        predictor.load_predictor(tmp_path / "nope.onnx", cfg, "inference")
    cfg.inference.checkpoint = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="inference.checkpoint: .*nope.pth does not exist"):
        predictor.model_path(cfg, "inference")
    cfg.inference.trt_engine = str(engine)
    with pytest.raises(ValueError, match="set exactly one of inference.checkpoint .* and inference.trt_engine"):
        predictor.model_path(cfg, "inference")
    cfg.inference.checkpoint = None
    assert predictor.model_path(cfg, "inference") == str(engine)
    with pytest.raises(ValueError, match="must look like 'package.module:Class'"):
        predictor.register_backend("x", "no_colon")


def _order_sensitive_images(predictor, cfg, size) -> set:
    """Inference image indices whose PyTorch detections change when the input moves by 1e-5.

    The decoder's content queries are indexed by rank (model.embed_init_tgt), so two encoder proposals whose scores
    differ by about 1e-6, common in a model trained two steps, trade content queries and their detections when the
    rounding changes, between two backends just as between two PyTorch runs. Such images cannot be compared."""
    import torch

    from grounding_dino.actions.inference import infer_loader, infer_phrases
    from grounding_dino.predictor import split_prompt

    _, loader = infer_loader(cfg, size)
    chunks = split_prompt(infer_phrases(cfg), predictor.tokenizer)
    sensitive = set()
    for batch, pixel_mask, targets in loader:
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        clean = predictor.detect(batch, pixel_mask, orig_sizes, chunks, cfg.model.num_select)
        for seed in (1, 2):
            noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(seed)) * 1e-5
            noisy = predictor.detect(batch + noise, pixel_mask, orig_sizes, chunks, cfg.model.num_select)
            for target, a, b in zip(targets, clean, noisy):
                same = torch.allclose(a["scores"], b["scores"], atol=1e-4) and torch.allclose(a["boxes"], b["boxes"],
                                                                                             atol=1e-2)
                if not same:
                    sensitive.add(target["index"])
    return sensitive


@pytest.mark.slow
def test_onnx_model_gives_the_pytorch_results(trained, tmp_path):
    """The same checkpoint exported to ONNX: evaluate and inference on ONNX Runtime match the PyTorch path run at
    the export's fixed input size."""
    import torch

    from grounding_dino.actions import export, run_action
    from grounding_dino.predictor import OnnxPredictor, load_predictor

    width, height = 160, 128
    spec = dict(copy.deepcopy(trained["spec"]), results_dir=str(tmp_path))
    spec["model"]["num_select"] = 20
    spec["dataset"]["infer_data_sources"] = {"image_dir": [trained["paths"]["val_image_dir"]],
                                             "captions": ["red circle", "green square", "blue circle"]}
    torch_model = load_predictor(str(trained["checkpoint"]), config(spec))
    onnx_file = export.export_onnx(torch_model.model, tmp_path / "model.onnx",
                                   export.sample_inputs(torch_model.model, config(spec), width, height, 2),
                                   dynamic_batch=True)
    onnx_model = load_predictor(onnx_file, config(spec))
    assert isinstance(onnx_model, OnnxPredictor) and onnx_model.input_size == (width, height)

    # predictor level: the same images and text, three at a time (the export traced two)
    images = torch.randn(3, 3, height, width)
    text = torch_model.tokenizer(["red circle . blue square .", "green circle .", "blue square ."])
    expected, got = torch_model.predict(images, None, text), onnx_model.predict(images, None, text)
    finite = torch.isfinite(expected[0])
    assert torch.equal(finite, torch.isfinite(got[0]))
    assert (expected[0][finite] - got[0][finite]).abs().max() < 1e-3
    assert (expected[1] - got[1]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="takes 160x128 images, got 128x128"):
        onnx_model.predict(torch.randn(1, 3, 128, 128), None, text)

    fixed = {"input_width": width, "input_height": height}
    runs = {"torch": (str(trained["checkpoint"]), fixed), "onnx": (str(onnx_file), {})}
    outputs = {}
    for name, (model, size) in runs.items():
        spec["evaluate"] = {"checkpoint": model, "results_dir": str(tmp_path / name / "evaluate"), **size}
        spec["inference"] = {"checkpoint": model, "results_dir": str(tmp_path / name / "inference"),
                             "conf_threshold": 0.0, **size}
        cfg = config(spec)
        assert run_action("evaluate", cfg) == 0 and run_action("inference", cfg) == 0
        outputs[name] = (json.loads((tmp_path / name / "evaluate" / "results.json").read_text()),
                         json.loads((tmp_path / name / "inference" / "results.json").read_text()))
    (torch_metrics, torch_detections), (onnx_metrics, onnx_detections) = outputs["torch"], outputs["onnx"]
    assert onnx_metrics.pop("null_reasons", None) == torch_metrics.pop("null_reasons", None)
    assert onnx_metrics == pytest.approx(torch_metrics, abs=1e-6)
    assert len(onnx_detections) == len(torch_detections) == 8 * 20
    # Each PyTorch detection has an ONNX twin (near-equal scores may be listed in another order), on every image
    # where PyTorch agrees with itself under rounding-level noise (see _order_sensitive_images).
    sensitive = _order_sensitive_images(torch_model, config(spec), (width, height))
    assert len(sensitive) <= 4, f"images {sorted(sensitive)} of 8 are order-sensitive: too few left to compare"
    unmatched = [b for b in onnx_detections if b["image_id"] not in sensitive]
    for a in (a for a in torch_detections if a["image_id"] not in sensitive):
        twin = min((b for b in unmatched if (b["image_id"], b["category_id"]) == (a["image_id"], a["category_id"])),
                   key=lambda b: max(abs(u - v) for u, v in zip(a["bbox"], b["bbox"])))
        assert twin["bbox"] == pytest.approx(a["bbox"], abs=1e-2) and twin["score"] == pytest.approx(a["score"],
                                                                                                       abs=1e-4)
        unmatched.remove(twin)
