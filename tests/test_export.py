"""ONNX export: the exact 6-input contract, a really dynamic batch, ORT == PyTorch, verification, conflicts."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from grounding_dino.actions import run_action
from grounding_dino.actions.export import (
    TEXT_INPUTS,
    ExportVerificationError,
    export_model,
    sample_inputs,
)
from grounding_dino.config import load_experiment
from grounding_dino.errors import UserError
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import native_checkpoint
from grounding_dino.model.text import sub_sentence_masks, write_small_text_encoder
from grounding_dino.status import read_status

WIDTH, HEIGHT, QUERIES, TEXT_LEN = 160, 128, 100, 256


def tiny_spec(text_folder, results_dir, **export):
    return {
        "results_dir": str(results_dir),
        "model": {"backbone": "resnet_18", "hidden_dim": 64, "nheads": 4, "enc_layers": 2, "dec_layers": 2,
                  "dim_feedforward": 128, "num_queries": QUERIES, "num_select": 50, "max_text_len": TEXT_LEN,
                  "text_encoder_type": text_folder, "log_scale": "auto", "class_embed_bias": True},
        "export": {"input_width": WIDTH, "input_height": HEIGHT, **export},
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny model saved as our checkpoint, and the spec that built it."""
    root = tmp_path_factory.mktemp("export")
    spec = tiny_spec(write_small_text_encoder(root / "bert", hidden_size=64), root / "results")
    torch.manual_seed(0)
    model = build_model(load_experiment(spec).model).eval()
    checkpoint = root / "model.pth"
    torch.save(native_checkpoint(model), checkpoint)
    spec["export"]["checkpoint"] = str(checkpoint)
    return {"spec": spec, "model": model, "root": root}


@pytest.fixture(scope="module")
def exported(tiny):
    """The export action run once with a dynamic batch."""
    assert run_action("export", load_experiment(tiny["spec"])) == 0
    return tiny["root"] / "results" / "export" / "model.onnx"


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_has_the_exact_contract(exported):
    session = _session(exported)
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    outputs = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    assert inputs == [
        ("inputs", "tensor(float)", ["batch", 3, HEIGHT, WIDTH]),
        ("input_ids", "tensor(int64)", ["batch", TEXT_LEN]),
        ("attention_mask", "tensor(bool)", ["batch", TEXT_LEN]),
        ("position_ids", "tensor(int64)", ["batch", TEXT_LEN]),
        ("token_type_ids", "tensor(int64)", ["batch", TEXT_LEN]),
        ("text_token_mask", "tensor(bool)", ["batch", TEXT_LEN, TEXT_LEN]),
    ]
    assert outputs == [("pred_logits", "tensor(float)", ["batch", QUERIES, TEXT_LEN]),
                       ("pred_boxes", "tensor(float)", ["batch", QUERIES, 4])]
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    # Every contract input is used: the text masks and position ids are read, not rebuilt inside the graph.
    consumed = {name for node in proto.graph.node for name in node.input}
    assert all(i.name in consumed for i in proto.graph.input)


def test_action_reports_the_measured_differences(exported, tiny):
    records = read_status(tiny["root"] / "results" / "export" / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "SUCCESS"]
    kpi = records[-1]["kpi"]
    assert 0 <= kpi["max_abs_diff_logits"] <= 1e-4 and 0 <= kpi["max_abs_diff_boxes"] <= 1e-4
    assert records[-1]["onnx_file"] == str(exported)


def test_onnx_runtime_matches_pytorch_at_batch_1_2_and_3(exported, tiny):
    """Each row depends only on its own image and caption, whatever the batch size."""
    model, cfg = tiny["model"], load_experiment(tiny["spec"])
    feed = sample_inputs(model, cfg, WIDTH, HEIGHT, batch=3, seed=7)
    assert not torch.equal(feed["input_ids"][0], feed["input_ids"][1])  # different captions per row
    with torch.no_grad():
        expected = [t.numpy() for t in model.forward_export(*feed.values())]
    session = _session(exported)
    full = session.run(None, {k: v.numpy() for k, v in feed.items()})
    single = session.run(None, {k: v[1:2].numpy() for k, v in feed.items()})
    finite = np.isfinite(expected[0])
    assert np.array_equal(finite, np.isfinite(full[0])) and finite.any() and not finite.all()
    assert np.abs(full[0][finite] - expected[0][finite]).max() < 1e-4
    assert np.abs(full[1] - expected[1]).max() < 1e-4
    assert np.abs(single[0][finite[1:2]] - full[0][1:2][finite[1:2]]).max() < 1e-4
    assert np.abs(single[1] - full[1][1:2]).max() < 1e-4


