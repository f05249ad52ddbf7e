"""The export action: a checkpoint -> an ONNX file with the deploy contract, checked against PyTorch.

The contract (docs/architecture.md, "Export"): inputs `inputs` [B,3,H,W] float32, `input_ids`,
`attention_mask` (bool), `position_ids`, `token_type_ids` [B,L], `text_token_mask` [B,L,L] bool; outputs
`pred_logits` [B,Q,L] and `pred_boxes` [B,Q,4], L = model.max_text_len. The text masks and position ids are
inputs: the caller builds them with the tokenizer's `sub_sentence_masks`, the function training uses, so the graph
holds no mask-building ops (those are what break other exporters). The legacy TorchScript exporter is used because
it honours opset 17; the dynamo exporter silently moves to 18.

After writing the file the action checks it: onnx.checker, then ONNX Runtime against PyTorch on rendered sample
images with their captions (two images with different captions when the batch is dynamic, so the batch axis is
exercised), and fails when the largest difference on finite logits or on boxes exceeds export.verify_tolerance.

With export.serialize_nvdsinfer it also writes, beside the ONNX file, the DeepStream configs TAO writes for this
model: Gst-nvinfer's (the ONNX with its raw outputs attached as tensor meta, network-type 100, no clustering) and
Gst-nvdspreprocess's, which prepares the image tensor (input-tensor-from-meta: the text tensors come from the
application, as in TAO's DeepStream apps). There is no labels file: the phrases come with each request.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch import Tensor, nn

from grounding_dino.actions import ActionRun
from grounding_dino.config import ExperimentConfig
from grounding_dino.errors import UserError
from grounding_dino.data.synthetic import render, vocabulary
from grounding_dino.data.transforms import build_transforms
from grounding_dino.layout import results_dir_for
from grounding_dino.model import transformer
from grounding_dino.model.checkpoint import check_source
from grounding_dino.model.ms_deform_attn import MSDeformAttn
from grounding_dino.model.postprocess import normalize_rows
from grounding_dino.predictor import (FIXED_VOCABULARY, ONNX_INPUTS, ONNX_OUTPUTS, PHRASE_SCORES, PromptChunk,
                                      TorchPredictor, split_prompt)

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
TEXT_INPUTS = ONNX_INPUTS[1:]
# Names drawn in the sample images; any BERT vocabulary tokenises them.
SAMPLE_NAMES = vocabulary(("red", "green", "blue"), ("circle", "square", "triangle"))


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce PyTorch within export.verify_tolerance."""


class ContractModule(nn.Module):
    """Positional inputs in contract order (what torch.onnx traces) around GroundingDINO.forward_export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
        return self.model.forward_export(inputs, input_ids, attention_mask, position_ids, token_type_ids,
                                         text_token_mask)


class FixedVocabularyModule(nn.Module):
    """GroundingDINO for one caption known at export time: its text inputs and its text-encoder features are
    constants, so the graph takes only the image. Outputs the contract's pred_logits and pred_boxes, and
    phrase_scores [B,Q,P]: each query's score for each phrase, as post-processing computes it (the sigmoid of the
    logits averaged over the phrase's tokens), so a deploy runtime needs no tokenizer."""

    def __init__(self, model: nn.Module, text: Dict[str, Tensor], positive_map: Tensor):
        super().__init__()
        self.model = model
        for name in TEXT_INPUTS:
            self.register_buffer(name, text[name][:1].clone(), persistent=False)
        with torch.no_grad():
            self.register_buffer("encoded", model.encode_text({name: text[name][:1] for name in TEXT_INPUTS}),
                                 persistent=False)
        self.register_buffer("phrase_weights", normalize_rows(positive_map.float()).T.contiguous(), persistent=False)

    def forward(self, inputs: Tensor):
        batch = inputs.shape[0]
        text = {name: getattr(self, name).expand(batch, *getattr(self, name).shape[1:]) for name in TEXT_INPUTS}
        out = self.model(inputs, None, text, encoded_text=self.encoded.expand(batch, -1, -1))
        return out["pred_logits"], out["pred_boxes"], out["pred_logits"].sigmoid() @ self.phrase_weights


