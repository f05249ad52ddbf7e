"""Quantize: onnxruntime INT8 (static, calibrated with real captions; dynamic), mAP50 next to float, clear errors."""
import copy
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import onnxruntime
import pytest
import torch

from grounding_dino.config import load_experiment
from grounding_dino.actions.export import export_model
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import native_checkpoint
from grounding_dino.actions import run_action
from grounding_dino.actions.quantize import MissingBackendError, calibration_feeds
from grounding_dino.status import read_status

WIDTH, HEIGHT = 160, 128


@pytest.fixture(scope="module")
def setup(tiny_train_spec, tmp_path_factory):
    """The tiny model as a checkpoint and as an exported ONNX, and a spec calibrating and validating on COCO."""
    root = tmp_path_factory.mktemp("quantize")
    spec = copy.deepcopy(tiny_train_spec)
    paths = spec.pop("_paths")
    spec["dataset"]["quant_calibration_data_sources"] = {"image_dir": paths["val_image_dir"],
                                                         "json_file": paths["val_json_file"]}
    spec["export"] = {"input_width": WIDTH, "input_height": HEIGHT}
    spec["quantize"] = {"num_calibration_batches": 2}
    torch.manual_seed(0)
    cfg = load_experiment(spec)
    model = build_model(cfg.model).eval()
    torch.save(native_checkpoint(model), root / "model.pth")
    onnx_path, _ = export_model(model, cfg, root / "model.onnx")
    return {"spec": spec, "root": root, "onnx": onnx_path, "model": model}


def _run(setup, tmp_path, **quantize):
    spec = copy.deepcopy(setup["spec"])
    spec["results_dir"] = str(tmp_path)
    spec["quantize"].update(quantize)
    assert run_action("quantize", load_experiment(spec)) == 0
    return tmp_path / "quantize"


def test_calibration_batches_carry_the_real_captions(setup):
    cfg = load_experiment(setup["spec"])
    tokenizer = setup["model"].tokenizer
    feeds = list(calibration_feeds(cfg, tokenizer, (WIDTH, HEIGHT), batch_size=4, limit=5))
    assert len(feeds) == 2  # 8 images, batch 4
    names = [c["name"] for c in json.loads(open(cfg.dataset.quant_calibration_data_sources.json_file).read())
             ["categories"]]
    feed = feeds[0]
    assert feed["inputs"].shape == (4, 3, HEIGHT, WIDTH)
    expected = tokenizer([" . ".join(names) + " ."], pad_to_max=True)
    for key in ("input_ids", "attention_mask", "position_ids", "text_token_mask"):
        assert torch.equal(feed[key], expected[key].expand_as(feed[key])), key
    assert feed["text_token_mask"].shape == (4, 256, 256) and feed["attention_mask"].sum(1).min() > len(names)


def test_static_int8_from_onnx_reports_both_map50(setup, tmp_path):
    out = _run(setup, tmp_path, model_path=str(setup["onnx"]), mode="static_ptq", algorithm="minmax")
    quantized = out / "quantized_model.onnx"
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    results = json.loads((out / "results.json").read_text())
    for kind in ("float", "quantized"):
        assert 0.0 <= results[kind]["mAP50"] <= 1.0
    kpi = read_status(out / "status.json")[-1]["kpi"]
    assert kpi["float_mAP50"] == results["float"]["mAP50"] and kpi["quantized_mAP50"] == results["quantized"]["mAP50"]
    # The quantized graph runs on the contract inputs (query order may differ from float: selection is a top-k).
    cfg = load_experiment(setup["spec"])
    feed = next(calibration_feeds(cfg, setup["model"].tokenizer, (WIDTH, HEIGHT), batch_size=1, limit=1))
    feed = {k: v.numpy() for k, v in feed.items() if k != "pixel_mask"}
    q_boxes = onnxruntime.InferenceSession(str(quantized)).run(["pred_boxes"], feed)[0]
    f_boxes = onnxruntime.InferenceSession(str(setup["onnx"])).run(["pred_boxes"], feed)[0]
    assert q_boxes.shape == f_boxes.shape and ((q_boxes >= 0) & (q_boxes <= 1)).all()


