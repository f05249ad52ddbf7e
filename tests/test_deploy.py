"""TensorRT deploy: fail fast without TensorRT or a GPU, INT8 refused with the reason, engine profiles, templates."""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from grounding_dino.actions import run_action
from grounding_dino.config import TensorRTConfig, load_experiment
from grounding_dino.deploy.builder import engine_profile, has_qdq, onnx_inputs
from grounding_dino.errors import UserError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are available here")
ROOT = Path(__file__).resolve().parents[1]
TEXT = 256


def contract_onnx(path: Path, batch, height=128, width=160, queries=100) -> Path:
    """A graph with the export contract's inputs and outputs (the body is irrelevant to the builder checks)."""
    b = batch
    inputs = [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, [b, 3, height, width])]
    for name, dtype in (("input_ids", TensorProto.INT64), ("attention_mask", TensorProto.BOOL),
                        ("position_ids", TensorProto.INT64), ("token_type_ids", TensorProto.INT64)):
        inputs.append(helper.make_tensor_value_info(name, dtype, [b, TEXT]))
    inputs.append(helper.make_tensor_value_info("text_token_mask", TensorProto.BOOL, [b, TEXT, TEXT]))
    outputs = [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [b, queries, TEXT]),
               helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, [b, queries, 4])]
    nodes = [helper.make_node("Identity", ["inputs"], ["pred_logits"]),
             helper.make_node("Identity", ["inputs"], ["pred_boxes"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "contract", inputs, outputs)), str(path))
    return path


def _spec(tmp_path, **gen):
    onnx_file = str(contract_onnx(tmp_path / "m.onnx", "batch"))
    return {"results_dir": str(tmp_path),
            "gen_trt_engine": {"onnx_file": onnx_file, "input_width": 160, "input_height": 128, **gen}}


@needs_no_trt
def test_gen_trt_engine_fails_fast_in_one_line(tmp_path):
    with pytest.raises(UserError) as info:
        run_action("gen_trt_engine", load_experiment(_spec(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and ("TensorRT is not installed" in message or "GPU" in message)
    assert not (tmp_path / "gen_trt_engine").exists()  # refused before the results folder exists


def test_int8_is_refused_with_the_reason(tmp_path):
    spec = _spec(tmp_path, tensorrt={"data_type": "INT8"})
    with pytest.raises(UserError, match="INT8 quantize the model .*QDQ ONNX"):
        run_action("gen_trt_engine", load_experiment(spec))


@needs_no_trt
@pytest.mark.parametrize("action", ["evaluate", "inference"])
def test_engine_evaluate_and_inference_fail_fast_in_one_line(tmp_path, tiny_data, action):
    from grounding_dino.actions import run_action

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine: the check must come first")
    spec = {"results_dir": str(tmp_path), **tiny_data["spec"], action: {"trt_engine": str(engine)}}
    if action == "inference":
        spec["dataset"]["infer_data_sources"] = {"image_dir": [str(tiny_data["root"] / "images")],
                                                 "captions": ["cat"]}
    with pytest.raises(UserError) as info:
        run_action(action, load_experiment(spec))
    assert "\n" not in str(info.value) and f"{action}.trt_engine" in str(info.value)


def test_dynamic_profile_spans_the_batch_range_only(tmp_path):
    inputs = onnx_inputs(contract_onnx(tmp_path / "m.onnx", "batch"))
    options = TensorRTConfig(min_batch_size=1, opt_batch_size=2, max_batch_size=4)
    profile = engine_profile(inputs, options, max_text_len=TEXT, width=160, height=128)
    assert profile.dynamic
    assert profile.shapes["inputs"] == ((1, 3, 128, 160), (2, 3, 128, 160), (4, 3, 128, 160))
    assert profile.shapes["text_token_mask"] == ((1, TEXT, TEXT), (2, TEXT, TEXT), (4, TEXT, TEXT))
    assert profile.shapes["input_ids"][2] == (4, TEXT)


def test_a_fixed_vocabulary_graph_gets_a_profile_for_its_image_alone():
    """export.fixed_captions graphs take only `inputs`; any text length is fine (the text is inside)."""
    inputs = {"inputs": ("batch", 3, 128, 160)}
    options = TensorRTConfig(min_batch_size=1, opt_batch_size=2, max_batch_size=4)
    profile = engine_profile(inputs, options, max_text_len=TEXT + 1, width=160, height=128)
    assert profile.shapes == {"inputs": ((1, 3, 128, 160), (2, 3, 128, 160), (4, 3, 128, 160))}
    with pytest.raises(ValueError, match="not the export contract's"):
        engine_profile({"inputs": ("batch", 3, 128, 160), "other": ("batch", 4)}, options, max_text_len=TEXT,
                       width=160, height=128)


def test_fixed_batch_onnx_gets_its_own_shapes(tmp_path):
    inputs = onnx_inputs(contract_onnx(tmp_path / "m.onnx", 2))
    profile = engine_profile(inputs, TensorRTConfig(), max_text_len=TEXT, width=160, height=128)
    assert not profile.dynamic and profile.shapes["inputs"] == ((2, 3, 128, 160),) * 3
    assert not has_qdq(tmp_path / "m.onnx")


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 960, "height": 544}, "gen_trt_engine.input_width/input_height 960x544 differ from the ONNX's 160x128"),
    ({"max_text_len": 128}, "model.max_text_len 128 differs from the ONNX's text length 256"),
    ({"options": TensorRTConfig(min_batch_size=4, opt_batch_size=2)}, "min_batch_size <= opt_batch_size"),
])
def test_profile_errors_name_the_key(tmp_path, kwargs, message):
    inputs = onnx_inputs(contract_onnx(tmp_path / "m.onnx", "batch"))
    args = {"options": TensorRTConfig(), "max_text_len": TEXT, "width": 160, "height": 128, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine_profile(inputs, args.pop("options"), **args)


def test_deploy_templates_carry_the_keys_the_engine_path_reads():
    folder = ROOT / "references" / "grounding_dino"
    gen = yaml.safe_load((folder / "spec_template_deploy_gen_trt_engine.yaml").read_text())
    assert set(gen["gen_trt_engine"]) >= {"onnx_file", "trt_engine", "timing_cache", "gpu_id", "input_width",
                                          "input_height", "verbose", "tensorrt"}
    assert set(gen["gen_trt_engine"]["tensorrt"]) == {"data_type", "workspace_size", "min_batch_size",
                                                      "opt_batch_size", "max_batch_size", "layers_precision"}
    assert "max_text_len" in gen["model"]
    for action in ("evaluate", "inference"):
        spec = yaml.safe_load((folder / f"spec_template_deploy_{action}.yaml").read_text())
        assert "trt_engine" in spec[action]
        assert {"text_encoder_type", "max_text_len", "num_select"} <= set(spec["model"])