def fixed_vocabulary_text(model: nn.Module, phrases: Sequence[str]) -> Tuple[PromptChunk, Dict[str, Tensor]]:
    """The one caption of export.fixed_captions, with its tokenizer output padded to model.max_text_len."""
    chunks = split_prompt(phrases, model.tokenizer)
    if len(chunks) != 1:
        raise UserError(f"export.fixed_captions: the {len(phrases)} phrases need {len(chunks)} captions of "
                        f"model.max_text_len {model.max_text_len} tokens, and a fixed-vocabulary model holds one. "
                        "Fix: fewer or shorter phrases, or export one model per group of phrases")
    return chunks[0], model.tokenizer([chunks[0].caption], pad_to_max=True)


def export_fixed_vocabulary(model: nn.Module, cfg: ExperimentConfig, path: Path) -> Tuple[Path, Verification | None]:
    """export_model for export.fixed_captions: the image-only graph of FixedVocabularyModule, its phrases, caption
    and token ids in the ONNX metadata (FIXED_VOCABULARY), checked against the full PyTorch model on that caption."""
    options = cfg.export
    chunk, text = fixed_vocabulary_text(model, options.fixed_captions)
    wrapper = FixedVocabularyModule(model.eval(), text, chunk.positive_map).eval()
    batch = options.batch_size
    images = sample_inputs(model, cfg, options.input_width, options.input_height, 2 if batch == -1 else batch)
    outputs = [*ONNX_OUTPUTS, PHRASE_SCORES]
    axes = {name: {0: BATCH_AXIS} for name in ["inputs", *outputs]} if batch == -1 else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")
        torch.onnx.export(wrapper, (images["inputs"],), str(path), dynamo=False,
                          opset_version=options.opset_version, input_names=["inputs"], output_names=outputs,
                          dynamic_axes=axes, do_constant_folding=True, verbose=options.verbose)
    b = BATCH_AXIS if batch == -1 else batch
    queries, length = model.cfg.num_queries, model.max_text_len
    _set_output_shapes(path, {"pred_logits": [b, queries, length], "pred_boxes": [b, queries, 4],
                              PHRASE_SCORES: [b, queries, len(chunk.names)]})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = FIXED_VOCABULARY, json.dumps({
        "phrases": list(chunk.names), "caption": chunk.caption, "input_ids": text["input_ids"][0].tolist()})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    if not options.verify:
        return path, None
    feeds = [{"inputs": feed["inputs"],
              **{name: text[name].expand(len(feed["inputs"]), *text[name].shape[1:]) for name in TEXT_INPUTS}}
             for feed in verification_feeds(model, cfg, batch)]
    result = compare_with_torch(path, model, feeds)
    if result.worst() > options.verify_tolerance:
        raise ExportVerificationError(
            f"{path}: ONNX Runtime differs from PyTorch on the fixed caption by {result.worst():.3g}, above "
            f"export.verify_tolerance {options.verify_tolerance:g}; the file is kept for inspection")
    return path, result


def export_path(cfg: ExperimentConfig) -> Path:
    """export.onnx_file, else <export results folder>/model.onnx."""
    if cfg.export.onnx_file:
        return Path(cfg.export.onnx_file)
    return results_dir_for("export", cfg) / "model.onnx"


def sample_inputs(model: nn.Module, cfg: ExperimentConfig, width: int, height: int, batch: int,
                  seed: int = 0) -> Dict[str, Tensor]:
    """`batch` rendered shape images, each with a caption of its own shape names, as contract inputs."""
    transforms = build_transforms(cfg.dataset.augmentation, train=False, input_size=(width, height))
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(batch):
        image, objects = render(rng, SAMPLE_NAMES, size=max(width, height), max_objects=3)
        names = sorted({name for name, _ in objects}) or [SAMPLE_NAMES[0]]
        empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
        images.append(transforms(image, empty, rng)[0])
        captions.append(" . ".join(names) + " .")
    text = model.tokenizer(captions, pad_to_max=True)
    return {"inputs": torch.stack(images), **{name: text[name] for name in ONNX_INPUTS[1:]}}


