"""What each action checks before its results folder exists: the model files it reads.

`run_action` runs an action's check first, so a checkpoint that is missing, is not a checkpoint, or was trained
with another architecture, and a TensorRT engine on a machine without TensorRT, stop the run with one UserError
(the spec key, the path, the fix) before anything is written. The SDK's preflight checks paths and data without
torch; these checks need torch (reading a checkpoint) or the runtime's packages (TensorRT), so they live here.

A checkpoint is read as the action will read it, torch.load(weights_only=True), but memory-mapped: only the small
dicts around the tensors are read now (the saved `model_config`), not the weights.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

from grounding_dino.config import ExperimentConfig
from grounding_dino.errors import UserError

# torch.save's legacy (pre-zip) format is a pickle stream; every pickle protocol >= 2 starts with this opcode.
_PICKLE_PROTO = b"\x80"


def read_checkpoint(key: str, path: str) -> Any:
    """The object torch.load(weights_only=True) returns for `path`, named in errors as spec key `key`."""
    import torch

    file = Path(path)
    fix = f"Fix: point {key} at a .pth checkpoint written by train (or export the model first)."
    if not file.is_file():
        raise UserError(f"{key}: {path} does not exist. {fix}")
    if file.stat().st_size == 0:
        raise UserError(f"{key}: {path} is an empty file, not a checkpoint. {fix}")
    zipped = zipfile.is_zipfile(file)
    if not zipped:
        with open(file, "rb") as fh:
            if fh.read(1) != _PICKLE_PROTO:
                raise UserError(f"{key}: {path} is not a PyTorch checkpoint (neither a torch.save archive nor a "
                                f"legacy torch.save pickle; a truncated copy or another kind of file). {fix}")
    try:
        # mmap needs the zip format; a legacy file is read whole, as the action would read it
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        raise UserError(f"{key}: {path} cannot be read with torch.load(weights_only=True): {_reason(err)}. "
                        f"{fix}") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise UserError(f"{key}: {path} is not a readable PyTorch checkpoint ({_reason(err)}). {fix}") from None


def _reason(err: BaseException) -> str:
    """The informative line of torch's error (its weights-only message opens with advice to load unsafely)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].strip()
    return lines[0] if lines else type(err).__name__


def check_architecture(key: str, path: str, checkpoint: Any, cfg: ExperimentConfig) -> None:
    """Refuse a checkpoint whose saved model settings disagree with the spec's structural model keys."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{key}: {path} holds a {type(checkpoint).__name__}, not a checkpoint dict. Fix: point "
                        f"{key} at a .pth checkpoint written by train.")
    saved = checkpoint.get("model_config")
    if not isinstance(saved, dict):
        return  # official, Hugging Face and TAO weights carry no settings; their loader checks the shapes
    from grounding_dino.model.checkpoint import config_conflicts

    conflicts = config_conflicts(saved, cfg.model)
    if conflicts:
        raise UserError(f"{key}: {path} was trained with another architecture. Fix: set these keys to the "
                        f"checkpoint's values, or point {key} at a checkpoint of this architecture:\n  "
                        + "\n  ".join(conflicts))


def _checkpoint(key: str, path: Optional[str], cfg: ExperimentConfig) -> None:
    if path:
        check_architecture(key, path, read_checkpoint(key, path), cfg)


def _model_file(key: str, path: Optional[str], cfg: ExperimentConfig) -> None:
    """A .pth checkpoint is read and compared; any other model file (an .onnx) must exist."""
    if not path:
        return
    if Path(path).suffix.lower() == ".onnx":
        if not Path(path).is_file():
            raise UserError(f"{key}: {path} does not exist. Fix: point {key} at an existing .onnx file (export "
                            "writes one) or a .pth checkpoint.")
        return
    _checkpoint(key, path, cfg)


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
    resume = cfg.train.resume_training_checkpoint_path
    if resume:
        key = "train.resume_training_checkpoint_path"
        checkpoint = read_checkpoint(key, resume)
        from grounding_dino.lightning_module import check_resumable

        try:
            check_resumable(checkpoint if isinstance(checkpoint, dict) else {}, cfg.model)
        except ValueError as err:
            raise UserError(f"{err} ({resume})") from None
        return  # when resuming, the pretrained weights are not read
    _checkpoint("train.pretrained_model_path", cfg.train.pretrained_model_path, cfg)


def _predict(section: str, cfg: ExperimentConfig) -> None:
    options = getattr(cfg, section)
    _model_file(f"{section}.checkpoint", options.checkpoint, cfg)
    if options.trt_engine:
        _tensorrt(f"{section}.trt_engine", options.trt_engine, (options.gpu_ids or [0])[0], "running the engine",
                  f"set {section}.checkpoint to the .pth checkpoint or the exported .onnx model instead")


def evaluate(cfg: ExperimentConfig) -> None:
    _predict("evaluate", cfg)


def inference(cfg: ExperimentConfig) -> None:
    _predict("inference", cfg)


def export(cfg: ExperimentConfig) -> None:
    _checkpoint("export.checkpoint", cfg.export.checkpoint, cfg)


def quantize(cfg: ExperimentConfig) -> None:
    _model_file("quantize.model_path", cfg.quantize.model_path, cfg)


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
