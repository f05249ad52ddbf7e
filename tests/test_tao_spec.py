"""NVIDIA TAO spec files load as they are: every key of TAO's ExperimentConfig, TAO's enum spellings, and the TAO
keys with real effects here (export.serialize_nvdsinfer, gen_trt_engine.tensorrt.layers_precision,
quantize.backend_kwargs, model_name null)."""
from __future__ import annotations

import configparser
import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from grounding_dino import config as gd_config
from grounding_dino.actions import warn_no_effect
from grounding_dino.config import ACTIONS, load_experiment
from sdk.errors import SpecError
from sdk.spec import load_spec, resolve_spec, validate

TAO_SPEC = Path(__file__).parent / "data" / "tao_grounding_dino_default_spec.yaml"


def tao_spec(tmp_path: Path) -> dict:
    """The TAO default spec with its '???' and empty paths filled, as a user would."""
    spec = load_spec(TAO_SPEC)
    spec["results_dir"] = str(tmp_path / "results")
    data = {"image_dir": str(tmp_path / "images"), "json_file": str(tmp_path / "coco.json")}
    spec["dataset"].update(
        train_data_sources=[{"image_dir": str(tmp_path / "images"), "json_file": str(tmp_path / "odvg.jsonl"),
                             "label_map": str(tmp_path / "labelmap.json")}],
        val_data_sources=dict(data), test_data_sources=dict(data), quant_calibration_data_sources=dict(data),
        infer_data_sources={"image_dir": [str(tmp_path / "images")], "captions": ["person"]},
    )
    for section, key in (("evaluate", "checkpoint"), ("inference", "checkpoint"), ("export", "checkpoint"),
                         ("quantize", "model_path")):
        spec[section][key] = str(tmp_path / "model.pth")
    spec["export"]["onnx_file"] = spec["gen_trt_engine"]["onnx_file"] = str(tmp_path / "model.onnx")
    spec["gen_trt_engine"]["trt_engine"] = str(tmp_path / "model.engine")
    return spec


# ---------------------------------------------------------------------------------------------------------------
# every TAO key


def test_fixture_holds_tao_placeholders_until_filled():
    with pytest.raises(SpecError) as err:
        validate(resolve_spec("export", TAO_SPEC), "export")
    assert {"export.checkpoint", "export.onnx_file"} <= {issue.path for issue in err.value.issues}
    assert all("unknown key" not in issue.message for issue in err.value.issues)


@pytest.mark.parametrize("action", ACTIONS)
def test_tao_default_spec_validates_for_every_action(action, tmp_path):
    spec = resolve_spec(action, tao_spec(tmp_path))
    validate(spec, action)
    cfg = load_experiment(spec)
    assert cfg.model_name == "grounding_dino"
    assert cfg.wandb.group == "" and cfg.model.pre_norm is False and cfg.export.serialize_nvdsinfer is False
    assert cfg.gen_trt_engine.tensorrt.layers_precision == [] and cfg.quantize.backend_kwargs == {}


def test_tao_nulls_for_lists_and_mappings_mean_their_defaults(tmp_path):
    spec = resolve_spec("inference", TAO_SPEC)
    assert spec["inference"]["color_map"] == {}
    assert spec["dataset"]["train_data_sources"] == []
    assert spec["dataset"]["eval_class_ids"] is None  # Optional: null stays null


def test_tao_defaults_raise_no_no_effect_warning(tmp_path, capsys):
    cfg = load_experiment(resolve_spec("train", tao_spec(tmp_path)))
    for action in ACTIONS:
        warn_no_effect(action, cfg)
    assert capsys.readouterr().err == ""


def test_a_no_effect_key_set_warns_once_in_the_actions_that_read_its_section(tmp_path, capsys):
    spec = tao_spec(tmp_path)
    spec["model"]["pre_norm"] = True
    spec["train"]["optim"]["momentum"] = 0.8
    cfg = load_experiment(resolve_spec("train", spec))
    warn_no_effect("train", cfg)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("WARNING: model.pre_norm: True has no effect")
    assert lines[1].startswith("WARNING: train.optim.momentum: 0.8 has no effect")
    warn_no_effect("export", cfg)  # export reads model, not train
    assert capsys.readouterr().err.splitlines() == lines[:1]