def export_onnx(model: nn.Module, path: Path, example: Dict[str, Tensor], *, dynamic_batch: bool,
                opset_version: int = 17, verbose: bool = False) -> Path:
    """Trace `model` (a GroundingDINO in eval mode) on `example` into `path` with the contract's names and shapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ContractModule(model).eval()
    args = tuple(example[name] for name in ONNX_INPUTS)
    axes = {name: {0: BATCH_AXIS} for name in ONNX_INPUTS + ONNX_OUTPUTS} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-side shape check; they are constants for a fixed input size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset_version,
                          input_names=list(ONNX_INPUTS), output_names=list(ONNX_OUTPUTS), dynamic_axes=axes,
                          do_constant_folding=True, verbose=verbose)
    batch = BATCH_AXIS if dynamic_batch else example["inputs"].shape[0]
    _set_output_shapes(path, {"pred_logits": [batch, model.cfg.num_queries, model.max_text_len],
                              "pred_boxes": [batch, model.cfg.num_queries, 4]})
    return path


def _set_output_shapes(path: Path, shapes: Dict[str, list]) -> None:
    """Write the output shapes the contract promises (the tracer leaves Q and L as anonymous symbols)."""
    proto = onnx.load(str(path), load_external_data=False)
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[output.name]):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    onnx.save(proto, str(path))


@dataclass
class Verification:
    """ONNX Runtime vs PyTorch. Query selection (TopK over encoder scores) flips between near-tied proposals under
    float noise, so PyTorch is re-run with the selection ONNX Runtime made: the differences then measure the graph,
    not the tie-break. `max_abs_diff_selection` compares the scores of the two selections, `queries_reselected`
    counts the slots where they picked different proposals."""

    max_abs_diff_logits: float
    max_abs_diff_boxes: float
    max_abs_diff_selection: float
    queries_reselected: int
    batch_sizes: Tuple[int, ...]

    def worst(self) -> float:
        return max(self.max_abs_diff_logits, self.max_abs_diff_boxes, self.max_abs_diff_selection)

    def kpi(self) -> Dict[str, float]:
        return {"max_abs_diff_logits": self.max_abs_diff_logits, "max_abs_diff_boxes": self.max_abs_diff_boxes,
                "max_abs_diff_selection": self.max_abs_diff_selection, "queries_reselected": self.queries_reselected}


def check_contract(path: Path, *, max_text_len: int, num_queries: int, width: int, height: int,
                   batch: int = -1) -> None:
    """onnx.checker plus the contract's names, element types and shapes; raises ValueError listing differences."""
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    b = BATCH_AXIS if batch == -1 else batch
    expected = {
        "inputs": (onnx.TensorProto.FLOAT, [b, 3, height, width]),
        "input_ids": (onnx.TensorProto.INT64, [b, max_text_len]),
        "attention_mask": (onnx.TensorProto.BOOL, [b, max_text_len]),
        "position_ids": (onnx.TensorProto.INT64, [b, max_text_len]),
        "token_type_ids": (onnx.TensorProto.INT64, [b, max_text_len]),
        "text_token_mask": (onnx.TensorProto.BOOL, [b, max_text_len, max_text_len]),
        "pred_logits": (onnx.TensorProto.FLOAT, [b, num_queries, max_text_len]),
        "pred_boxes": (onnx.TensorProto.FLOAT, [b, num_queries, 4]),
    }
    found = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        tensor = value.type.tensor_type
        found[value.name] = (tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim])
    order = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    problems = []
    if order != (list(ONNX_INPUTS), list(ONNX_OUTPUTS)):
        problems.append(f"inputs/outputs are {order[0]} -> {order[1]}, expected {list(ONNX_INPUTS)} -> "
                        f"{list(ONNX_OUTPUTS)}")
    for name, (dtype, shape) in expected.items():
        if name in found and found[name] != (dtype, shape):
            got_type, got_shape = found[name]
            problems.append(f"{name}: {onnx.TensorProto.DataType.Name(got_type)} {got_shape}, expected "
                            f"{onnx.TensorProto.DataType.Name(dtype)} {shape}")
    if problems:
        raise ValueError(f"{path} does not follow the export contract:\n  " + "\n  ".join(problems))