def test_text_masks_are_inputs_built_by_the_shared_function(tiny):
    model, cfg = tiny["model"], load_experiment(tiny["spec"])
    feed = sample_inputs(model, cfg, WIDTH, HEIGHT, batch=2)
    mask, positions = sub_sentence_masks(feed["input_ids"], model.tokenizer.delimiter_ids)
    assert torch.equal(feed["text_token_mask"], mask) and torch.equal(feed["position_ids"], positions)
    assert feed["attention_mask"].dtype == torch.bool and feed["input_ids"].shape == (2, TEXT_LEN)


def test_fixed_batch_export(tiny, tmp_path):
    spec = copy.deepcopy(tiny["spec"])
    spec["export"].update(batch_size=2, onnx_file=str(tmp_path / "fixed.onnx"))
    path, result = export_model(tiny["model"], load_experiment(spec), tmp_path / "fixed.onnx")
    session = _session(path)
    assert session.get_inputs()[0].shape == [2, 3, HEIGHT, WIDTH]
    assert session.get_inputs()[5].shape == [2, TEXT_LEN, TEXT_LEN]
    assert session.get_outputs()[0].shape == [2, QUERIES, TEXT_LEN]
    assert result.batch_sizes == (2,) and result.max_abs_diff_logits < 1e-4