def test_no_effect_keys_are_marked_in_the_schema():
    schema = json.loads((Path(__file__).parents[1] / "schemas/grounding_dino/train.schema.json").read_text())
    pre_norm = schema["properties"]["model"]["properties"]["pre_norm"]
    assert pre_norm["x-no-effect"] is True and "no effect" in pre_norm["description"]
    assert "x-no-effect" not in schema["properties"]["model"]["properties"]["backbone"]


@pytest.mark.parametrize("value", [None, ""])
def test_model_name_null_or_empty_means_grounding_dino(value, tmp_path):
    spec = resolve_spec("export", {**tao_spec(tmp_path), "model_name": value})
    validate(spec, "export")
    assert spec["model_name"] == "grounding_dino"


def test_another_model_name_is_refused(tmp_path):
    with pytest.raises(SpecError) as err:
        validate(resolve_spec("export", {**tao_spec(tmp_path), "model_name": "dino"}), "export")
    assert [(i.path, i.value) for i in err.value.issues] == [("model_name", "dino")]


# ---------------------------------------------------------------------------------------------------------------
# enum spellings


@pytest.mark.parametrize("key, given, canonical", [
    ("gen_trt_engine.tensorrt.data_type", "fp32", "FP32"),
    ("gen_trt_engine.tensorrt.data_type", "fp16", "FP16"),
    ("gen_trt_engine.tensorrt.data_type", "Fp16", "FP16"),
    ("train.precision", "FP32", "fp32"),
    ("train.precision", "BF16", "bf16"),
    ("train.precision", "Fp16", "fp16"),
    ("train.distributed_strategy", "DDP", "ddp"),
    ("train.checkpoint_interval_unit", "Epoch", "epoch"),
    ("quantize.mode", "Static_PTQ", "static_ptq"),
    ("quantize.algorithm", "MINMAX", "minmax"),
    ("quantize.default_layer_dtype", "INT8", "int8"),
    ("train.optim.lr_scheduler", "multistep", "MultiStep"),
])
def test_enum_values_are_read_in_any_letter_case(key, given, canonical, tmp_path):
    action = key.split(".")[0] if key.split(".")[0] in ACTIONS else "train"
    spec = resolve_spec(action, tao_spec(tmp_path), {key: given})
    validate(spec, action)
    section, *path = key.split(".")
    node = spec[section]
    for name in path:
        node = node[name]
    assert node == canonical


def test_a_value_outside_the_options_is_still_refused(tmp_path):
    with pytest.raises(SpecError) as err:
        validate(resolve_spec("gen_trt_engine", tao_spec(tmp_path), ["gen_trt_engine.tensorrt.data_type=int8"]),
                 "gen_trt_engine")
    (issue,) = err.value.issues
    assert issue.path == "gen_trt_engine.tensorrt.data_type" and issue.value == "int8"
    assert "FP32" in issue.message


def test_runtime_and_schema_defaults_agree_on_the_spelling():
    schema = json.loads((Path(__file__).parents[1] / "schemas/grounding_dino/gen_trt_engine.schema.json").read_text())
    data_type = schema["properties"]["gen_trt_engine"]["properties"]["tensorrt"]["properties"]["data_type"]
    assert data_type["default"] == gd_config.TensorRTConfig().data_type == "FP32"
    assert data_type["x-case-insensitive"] is True
    assert schema["properties"]["model_name"]["default"] == gd_config.ExperimentConfig().model_name


def test_no_two_options_differ_only_by_letter_case():
    def options(cls):
        for f in gd_config.dataclasses.fields(cls):
            nested = gd_config._nested_type(cls, f)
            if nested is not None:
                yield from options(nested)
            elif f.metadata.get("options"):
                yield f.name, [o for o in f.metadata["options"] if isinstance(o, str)]

    for name, values in options(gd_config.ExperimentConfig):
        assert len({v.lower() for v in values}) == len(values), name