def _with_selection_output(path: Path, folder: Path) -> Tuple[Path, str | None]:
    """A copy of the graph that also outputs the query-selection indices (the one TopK), and that output's name;
    the graph itself when there is no TopK (two_stage_type 'no')."""
    proto = onnx.load(str(path))
    topk = [node for node in proto.graph.node if node.op_type == "TopK"]
    if len(topk) != 1:
        return path, None
    name = topk[0].output[1]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    copy = folder / path.name
    onnx.save_model(proto, str(copy), save_as_external_data=proto.ByteSize() > 2**31 - 2**26)
    return copy, name


@contextmanager
def _forced_selection(selection: Tensor | None, seen: Dict[str, Tensor]):
    """PyTorch picks `selection` (None: its own choice) as its queries; `seen` receives scores and own choice."""
    original = transformer._top_indices

    def pick(scores: Tensor, k: int) -> Tensor:
        seen["scores"], seen["own"] = scores, original(scores, k)
        return seen["own"] if selection is None else selection.to(scores.device)

    transformer._top_indices = pick
    try:
        yield
    finally:
        transformer._top_indices = original


def compare_with_torch(path: Path, model: nn.Module, feeds: Sequence[Dict[str, Tensor]]) -> Verification:
    """Largest |ONNX Runtime - PyTorch| over `feeds` on logits finite in both (padding is -inf), on boxes and on
    the selected queries' scores, PyTorch re-run with ONNX Runtime's query selection (see Verification).

    Raises ExportVerificationError when the two disagree on which logits are finite.
    """
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    device = next(model.parameters()).device
    diff_logits = diff_boxes = diff_selection = 0.0
    reselected = 0
    with tempfile.TemporaryDirectory() as folder:
        graph, selection_name = _with_selection_output(path, Path(folder))
        session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        names = list(ONNX_OUTPUTS) + ([selection_name] if selection_name else [])
        for feed in feeds:
            got = session.run(names, {i.name: feed[i.name].numpy() for i in session.get_inputs()})
            selection = torch.from_numpy(got[2]) if selection_name else None
            seen: Dict[str, Tensor] = {}
            with torch.no_grad(), _forced_selection(selection, seen):
                expected = model.forward_export(*(feed[name].to(device) for name in ONNX_INPUTS))
            expected = [t.float().cpu().numpy() for t in expected]
            finite = np.isfinite(expected[0])
            if not np.array_equal(finite, np.isfinite(got[0])):
                raise ExportVerificationError(
                    f"{path}: ONNX Runtime and PyTorch disagree on which logits are finite (text padding) at batch "
                    f"{len(feed['inputs'])}")
            diff_logits = max(diff_logits, float(np.abs(got[0][finite] - expected[0][finite]).max(initial=0.0)))
            diff_boxes = max(diff_boxes, float(np.abs(got[1] - expected[1]).max(initial=0.0)))
            if selection is not None:
                scores, own = seen["scores"].float().cpu(), seen["own"].cpu()
                chosen = scores.gather(1, selection).sort(dim=1, descending=True).values
                best = scores.gather(1, own).sort(dim=1, descending=True).values
                diff_selection = max(diff_selection, float((chosen - best).abs().max()))
                reselected += int((selection != own).sum())
    return Verification(diff_logits, diff_boxes, diff_selection, reselected, tuple(len(f["inputs"]) for f in feeds))


def verification_feeds(model: nn.Module, cfg: ExperimentConfig, batch: int) -> List[Dict[str, Tensor]]:
    """Batch 1 and 2 for a dynamic export (different images and captions per row), else the fixed batch."""
    width, height = cfg.export.input_width, cfg.export.input_height
    sizes = (1, 2) if batch == -1 else (batch,)
    return [sample_inputs(model, cfg, width, height, size, seed=size) for size in sizes]


@contextmanager
def msda_sampling(model: nn.Module, sampling: str):
    """Deformable attention samples with `sampling` (ms_deform_attn.SAMPLERS) inside the block; PyTorch runs, such
    as the verification after export, keep their own path."""
    layers = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    before = [m.sampling for m in layers]
    for layer in layers:
        layer.sampling = sampling
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            layer.sampling = old


