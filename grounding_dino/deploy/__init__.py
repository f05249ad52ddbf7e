"""TensorRT deployment: the gen_trt_engine action (builder.py) and the `.engine` predictor backend (predictor.py).

TensorRT is optional (pip extra 'deploy') and needs an NVIDIA GPU; `tensorrt()` is the one import check, so every
entry point fails fast with one line when either is missing. Importing this package imports neither torch nor
tensorrt.
"""
from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'grounding-dino-skillbank[deploy]'"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is one line saying which and what to do."""


def tensorrt(gpu_id: int = 0):
    """The tensorrt module, after checking that it imports and that CUDA GPU `gpu_id` is visible."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as err:
        raise TensorRTUnavailable(f"TensorRT is not installed ({err}): {INSTALL_HINT} on a machine with an NVIDIA "
                                  "GPU") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs an NVIDIA GPU with CUDA and none is visible here; run this action "
                                  "on a GPU machine")
    if gpu_id >= torch.cuda.device_count():
        raise TensorRTUnavailable(f"GPU {gpu_id} does not exist; {torch.cuda.device_count()} CUDA device(s) are "
                                  "visible")
    return trt


def always_strongly_typed(trt) -> bool:
    """TensorRT 11 removed the FP16 builder flag: precision comes from the ONNX types alone."""
    return not hasattr(trt.BuilderFlag, "FP16")
