"""What each action checks before its results folder exists: the model files it reads.

`run_action` runs an action's check first, so a checkpoint that is missing, is not a checkpoint, holds Python
objects or contradicts the spec's model settings, a TensorRT engine on a machine without TensorRT, and a run on
several nodes or processes that cannot start (NODE_RANK, MASTER_ADDR, num_gpus for a model that runs in one
process), stop the run with one UserError (the spec key, the path or id, the fix) before anything is written. The
SDK's preflight checks paths and data without torch; these checks need torch (reading a checkpoint) or the runtime's
packages (TensorRT), so they live here.

A weights source is checked the way the action will load it, through grounding_dino.model.checkpoint: a local file,
a transformers GroundingDino folder or a Hugging Face id (downloaded now, into the cache the action then reads),
read by its one reader (torch.load(weights_only=True), memory-mapped: only the dicts around the tensors are read
now), and its model settings settled against the spec's (a structural key the spec leaves at its default takes the
checkpoint's value; only a value the spec sets otherwise is refused).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from grounding_dino.config import ExperimentConfig
from grounding_dino.errors import UserError


def _checkpoint(key: str, value: Optional[str], cfg: ExperimentConfig) -> None:
    """`value` (spec key `key`) found, read and settled against the spec's model section."""
    if not value:
        return
    from grounding_dino.model.checkpoint import check_source, read_checkpoint, settle_model_config

    try:
        check_source(value, key)
        settle_model_config(cfg.model, read_checkpoint(value, key, mmap=True))
    except (OSError, ValueError) as err:  # FileNotFoundError and PermissionError (gated hub models) are OSErrors
        raise UserError(str(err)) from None


def _onnx_or_checkpoint(key: str, value: Optional[str], cfg: ExperimentConfig) -> None:
    """An .onnx model must exist; anything else is a PyTorch weights source."""
    if value and Path(value).suffix.lower() == ".onnx":
        if not Path(value).is_file():
            raise UserError(f"{key}: {value} does not exist. Fix: point {key} at an existing .onnx file (export "
                            "writes one), a .pth checkpoint, a GroundingDino folder or a Hugging Face id.")
        return
    _checkpoint(key, value, cfg)


def _predictor_model(section: str, cfg: ExperimentConfig) -> None:
    """{section}.checkpoint as the predictor will take it: a local file by its extension (a .engine needs
    TensorRT), anything else as a PyTorch weights source."""
    key, value = f"{section}.checkpoint", getattr(cfg, section).checkpoint
    if value and Path(value).is_file():
        from grounding_dino.predictor import backend_for

        try:
            backend = backend_for(value)
        except ValueError as err:
            raise UserError(f"{key}: {err}") from None
        if backend == "tensorrt":
            _tensorrt(key, value, _gpu(cfg, section), "running the engine",
                      f"set {key} to the .pth checkpoint or the exported .onnx model instead")
            return
    _onnx_or_checkpoint(key, value, cfg)


def _gpu(cfg: ExperimentConfig, section: str) -> int:
    return (getattr(cfg, section).gpu_ids or [0])[0]


def _tensorrt(key: str, path: str, gpu_id: int, use: str, instead: str) -> None:
    from grounding_dino.deploy import TensorRTUnavailable, tensorrt

    if not Path(path).is_file():
        raise UserError(f"{key}: {path} does not exist. Fix: point {key} at an existing file.")
    try:
        tensorrt(gpu_id)
    except TensorRTUnavailable as err:
        raise UserError(f"{key}: {use} {path} needs TensorRT: {err}. Fix: run on a GPU machine with TensorRT, "
                        f"or {instead}.") from None


def train(cfg: ExperimentConfig) -> None:
    from grounding_dino.actions.train import check_nodes

    check_nodes(cfg.train)
    resume = cfg.train.resume_training_checkpoint_path
    if resume:
        key = "train.resume_training_checkpoint_path"
        if not Path(resume).is_file():
            raise UserError(f"{key}: {resume} does not exist. Fix: point {key} at a model_epoch_*.pth (or "
                            "gdino_model_latest.pth) that train wrote, or remove it to start from scratch.")
        from grounding_dino.lightning_module import check_resumable
        from grounding_dino.model.checkpoint import Checkpoint, load_file, settle_model_config

        try:
            saved = load_file(resume, key, mmap=True)
            saved = saved if isinstance(saved, dict) else {}
            model = cfg.model
            if isinstance(saved.get("model_config"), dict):  # as train settles it before resuming
                model = settle_model_config(model, Checkpoint(resume, key, {}, saved, dict(saved["model_config"])))
            check_resumable(saved, model)
        except ValueError as err:
            message = str(err)
            raise UserError(message if resume in message else f"{message} ({resume})") from None
        return  # when resuming, the pretrained weights are not read
    _checkpoint("train.pretrained_model_path", cfg.train.pretrained_model_path, cfg)


def _predict(section: str, cfg: ExperimentConfig) -> None:
    from grounding_dino.actions.sharding import check_processes
    from grounding_dino.predictor import model_path

    options = getattr(cfg, section)
    check_processes(cfg, section, model_path(cfg, section))
    _predictor_model(section, cfg)
    if options.trt_engine:
        _tensorrt(f"{section}.trt_engine", options.trt_engine, _gpu(cfg, section), "running the engine",
                  f"set {section}.checkpoint to the .pth checkpoint or the exported .onnx model instead")


def evaluate(cfg: ExperimentConfig) -> None:
    _predict("evaluate", cfg)
    if cfg.evaluate.train_vocabulary:
        from grounding_dino.evaluation.vocabulary import VocabularyError, training_phrases
        from grounding_dino.formats.files import FormatError

        try:
            training_phrases(cfg.evaluate.train_vocabulary)
        except (VocabularyError, FormatError, OSError) as err:
            raise UserError(str(err) if isinstance(err, VocabularyError) else
                            f"evaluate.train_vocabulary: {err}. Fix: give the training label maps, COCO or "
                            "grounding ODVG files the model was fine-tuned on") from None


def inference(cfg: ExperimentConfig) -> None:
    _predict("inference", cfg)


def export(cfg: ExperimentConfig) -> None:
    _checkpoint("export.checkpoint", cfg.export.checkpoint, cfg)


def quantize(cfg: ExperimentConfig) -> None:
    _onnx_or_checkpoint("quantize.model_path", cfg.quantize.model_path, cfg)


def gen_trt_engine(cfg: ExperimentConfig) -> None:
    from grounding_dino.deploy.builder import check_data_type

    options = cfg.gen_trt_engine
    try:
        check_data_type(options.tensorrt)  # a precision no engine can have is refused wherever TensorRT is
    except ValueError as err:
        raise UserError(str(err)) from None
    if options.onnx_file:
        _tensorrt("gen_trt_engine.onnx_file", options.onnx_file, options.gpu_id, "building an engine from",
                  "use the .onnx model directly (evaluate.checkpoint or inference.checkpoint take it)")