def export_model(model: nn.Module, cfg: ExperimentConfig, path: Path) -> Tuple[Path, Verification | None]:
    """Export `model` as the spec's export section says, check the contract and (export.verify) compare with
    PyTorch; raises ExportVerificationError above export.verify_tolerance."""
    options = cfg.export
    if options.input_channel != 3:
        raise ValueError(f"export.input_channel {options.input_channel}: Grounding DINO takes RGB (3 channels)")
    model = model.eval()
    batch = options.batch_size
    if batch == 0:
        raise ValueError("export.batch_size 0: use -1 for a dynamic batch or a positive fixed batch size")
    # Trace at batch 2 when dynamic, so no size-1 axis gets folded into a constant.
    example = sample_inputs(model, cfg, options.input_width, options.input_height, 2 if batch == -1 else batch)
    with msda_sampling(model, options.msda_impl):
        export_onnx(model, path, example, dynamic_batch=batch == -1, opset_version=options.opset_version,
                    verbose=options.verbose)
    check_contract(path, max_text_len=model.max_text_len, num_queries=model.cfg.num_queries,
                   width=options.input_width, height=options.input_height, batch=batch)
    if not options.verify:
        return path, None
    result = compare_with_torch(path, model, verification_feeds(model, cfg, batch))
    if result.worst() > options.verify_tolerance:
        raise ExportVerificationError(
            f"{path}: ONNX Runtime differs from PyTorch by {result.max_abs_diff_logits:.3g} on logits, "
            f"{result.max_abs_diff_boxes:.3g} on boxes and {result.max_abs_diff_selection:.3g} on the selected "
            f"queries' scores, above export.verify_tolerance {options.verify_tolerance:g}; the file is kept for "
            "inspection")
    return path, result


def load_for_export(path: str, cfg: ExperimentConfig, section: str = "export") -> nn.Module:
    """The checkpoint's model, built from the spec's model section (structural conflicts with the checkpoint's
    saved settings are refused, naming the keys), on export.gpu_id unless export.on_cpu."""
    device = "cpu" if cfg.export.on_cpu or not torch.cuda.is_available() else f"cuda:{cfg.export.gpu_id}"
    return TorchPredictor.load(path, cfg, section).model.to(device).eval()


NVINFER_CONFIG = "nvinfer_config.txt"
NVDSPREPROCESS_CONFIG = "nvdspreprocess_config.txt"
_DEEPSTREAM_LIB = "/opt/nvidia/deepstream/deepstream/lib"