def test_a_fixed_vocabulary_model_quantizes_and_evaluates_on_its_phrases(setup, tmp_path):
    """export.fixed_captions graphs take the image alone: calibration feeds only images, the INT8 graph keeps the
    phrases, and evaluate runs both on the set whose categories are those phrases."""
    from grounding_dino.actions.export import export_fixed_vocabulary
    from grounding_dino.predictor import FIXED_VOCABULARY

    spec = copy.deepcopy(setup["spec"])
    categories = json.loads(open(spec["dataset"]["quant_calibration_data_sources"]["json_file"]).read())["categories"]
    spec["export"]["fixed_captions"] = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    fixed, check = export_fixed_vocabulary(setup["model"], load_experiment(spec), tmp_path / "fixed.onnx")
    assert check.max_abs_diff_logits <= 1e-4
    out = _run(setup, tmp_path, model_path=str(fixed), mode="static_ptq", algorithm="minmax")
    quantized = onnx.load(str(out / "quantized_model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.graph.node}
    assert [i.name for i in quantized.graph.input] == ["inputs"]
    assert FIXED_VOCABULARY in {entry.key for entry in quantized.metadata_props}
    results = json.loads((out / "results.json").read_text())
    # the same model with its text baked in: the float scores equal the full graph's on the same set
    from grounding_dino.actions.evaluate import evaluate
    from grounding_dino.actions.quantize import _val_config
    from grounding_dino.predictor import OnnxPredictor

    cfg = _val_config(load_experiment(setup["spec"]))
    full = evaluate(cfg, OnnxPredictor.load(str(setup["onnx"]), cfg, "quantize"))
    assert results["float"]["mAP50"] == pytest.approx(full["mAP50"], abs=1e-6)
    assert 0.0 <= results["quantized"]["mAP50"] <= 1.0


def test_dynamic_int8_from_checkpoint_exports_first(setup, tmp_path):
    out = _run(setup, tmp_path, model_path=str(setup["root"] / "model.pth"), mode="dynamic_ptq")
    assert (out / "model.onnx").is_file()  # the checkpoint was exported with the export section's settings
    ops = {node.op_type for node in onnx.load(str(out / "quantized_model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"float", "quantized"} and 0.0 <= results["quantized"]["mAP50"] <= 1.0


def test_skip_names_must_match_nodes(setup, tmp_path):
    with pytest.raises(ValueError, match="quantize.skip_names: 'no_such_node' matches no node"):
        _run(setup, tmp_path, model_path=str(setup["onnx"]), mode="dynamic_ptq", skip_names=["no_such_node"],
             evaluate=False)


def test_unsupported_mode_names_the_key(setup, tmp_path):
    with pytest.raises(ValueError, match="quantize.mode 'weight_only_ptq' is not supported by quantize.backend "
                                         "'onnxruntime'"):
        _run(setup, tmp_path, model_path=str(setup["onnx"]), mode="weight_only_ptq")
    assert read_status(tmp_path / "quantize" / "status.json")[-1]["status"] == "FAILURE"


@pytest.mark.parametrize("backend, mode, package", [("torchao", "weight_only_ptq", "torchao"),
                                                    ("modelopt.pytorch", "static_ptq", "modelopt"),
                                                    ("modelopt.onnx", "static_ptq", "modelopt")])
def test_missing_optional_backend_is_one_line(setup, tmp_path, backend, mode, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    algorithm = "minmax" if backend == "torchao" else "max"
    with pytest.raises(MissingBackendError) as info:
        _run(setup, tmp_path, backend=backend, mode=mode, algorithm=algorithm,
             model_path=str(setup["root"] / ("model.onnx" if backend == "modelopt.onnx" else "model.pth")))
    message = str(info.value)
    assert "\n" not in message and f"quantize.backend '{backend}'" in message
    assert "pip install 'grounding-dino-skillbank[quantize]'" in message