def test_gather_sampling_leaves_no_gridsample_in_the_graph_and_matches_pytorch(exported, tiny, tmp_path):
    """export.msda_impl=gather (for TensorRT, whose GridSample can be wrong): the same model, ORT == PyTorch <= 1e-4
    on a batch of 3 with different captions, and the PyTorch model itself keeps its own sampling afterwards."""
    from grounding_dino.model.ms_deform_attn import MSDeformAttn

    spec = copy.deepcopy(tiny["spec"])
    spec["export"]["msda_impl"] = "gather"
    model, cfg = tiny["model"], load_experiment(spec)
    path, result = export_model(model, cfg, tmp_path / "gather.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and "GatherElements" in ops
    assert "GridSample" in {node.op_type for node in onnx.load(str(exported)).graph.node}
    assert all(m.sampling == "grid_sample" for m in model.modules() if isinstance(m, MSDeformAttn))
    assert result.max_abs_diff_logits <= 1e-4 and result.max_abs_diff_boxes <= 1e-4
    feed = sample_inputs(model, cfg, WIDTH, HEIGHT, batch=3, seed=11)
    with torch.no_grad():
        expected = [t.numpy() for t in model.forward_export(*feed.values())]
    got = _session(path).run(None, {k: v.numpy() for k, v in feed.items()})
    finite = np.isfinite(expected[0])
    assert np.abs(got[0][finite] - expected[0][finite]).max() <= 1e-4
    assert np.abs(got[1] - expected[1]).max() <= 1e-4
    # gen_trt_engine warns about the GridSample graph on the TensorRT releases that miscompile it, and only there
    from grounding_dino.deploy.builder import gridsample_warning

    assert "export.msda_impl=gather" in gridsample_warning(exported, "10.14.1.48")
    assert gridsample_warning(exported, "11.1.0") and gridsample_warning(exported, "10.13.3.9") is None
    assert gridsample_warning(path, "11.1.0") is None


def test_fixed_vocabulary_export_takes_only_the_image_and_matches_the_full_model(exported, tiny, tmp_path):
    """export.fixed_captions: the text encoder is run once at export; the graph takes the image alone, holds no
    BERT, and gives the full model's logits and boxes on that caption (<= 1e-4), phrase scores as post-processing
    computes them, and the OnnxPredictor runs it for its phrases only."""
    from grounding_dino.model.postprocess import post_process
    from grounding_dino.predictor import FIXED_VOCABULARY, OnnxPredictor, split_prompt

    phrases = ["red circle", "blue square", "green triangle"]
    spec = copy.deepcopy(tiny["spec"])
    spec["results_dir"] = str(tmp_path)
    spec["export"].update(fixed_captions=phrases, onnx_file=str(tmp_path / "fixed.onnx"))
    assert run_action("export", load_experiment(spec)) == 0
    path = tmp_path / "fixed.onnx"
    kpi = read_status(tmp_path / "export" / "status.json")[-1]["kpi"]
    assert kpi["max_abs_diff_logits"] <= 1e-4 and kpi["max_abs_diff_boxes"] <= 1e-4
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["inputs"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes", "phrase_scores"]
    assert session.get_outputs()[2].shape == ["batch", QUERIES, 3]
    assert json.loads(session.get_modelmeta().custom_metadata_map[FIXED_VOCABULARY])["phrases"] == phrases
    assert path.stat().st_size < exported.stat().st_size  # the text encoder is not in the graph

    model, cfg = tiny["model"], load_experiment(spec)
    chunk, = split_prompt(phrases, model.tokenizer)
    text = model.tokenizer([chunk.caption] * 3, pad_to_max=True)
    images = sample_inputs(model, cfg, WIDTH, HEIGHT, batch=3, seed=5)["inputs"]
    with torch.no_grad():
        expected = [t.numpy() for t in model.forward_export(images, *(text[name] for name in TEXT_INPUTS))]
    logits, boxes, scores = session.run(None, {"inputs": images.numpy()})
    finite = np.isfinite(expected[0])
    assert np.abs(logits[finite] - expected[0][finite]).max() <= 1e-4
    assert np.abs(boxes - expected[1]).max() <= 1e-4
    sizes = torch.tensor([[HEIGHT, WIDTH]] * 3)
    detected = post_process(torch.from_numpy(logits), torch.from_numpy(boxes), chunk.positive_map, sizes,
                            num_select=QUERIES * 3)
    for row, found in enumerate(detected):  # phrase_scores holds every (query, phrase) score post-processing ranks
        assert np.allclose(np.sort(scores[row].ravel())[::-1], found["scores"].numpy(), atol=1e-6)

    predictor = OnnxPredictor(str(path), model.tokenizer)
    got_logits, _ = predictor.predict(images, None, text)
    assert np.abs(got_logits.numpy()[finite] - logits[finite]).max() == 0
    other = model.tokenizer(["red circle . blue square ."] * 3, pad_to_max=True)
    with pytest.raises(UserError, match=r"fixed-vocabulary model for the phrases \['red circle', 'blue square', "
                                        r"'green triangle'\].*cannot score other phrases"):
        predictor.predict(images, None, other)


def test_tolerance_violation_fails_the_action(tiny, tmp_path):
    spec = copy.deepcopy(tiny["spec"])
    spec["results_dir"] = str(tmp_path)
    spec["export"]["verify_tolerance"] = 1e-12
    with pytest.raises(ExportVerificationError, match="above export.verify_tolerance"):
        run_action("export", load_experiment(spec))
    last = read_status(tmp_path / "export" / "status.json")[-1]
    assert last["status"] == "FAILURE" and "verify_tolerance" in last["message"]


def test_checkpoint_with_other_model_settings_is_refused(tiny, tmp_path):
    spec = copy.deepcopy(tiny["spec"])
    spec["results_dir"] = str(tmp_path)
    spec["model"]["num_queries"] = 200
    with pytest.raises(UserError, match=r"model.num_queries: checkpoint 100, spec 200"):
        run_action("export", load_experiment(spec))
    assert not (tmp_path / "export").exists()


def test_missing_checkpoint_is_named(tiny, tmp_path):
    spec = copy.deepcopy(tiny["spec"])
    spec["results_dir"] = str(tmp_path)
    spec["export"]["checkpoint"] = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="export.checkpoint: .*nope.pth does not exist"):
        run_action("export", load_experiment(spec))