def _ini(sections: Dict[str, Dict[str, object]], header: str) -> str:
    """GKeyFile text (what DeepStream reads): lists joined with ';'."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, keys in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key}={';'.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
                  for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def deepstream_normalisation(mean: Sequence[float], std: Sequence[float]) -> Tuple[float, List[float]]:
    """(net-scale-factor, offsets) for DeepStream's y = net-scale-factor * (x - offsets) on 0..255 pixels, from the
    model's (x / 255 - mean) / std. DeepStream has one scale for all channels, so the mean std is used (ImageNet's
    std differ by at most 1.3% from their mean)."""
    return 1.0 / (255.0 * float(np.mean(std))), [round(255.0 * m, 4) for m in mean]


def write_deepstream_configs(cfg: ExperimentConfig, onnx_path: Path) -> List[Path]:
    """nvinfer_config.txt and nvdspreprocess_config.txt beside `onnx_path`; returns their paths."""
    options = cfg.export
    scale, offsets = deepstream_normalisation(cfg.dataset.augmentation.input_mean, cfg.dataset.augmentation.input_std)
    batch = 1 if options.batch_size == -1 else options.batch_size
    dims = [options.input_channel, options.input_height, options.input_width]
    header = (f"DeepStream config of {onnx_path.name}, written by the export action (export.serialize_nvdsinfer).\n"
              f"Normalisation: dataset.augmentation input_mean {list(cfg.dataset.augmentation.input_mean)} and "
              f"input_std {list(cfg.dataset.augmentation.input_std)}, one scale (mean std) for all channels.")
    nvinfer = {
        "property": {
            "gpu-id": options.gpu_id,
            "onnx-file": onnx_path.name,
            "net-scale-factor": f"{scale:.10g}",
            "offsets": offsets,
            "model-color-format": 0,  # RGB
            "infer-dims": dims,
            "network-input-order": 0,  # NCHW
            "batch-size": batch,
            "network-mode": 0,  # FP32; an INT8 QDQ ONNX from the quantize action carries its own precisions
            "network-type": 100,  # "other": the raw pred_logits / pred_boxes go to the application
            "output-tensor-meta": 1,
            "output-blob-names": list(ONNX_OUTPUTS),
            "input-tensor-from-meta": 1,
            "cluster-mode": 4,  # no clustering: the detector has no duplicates to merge
            "maintain-aspect-ratio": 0,  # the exported model's input is a plain resize, as in evaluate/inference
            "gie-unique-id": 1,
            "custom-lib-path": f"{_DEEPSTREAM_LIB}/libnvds_infercustomparser_tao.so",
        },
        "class-attrs-all": {"pre-cluster-threshold": cfg.inference.conf_threshold, "topk": cfg.model.num_select},
    }
    preprocess = {
        "property": {
            "enable": 1,
            "target-unique-ids": 1,  # the nvinfer above (gie-unique-id)
            "unique-id": 5,
            "gpu-id": options.gpu_id,
            "process-on-frame": 1,
            "network-input-order": 0,
            "network-input-shape": [batch] + dims,
            "network-color-format": 0,
            "tensor-data-type": 0,  # FP32
            "tensor-name": ONNX_INPUTS[0],
            "processing-width": options.input_width,
            "processing-height": options.input_height,
            "maintain-aspect-ratio": 0,
            "symmetric-padding": 0,
            "scaling-buf-pool-size": 6,
            "tensor-buf-pool-size": 6,
            "scaling-pool-memory-type": 0,
            "scaling-pool-compute-hw": 0,
            "scaling-filter": 0,
            "custom-lib-path": f"{_DEEPSTREAM_LIB}/gst-plugins/libcustom2d_preprocess.so",
            "custom-tensor-preparation-function": "CustomTensorPreparation",
        },
        "user-configs": {"pixel-normalization-factor": f"{scale:.10g}", "offsets": offsets},
        "group-0": {"src-ids": -1, "custom-input-transformation-function": "CustomAsyncTransformation",
                    "process-on-roi": 0},
    }
    written = []
    for name, sections in ((NVINFER_CONFIG, nvinfer), (NVDSPREPROCESS_CONFIG, preprocess)):
        path = onnx_path.parent / name
        path.write_text(_ini(sections, header), encoding="utf-8")
        written.append(path)
    return written


def run_export(cfg: ExperimentConfig, run: ActionRun) -> None:
    """The `export` action: export.checkpoint -> export.onnx_file (or <results>/export/model.onnx)."""
    if not cfg.export.checkpoint:
        raise ValueError("export.checkpoint is not set: give the checkpoint to export (a .pth file, a GroundingDino "
                         "folder or a Hugging Face id)")
    check_source(cfg.export.checkpoint, "export.checkpoint")
    model = load_for_export(cfg.export.checkpoint, cfg)
    if cfg.export.fixed_captions:
        with msda_sampling(model, cfg.export.msda_impl):
            path, result = export_fixed_vocabulary(model, cfg, export_path(cfg))
    else:
        path, result = export_model(model, cfg, export_path(cfg))
    message = f"Exported {path}."
    if result is not None:
        message += (f" ONNX Runtime matches PyTorch at batch {', '.join(map(str, result.batch_sizes))}: max |diff| "
                    f"{result.max_abs_diff_logits:.3g} on logits, {result.max_abs_diff_boxes:.3g} on boxes, "
                    f"{result.max_abs_diff_selection:.3g} on selection scores ({result.queries_reselected} near-tied "
                    "queries picked in another order).")
    extra = {}
    if cfg.export.serialize_nvdsinfer:
        nvinfer, preprocess = write_deepstream_configs(cfg, path)
        message += f" DeepStream configs: {nvinfer}, {preprocess}."
        extra = {"nvinfer_config": str(nvinfer), "nvdspreprocess_config": str(preprocess)}
    print(message)
    run.report.succeed(message, onnx_file=str(path), kpi=result.kpi() if result else None, **extra)