# ---------------------------------------------------------------------------------------------------------------
# gen_trt_engine.tensorrt.layers_precision


def test_layers_precision_parses_tao_format():
    assert gd_config.parse_layers_precision(["/a/MatMul:fp32", "name:with:colon:FP16", "*:int8"]) == {
        "/a/MatMul": "fp32", "name:with:colon": "fp16", "*": "int8"}


@pytest.mark.parametrize("entry, words", [
    ("no_precision", "layer_name:precision"),
    (":fp16", "layer_name:precision"),
    ("/a/MatMul:fp64", "'fp64' is not one of fp32, fp16, int32, int8"),
    (3, "expected a string"),
])
def test_bad_layers_precision_is_refused_at_validation(entry, words, tmp_path):
    spec = tao_spec(tmp_path)
    spec["gen_trt_engine"]["tensorrt"]["layers_precision"] = ["/ok:fp32", entry]
    with pytest.raises(SpecError) as err:
        validate(resolve_spec("gen_trt_engine", spec), "gen_trt_engine")
    (issue,) = err.value.issues
    assert issue.path == "gen_trt_engine.tensorrt.layers_precision[1]" and issue.value == entry
    assert words in issue.message


def test_layer_given_twice_is_refused():
    with pytest.raises(ValueError, match=r"layers_precision\[1\].*'/a' is given twice"):
        gd_config.parse_layers_precision(["/a:fp32", "/a:fp16"])


class FakeTensor:
    def __init__(self, dtype, shape_tensor=False):
        self.dtype, self.is_shape_tensor = dtype, shape_tensor


class FakeLayer:
    def __init__(self, name, trt, kind="MATMUL", precision=None, inputs=None, outputs=None):
        self.name, self.type = name, kind
        self.precision = precision if precision is not None else trt.float32
        self.inputs = inputs if inputs is not None else [FakeTensor(trt.float32)]
        self.outputs = outputs if outputs is not None else [FakeTensor(trt.float32)]
        self.output_types = {}

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, layers):
        self.layers = layers

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, i):
        return self.layers[i]


class FakeConfig:
    def __init__(self):
        self.flags = set()

    def set_flag(self, flag):
        self.flags.add(flag)


def fake_trt():
    """The few TensorRT names the layer-precision code reads."""
    return SimpleNamespace(float32="f32", float16="f16", int32="i32", int8="i8", bool="b",
                           LayerType=SimpleNamespace(CONSTANT="CONSTANT"),
                           BuilderFlag=SimpleNamespace(PREFER_PRECISION_CONSTRAINTS="PREFER"))


def test_builder_sets_named_layers_and_the_rest_but_integer_layers():
    from grounding_dino.deploy.builder import apply_layer_precisions

    trt = fake_trt()
    norm = FakeLayer("/decoder/norm", trt)
    matmul = FakeLayer("/decoder/MatMul", trt)
    constant = FakeLayer("/const", trt, kind="CONSTANT")
    shape = FakeLayer("/shape", trt, inputs=[FakeTensor(trt.int32, shape_tensor=True)])
    integer = FakeLayer("/gather_ids", trt, inputs=[FakeTensor(trt.int32)], outputs=[FakeTensor(trt.int32)])
    boolean = FakeLayer("/mask", trt, precision=trt.bool)
    config = FakeConfig()
    applied = apply_layer_precisions(trt, FakeNetwork([norm, matmul, constant, shape, integer, boolean]), config,
                                     {"/decoder/norm": "fp32", "*": "fp16"})
    assert applied == ["/decoder/norm", "/decoder/MatMul"]
    assert (norm.precision, norm.output_types) == (trt.float32, {0: trt.float32})
    assert (matmul.precision, matmul.output_types) == (trt.float16, {0: trt.float16})
    for untouched in (constant, shape, integer):
        assert untouched.precision == trt.float32 and untouched.output_types == {}
    assert boolean.precision == trt.bool
    assert config.flags == {"PREFER"}


