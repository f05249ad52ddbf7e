"""The quantize action: post-training quantization calibrated on images *with their captions*.

Grounding DINO's forward needs text, so every calibration batch is a contract feed: images of
dataset.quant_calibration_data_sources (COCO) resized to the model input, plus the caption of all its category
names tokenised with the shared text masks (NVIDIA TAO's calibration feeds images only, which cannot run).

Backends (quantize.backend):
  onnxruntime       CPU. static_ptq: INT8 QDQ (symmetric, per-channel weights, so TensorRT builds it too) on Conv/
                    MatMul/Gemm after quant_pre_process, calibrated through a CalibrationDataReader (minmax, entropy,
                    percentile). dynamic_ptq: INT8 weights of MatMul/Gemm, activations quantised at run time.
  modelopt.onnx     INT8/FP8 QDQ for TensorRT (nvidia-modelopt with its ONNX dependencies).
  modelopt.pytorch  INT8/FP8 fake-quantised PyTorch model (nvidia-modelopt).
  torchao           INT8 weight-only PyTorch model (torchao).
quantize.skip_names are fnmatch patterns of ONNX node names (ONNX backends) or module names (PyTorch backends)
left in float. ONNX backends take an .onnx (a .pth is exported first with the export section's settings).
quantize.backend_kwargs go to the backend over the arguments set here (see backend_call and each backend).

With quantize.evaluate the quantized and the float model are both scored on dataset.val_data_sources by the
evaluate action's code, and both mAP50 go to status.json (KPIs float_mAP50, quantized_mAP50) and results.json.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime.quantization as ort_quant
import torch
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn

from grounding_dino.actions import ActionRun
from grounding_dino.actions.evaluate import evaluate
from grounding_dino.actions.export import export_model, load_for_export
from grounding_dino.config import ExperimentConfig, QuantizeConfig
from grounding_dino.data import build_dataloader
from grounding_dino.model.checkpoint import check_source
from grounding_dino.predictor import (
    FIXED_VOCABULARY,
    ONNX_INPUTS,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    split_prompt,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'grounding-dino-skillbank[quantize]'"


class MissingBackendError(ImportError):
    """The optional package a quantize backend needs is not installed."""


def require(module: str, backend: str):
    """Import `module` or raise a one-line MissingBackendError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingBackendError(f"quantize.backend '{backend}' needs the {module.split('.')[0]} package "
                                  f"({err.name or module} is missing): {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------------------------
# calibration data with real captions


def calibration_feeds(cfg: ExperimentConfig, tokenizer, input_size: Optional[Tuple[int, int]], batch_size: int,
                      limit: int) -> Iterator[Dict[str, Tensor]]:
    """Up to `limit` batches of the calibration set as {images, pixel_mask, and the contract's text inputs}.

    The caption holds every category name (split into several prompts when longer than max_text_len; each batch
    then yields one feed per prompt). input_size (width, height) resizes to a fixed model input; None keeps the
    aspect ratio with padding, for PyTorch models.
    """
    loader = build_dataloader(cfg, "calibration", input_size=input_size, batch_size=batch_size, shuffle=False)
    chunks = split_prompt(loader.dataset.phrases, tokenizer)
    produced = 0
    for images, pixel_mask, _ in loader:
        if len(images) != batch_size and input_size is not None:
            continue  # a fixed-batch graph cannot take the short last batch
        for chunk in chunks:
            text = tokenizer([chunk.caption] * len(images), pad_to_max=True)
            yield {"inputs": images, "pixel_mask": pixel_mask, **{k: text[k] for k in ONNX_INPUTS[1:]}}
            produced += 1
            if produced >= limit:
                return
    if produced == 0:
        raise ValueError(f"dataset.quant_calibration_data_sources holds fewer than {batch_size} images, the batch of "
                         "the model; add images or export with a dynamic batch")


def _onnx_feeds(feeds: Iterator[Dict[str, Tensor]], names: Sequence[str] = ONNX_INPUTS
                ) -> Iterator[Dict[str, object]]:
    for feed in feeds:
        yield {name: feed[name].numpy() for name in names}


def _onnx_calibration(cfg: ExperimentConfig, onnx_path: Path):
    """(numpy feeds generator, predictor) for an exported model: its input size and batch decide the feeds, and a
    fixed-vocabulary model (export.fixed_captions) is fed its images alone."""
    predictor = OnnxPredictor.load(str(onnx_path), cfg, "quantize")
    batch = predictor.batch or cfg.dataset.batch_size
    feeds = calibration_feeds(cfg, predictor.tokenizer, predictor.input_size, batch,
                              cfg.quantize.num_calibration_batches)
    return _onnx_feeds(feeds, ["inputs"] if predictor.fixed else ONNX_INPUTS), predictor


def _keep_fixed_vocabulary(source: Path, output: Path) -> None:
    """Copy a fixed-vocabulary model's phrases (ONNX metadata) into its quantized graph, which the quantizer
    writes without them."""
    proto = onnx.load(str(source), load_external_data=False)
    entries = {entry.key: entry.value for entry in proto.metadata_props if entry.key == FIXED_VOCABULARY}
    if not entries:
        return
    quantized = onnx.load(str(output))
    if not any(entry.key == FIXED_VOCABULARY for entry in quantized.metadata_props):
        entry = quantized.metadata_props.add()
        entry.key, entry.value = FIXED_VOCABULARY, entries[FIXED_VOCABULARY]
        onnx.save(quantized, str(output))


def _excluded_nodes(onnx_path: Path, patterns: Sequence[str]) -> List[str]:
    """Node names of the graph matching quantize.skip_names (fnmatch); a pattern matching nothing is an error."""
    names = [node.name for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    excluded = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"quantize.skip_names: {pattern!r} matches no node of {onnx_path} (node names look "
                             f"like {names[len(names) // 2]!r})")
        excluded += hits
    return sorted(set(excluded))


# ---------------------------------------------------------------------------------------------------------------
# backends


@dataclass
class QuantizeRun:
    cfg: ExperimentConfig
    results_dir: Path
    model_path: Path


@dataclass
class Outcome:
    path: Path
    quantized: Predictor
    float: Callable[[], Predictor]   # built only when quantize.evaluate asks for it


_ORT_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ORT_OPS_STATIC = ["Conv", "MatMul", "Gemm"]
_ORT_OPS_DYNAMIC = ["MatMul", "Gemm"]


def _onnx_input(job: QuantizeRun) -> Path:
    """quantize.model_path as an ONNX file: exported first (export section settings) when it is a checkpoint."""
    if job.model_path.suffix.lower() == ".onnx":
        return job.model_path
    model = load_for_export(str(job.model_path), job.cfg, "quantize")
    path, _ = export_model(model, job.cfg, job.results_dir / "model.onnx")
    return path


# The action supplies these itself: the model files and the calibration data.
_ORT_OWN = ("model_input", "model_output", "calibration_data_reader")
_ORT_ENUMS = {"quant_format": ort_quant.QuantFormat, "activation_type": ort_quant.QuantType,
              "weight_type": ort_quant.QuantType, "calibrate_method": ort_quant.CalibrationMethod}


def backend_call(function: Callable, ours: Mapping[str, Any], given: Mapping[str, Any],
                 enums: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Keyword arguments for `function`: `ours` with quantize.backend_kwargs (`given`) on top. A key must be a
    keyword of `function`; an `enums` key given as a string is read as that enum's member name; a mapping given for
    a mapping of ours (onnxruntime's extra_options) merges key by key."""
    accepted = [name for name in inspect.signature(function).parameters if name not in _ORT_OWN]
    kwargs = dict(ours)
    for key, value in given.items():
        where = f"quantize.backend_kwargs.{key}"
        if key not in accepted:
            raise ValueError(f"{where}: not a keyword of {function.__module__}.{function.__name__}; its keywords "
                             f"are {', '.join(accepted)}")
        if enums and key in enums and isinstance(value, str):
            members = enums[key].__members__
            if value not in members:
                raise ValueError(f"{where}: {value!r} is not one of {', '.join(members)}")
            value = members[value]
        if isinstance(value, Mapping) and isinstance(kwargs.get(key), Mapping):
            value = {**kwargs[key], **value}
        kwargs[key] = value
    return kwargs


def static_int8(prepared: Path, output: Path, feeds: Iterator[Dict[str, object]], algorithm: str = "minmax",
                excluded: Sequence[str] = (), backend_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """INT8 QDQ of a quant_pre_process'ed graph, calibrated on contract feeds (numpy): symmetric activations and
    per-channel symmetric weights, the layout TensorRT builds too, unless backend_kwargs say otherwise."""
    ours = dict(quant_format=ort_quant.QuantFormat.QDQ, per_channel=True,
                activation_type=ort_quant.QuantType.QInt8, weight_type=ort_quant.QuantType.QInt8,
                calibrate_method=getattr(ort_quant.CalibrationMethod, _ORT_CALIBRATION[algorithm]),
                op_types_to_quantize=_ORT_OPS_STATIC, nodes_to_exclude=list(excluded),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    ort_quant.quantize_static(str(prepared), str(output), _Reader(feeds),
                              **backend_call(ort_quant.quantize_static, ours, backend_kwargs or {}, _ORT_ENUMS))
    return output


def dynamic_int8(prepared: Path, output: Path, excluded: Sequence[str] = (),
                 backend_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    ours = dict(weight_type=ort_quant.QuantType.QInt8, per_channel=True, op_types_to_quantize=_ORT_OPS_DYNAMIC,
                nodes_to_exclude=list(excluded))
    ort_quant.quantize_dynamic(str(prepared), str(output),
                               **backend_call(ort_quant.quantize_dynamic, ours, backend_kwargs or {}, _ORT_ENUMS))
    return output


def quantize_onnxruntime(job: QuantizeRun) -> Outcome:
    options = job.cfg.quantize
    source = _onnx_input(job)
    prepared = job.results_dir / "model_preprocessed.onnx"
    quant_pre_process(str(source), str(prepared))
    excluded = _excluded_nodes(prepared, options.skip_names)
    output = job.results_dir / "quantized_model.onnx"
    if options.mode == "static_ptq":
        feeds, _ = _onnx_calibration(job.cfg, source)
        static_int8(prepared, output, feeds, options.algorithm, excluded, options.backend_kwargs)
    else:
        dynamic_int8(prepared, output, excluded, options.backend_kwargs)
    prepared.unlink()
    _keep_fixed_vocabulary(source, output)
    return Outcome(output, OnnxPredictor.load(str(output), job.cfg, "quantize"),
                   lambda: OnnxPredictor.load(str(source), job.cfg, "quantize"))


class _Reader(CalibrationDataReader):
    """Contract feeds for onnxruntime's calibrator (get_next returns None when done)."""

    def __init__(self, feeds: Iterator[Dict[str, object]]):
        self.feeds = feeds

    def get_next(self):
        return next(self.feeds, None)


_MODELOPT_DTYPES = {"int8": "int8", "fp8_e4m3fn": "fp8"}


def quantize_modelopt_onnx(job: QuantizeRun) -> Outcome:
    modelopt_onnx = require("modelopt.onnx.quantization", "modelopt.onnx")
    options = job.cfg.quantize
    source = _onnx_input(job)
    feeds, _ = _onnx_calibration(job.cfg, source)
    batches = list(feeds)
    calibration = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    output = job.results_dir / "quantized_model.onnx"
    ours = dict(onnx_path=str(source), quantize_mode=_MODELOPT_DTYPES[options.default_activation_dtype],
                calibration_data=calibration, calibration_method=options.algorithm,
                calibration_eps=["cuda:0"] if options.device == "cuda" else ["cpu"],
                nodes_to_exclude=_excluded_nodes(source, options.skip_names) or None, output_path=str(output))
    modelopt_onnx.quantize(**backend_call(modelopt_onnx.quantize, ours, options.backend_kwargs))
    _keep_fixed_vocabulary(source, output)
    return Outcome(output, OnnxPredictor.load(str(output), job.cfg, "quantize"),
                   lambda: OnnxPredictor.load(str(source), job.cfg, "quantize"))


def _torch_model(job: QuantizeRun) -> nn.Module:
    if job.model_path.suffix.lower() == ".onnx":
        raise ValueError(f"quantize.backend '{job.cfg.quantize.backend}' quantizes the PyTorch model: set "
                         f"quantize.model_path to the .pth checkpoint, not {job.model_path}")
    device = "cuda" if job.cfg.quantize.device == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("quantize.device is cuda but no CUDA GPU is visible; set quantize.device cpu")
    return TorchPredictor.load(str(job.model_path), job.cfg, "quantize").model.to(device).eval()


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_modelopt_pytorch(job: QuantizeRun) -> Outcome:
    mtq = require("modelopt.torch.quantization", "modelopt.pytorch")
    mto = require("modelopt.torch.opt", "modelopt.pytorch")
    options = job.cfg.quantize
    model = _torch_model(job)
    device = next(model.parameters()).device
    base = {"int8": mtq.INT8_DEFAULT_CFG, "fp8_e4m3fn": mtq.FP8_DEFAULT_CFG}[options.default_activation_dtype]
    config = copy.deepcopy(base)
    config["algorithm"] = options.algorithm
    for pattern in options.skip_names:
        config["quant_cfg"][pattern] = {"enable": False}
    for key, value in options.backend_kwargs.items():
        if key not in config:
            raise ValueError(f"quantize.backend_kwargs.{key}: not a key of the modelopt.pytorch config; its keys are "
                             f"{', '.join(config)}")
        config[key] = {**config[key], **value} if isinstance(value, Mapping) and isinstance(config[key], Mapping) \
            else value
    feeds = list(calibration_feeds(job.cfg, model.tokenizer, None, job.cfg.dataset.batch_size,
                                   options.num_calibration_batches))

    def forward_loop(module: nn.Module) -> None:
        with torch.no_grad():
            for feed in feeds:
                text = {k: feed[k].to(device) for k in ONNX_INPUTS[1:]}
                module(feed["inputs"].to(device), feed["pixel_mask"].to(device), text)

    float_model = copy.deepcopy(model) if options.evaluate else None
    model = mtq.quantize(model, config, forward_loop)
    output = job.results_dir / "quantized_model_modelopt.pytorch.pth"
    mto.save(model, str(output))
    return Outcome(output, TorchPredictor(model), lambda: TorchPredictor(float_model))


def quantize_torchao(job: QuantizeRun) -> Outcome:
    torchao = require("torchao.quantization", "torchao")
    options = job.cfg.quantize
    model = _torch_model(job)
    float_model = copy.deepcopy(model) if options.evaluate else None
    weight_only = torchao.Int8WeightOnlyConfig(**backend_call(torchao.Int8WeightOnlyConfig, {}, options.backend_kwargs))
    torchao.quantize_(model, weight_only, filter_fn=lambda module, name: isinstance(module, nn.Linear)
                      and not _skipped(name, options.skip_names))
    output = job.results_dir / "quantized_model_torchao.pth"
    torch.save(model.state_dict(), output)
    return Outcome(output, TorchPredictor(model), lambda: TorchPredictor(float_model))


@dataclass(frozen=True)
class Backend:
    run: Callable[[QuantizeRun], Outcome]
    modes: Tuple[str, ...]
    algorithms: Tuple[str, ...]
    dtypes: Tuple[str, ...]


BACKENDS: Dict[str, Backend] = {
    "onnxruntime": Backend(quantize_onnxruntime, ("static_ptq", "dynamic_ptq"), tuple(_ORT_CALIBRATION), ("int8",)),
    "modelopt.onnx": Backend(quantize_modelopt_onnx, ("static_ptq",), ("max", "entropy"), tuple(_MODELOPT_DTYPES)),
    "modelopt.pytorch": Backend(quantize_modelopt_pytorch, ("static_ptq",), ("max", "awq_lite", "awq_full"),
                                tuple(_MODELOPT_DTYPES)),
    "torchao": Backend(quantize_torchao, ("weight_only_ptq",), ("minmax",), ("int8",)),
}


def check_options(options: QuantizeConfig) -> Backend:
    """The backend of the spec, after checking that mode, algorithm and dtypes are ones it supports."""
    backend = BACKENDS[options.backend]
    for key, value, allowed in (("mode", options.mode, backend.modes),
                                ("algorithm", options.algorithm, backend.algorithms),
                                ("default_layer_dtype", options.default_layer_dtype, backend.dtypes),
                                ("default_activation_dtype", options.default_activation_dtype, backend.dtypes)):
        if key == "algorithm" and options.mode != "static_ptq":
            continue  # only calibrated quantization has an algorithm
        if value not in allowed:
            raise ValueError(f"quantize.{key} {value!r} is not supported by quantize.backend '{options.backend}' "
                             f"(supported: {', '.join(allowed)})")
    if options.layers:
        raise ValueError("quantize.layers (per-layer dtypes) is not supported; leave layers in float with "
                         "quantize.skip_names")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# the action


def _val_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The spec with the val set in the test slot, so evaluate() scores the val set."""
    val = copy.deepcopy(cfg)
    val.dataset.test_data_sources = copy.deepcopy(cfg.dataset.val_data_sources)
    return val


def run_quantize(cfg: ExperimentConfig, run: ActionRun) -> None:
    """The `quantize` action: quantize.model_path -> the backend's quantized model in the results folder."""
    results_dir = run.results_dir
    backend = check_options(cfg.quantize)
    if not cfg.quantize.model_path:
        raise ValueError("quantize.model_path is not set: give a .pth checkpoint, an exported .onnx, a GroundingDino "
                         "folder or a Hugging Face id")
    check_source(cfg.quantize.model_path, "quantize.model_path")
    model_path = Path(cfg.quantize.model_path)
    results_dir.mkdir(parents=True, exist_ok=True)
    outcome = backend.run(QuantizeRun(cfg, results_dir, model_path))
    results = {"backend": cfg.quantize.backend, "mode": cfg.quantize.mode, "quantized_model": str(outcome.path)}
    kpi = {}
    if cfg.quantize.evaluate:
        val = _val_config(cfg)
        results["quantized"] = evaluate(val, outcome.quantized)
        results["float"] = evaluate(val, outcome.float())
        kpi = {f"{kind}_{metric}": results[kind][metric] for kind in ("float", "quantized")
               for metric in ("mAP", "mAP50")}
    (results_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    message = f"Quantized model ({cfg.quantize.backend}, {cfg.quantize.mode}): {outcome.path}."
    if kpi:
        # a metric is None when the val set gives nothing to score (CocoEvaluator says why in the results)
        shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in kpi.items()}
        message += f" mAP50 float {shown['float_mAP50']}, quantized {shown['quantized_mAP50']}."
    print(message)
    run.report.succeed(message, quantized_model=str(outcome.path), kpi=kpi or None)