def test_builder_names_a_layer_the_network_does_not_have():
    from grounding_dino.deploy.builder import apply_layer_precisions

    trt = fake_trt()
    with pytest.raises(ValueError, match=r"'/decoder/nrom'.*no layer of the network.*'/decoder/norm'"):
        apply_layer_precisions(trt, FakeNetwork([FakeLayer("/decoder/norm", trt)]), FakeConfig(),
                               {"/decoder/nrom": "fp32"})


def test_layers_precision_applies_to_fp16_engines_only(caplog):
    from grounding_dino.deploy.builder import layer_precisions_for

    fp16 = gd_config.TensorRTConfig(data_type="FP16", layers_precision=["/a:fp32"])
    assert layer_precisions_for(fp16, strongly_typed=False) == {"/a": "fp32"}
    with pytest.raises(ValueError, match="layers_precision cannot be applied: this network is strongly typed"):
        layer_precisions_for(fp16, strongly_typed=True)
    fp32 = gd_config.TensorRTConfig(data_type="FP32", layers_precision=["/a:fp16"])
    assert layer_precisions_for(fp32, strongly_typed=False) == {}
    assert "no effect on an FP32 engine" in caplog.text
    assert layer_precisions_for(gd_config.TensorRTConfig(), strongly_typed=True) == {}


# ---------------------------------------------------------------------------------------------------------------
# quantize.backend_kwargs (onnxruntime)


def _matmul_model(path: Path) -> Path:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.linspace(-1, 1, 32).astype(np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _activation_zero_point(path: Path):
    model = onnx.load(str(path))
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    zero = next(t for t in model.graph.initializer if t.name == quantize.input[2])
    return onnx.numpy_helper.to_array(zero)


def _feeds():
    rng = np.random.default_rng(0)
    return iter([{"x": rng.uniform(0.0, 4.0, (2, 8)).astype(np.float32)} for _ in range(4)])


def test_backend_kwargs_reach_onnxruntime_and_change_the_result(tmp_path):
    from grounding_dino.actions.quantize import static_int8

    source = _matmul_model(tmp_path / "m.onnx")
    symmetric = static_int8(source, tmp_path / "sym.onnx", _feeds())
    assert _activation_zero_point(symmetric) == 0  # ours: symmetric activations
    asymmetric = static_int8(source, tmp_path / "asym.onnx", _feeds(),
                             backend_kwargs={"extra_options": {"ActivationSymmetric": False}})
    assert _activation_zero_point(asymmetric) == -128  # inputs are all >= 0: the range starts at the lowest int8
    unsigned = static_int8(source, tmp_path / "u8.onnx", _feeds(),
                           backend_kwargs={"activation_type": "QUInt8",
                                           "extra_options": {"ActivationSymmetric": False}})
    assert _activation_zero_point(unsigned).dtype == np.uint8


@pytest.mark.parametrize("kwargs, words", [
    ({"per_chanel": False}, r"quantize.backend_kwargs.per_chanel: not a keyword of .*quantize_static.*per_channel"),
    ({"activation_type": "QInt4x"}, r"quantize.backend_kwargs.activation_type: 'QInt4x' is not one of .*QInt8"),
    ({"model_input": "other.onnx"}, r"quantize.backend_kwargs.model_input: not a keyword"),
])
def test_bad_backend_kwargs_name_the_key(kwargs, words, tmp_path):
    from grounding_dino.actions.quantize import static_int8

    with pytest.raises(ValueError, match=words):
        static_int8(_matmul_model(tmp_path / "m.onnx"), tmp_path / "q.onnx", _feeds(), backend_kwargs=kwargs)


def test_backend_kwargs_reach_dynamic_quantization(tmp_path):
    from grounding_dino.actions.quantize import dynamic_int8

    source = _matmul_model(tmp_path / "m.onnx")
    plain = onnx.load(str(dynamic_int8(source, tmp_path / "d.onnx")))
    skipped = onnx.load(str(dynamic_int8(source, tmp_path / "s.onnx",
                                         backend_kwargs={"op_types_to_quantize": ["Conv"]})))
    assert any(n.op_type == "MatMulInteger" for n in plain.graph.node)
    assert [n.op_type for n in skipped.graph.node] == ["MatMul"]


# ---------------------------------------------------------------------------------------------------------------
# export.serialize_nvdsinfer


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(comment_prefixes=("#",))
    parser.read(path)
    return parser


def test_deepstream_configs_match_the_model_input_and_normalisation(tmp_path):
    from grounding_dino.actions.export import write_deepstream_configs

    cfg = load_experiment({"export": {"input_width": 640, "input_height": 384, "batch_size": 2}})
    nvinfer, preprocess = write_deepstream_configs(cfg, tmp_path / "gdino.onnx")
    assert (nvinfer.name, preprocess.name) == ("nvinfer_config.txt", "nvdspreprocess_config.txt")
    prop = _ini(nvinfer)["property"]
    assert prop["onnx-file"] == "gdino.onnx"
    assert prop["infer-dims"] == "3;384;640" and prop["batch-size"] == "2"
    assert prop["output-blob-names"] == "pred_logits;pred_boxes"
    assert (prop["network-type"], prop["cluster-mode"], prop["output-tensor-meta"]) == ("100", "4", "1")
    assert (prop["model-color-format"], prop["network-input-order"]) == ("0", "0")
    scale = float(prop["net-scale-factor"])
    offsets = [float(v) for v in prop["offsets"].split(";")]
    assert offsets == pytest.approx([123.675, 116.28, 103.53])
    # DeepStream's scale * (pixel - offset) against the model's (pixel / 255 - mean) / std, per channel
    pixel = np.array([0.0, 128.0, 255.0])
    for mean, std, offset in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), offsets):
        assert scale * (pixel - offset) == pytest.approx((pixel / 255 - mean) / std, rel=0.015, abs=0.03)
    attrs = _ini(nvinfer)["class-attrs-all"]
    assert float(attrs["pre-cluster-threshold"]) == cfg.inference.conf_threshold
    pre = _ini(preprocess)
    assert pre["property"]["tensor-name"] == "inputs"
    assert pre["property"]["network-input-shape"] == "2;3;384;640"
    assert (pre["property"]["processing-width"], pre["property"]["processing-height"]) == ("640", "384")
    assert float(pre["user-configs"]["pixel-normalization-factor"]) == scale


@pytest.mark.slow
def test_export_action_writes_the_deepstream_configs_beside_the_onnx(tmp_path):
    import torch

    from grounding_dino.actions import run_action
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import native_checkpoint
    from grounding_dino.model.text import write_small_text_encoder

    spec = {
        "results_dir": str(tmp_path / "results"),
        "model": {"backbone": "resnet_18", "hidden_dim": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 1,
                  "dim_feedforward": 128, "num_queries": 100, "num_select": 50,
                  "text_encoder_type": write_small_text_encoder(tmp_path / "bert", hidden_size=64)},
        "export": {"input_width": 160, "input_height": 128, "verify": False, "serialize_nvdsinfer": True,
                   "onnx_file": str(tmp_path / "out" / "gdino.onnx")},
    }
    torch.manual_seed(0)
    torch.save(native_checkpoint(build_model(load_experiment(spec).model)), tmp_path / "model.pth")
    spec["export"]["checkpoint"] = str(tmp_path / "model.pth")
    assert run_action("export", load_experiment(copy.deepcopy(spec))) == 0
    prop = _ini(tmp_path / "out" / "nvinfer_config.txt")["property"]
    assert (tmp_path / "out" / prop["onnx-file"]).is_file()
    assert prop["infer-dims"] == "3;128;160"
    assert (tmp_path / "out" / "nvdspreprocess_config.txt").is_file()
