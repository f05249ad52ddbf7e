"""The "tensorrt" predictor backend: a gen_trt_engine `.engine` run through the TensorRT runtime on one GPU.

evaluate and inference pick it for evaluate.trt_engine / inference.trt_engine (grounding_dino.predictor routes the
`.engine` extension here), so the engine path writes the same files as the PyTorch and ONNX paths. Buffers are
torch CUDA tensors; the engine runs with execute_async_v3 on torch's current stream. The input size and text length
are the engine's; batches larger than its profile's maximum run in slices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import Tensor

from grounding_dino.config import ExperimentConfig
from grounding_dino.deploy import tensorrt
from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder
from grounding_dino.predictor import ONNX_INPUTS, ONNX_OUTPUTS, Predictor, pad_text


def _torch_dtypes(trt) -> Dict[object, torch.dtype]:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table


class TensorRTPredictor(Predictor):
    name = "tensorrt"

    def __init__(self, path: str, tokenizer, gpu_id: int = 0):
        trt = tensorrt(gpu_id)
        self.device = torch.device(f"cuda:{gpu_id}")
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT cannot load this engine (built by another TensorRT version or for "
                             "another GPU?); rebuild it with gen_trt_engine on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if "input_ids" not in names and "phrase_scores" in names:
            raise ValueError(f"{path} was built from a fixed-vocabulary export (export.fixed_captions): deploy "
                             "evaluate/inference prompt engines with text; read its phrase_scores output in your "
                             "own runtime (DeepStream), or build the engine from an export without fixed_captions")
        if set(names) != set(ONNX_INPUTS + ONNX_OUTPUTS):
            raise ValueError(f"{path}: tensors {names} are not the export contract's "
                             f"{list(ONNX_INPUTS + ONNX_OUTPUTS)}")
        dtypes = _torch_dtypes(trt)
        self.dtypes = {name: dtypes[self.engine.get_tensor_dtype(name)] for name in names}
        batch, _, height, width = self.engine.get_tensor_shape("inputs")
        self.text_len = self.engine.get_tensor_shape("input_ids")[1]
        if self.text_len != tokenizer.max_text_len:
            raise ValueError(f"{path} takes {self.text_len} text tokens but model.max_text_len is "
                             f"{tokenizer.max_text_len}; set model.max_text_len to {self.text_len}")
        self.fixed_batch = batch if batch > 0 else None
        self.max_batch = batch if batch > 0 else self.engine.get_tensor_profile_shape("inputs", 0)[2][0]
        super().__init__(tokenizer, input_size=(width, height), pad_text=True)

    @classmethod
    def load(cls, path: str, cfg: ExperimentConfig, section: str = "evaluate") -> "TensorRTPredictor":
        gpu_ids = getattr(getattr(cfg, section), "gpu_ids", None) or [0]
        tensorrt(gpu_ids[0])  # fail fast, before the tokenizer loads
        tokenizer = CaptionTokenizer(resolve_text_encoder(cfg.model.text_encoder_type), cfg.model.max_text_len)
        return cls(path, tokenizer, gpu_ids[0])

    def _run(self, feed: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        for name in ONNX_INPUTS:
            self.context.set_input_shape(name, tuple(feed[name].shape))
            self.context.set_tensor_address(name, feed[name].data_ptr())
        outputs = {}
        for name in ONNX_OUTPUTS:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        stream.synchronize()
        return outputs["pred_logits"].float(), outputs["pred_boxes"].float()

    @torch.inference_mode()
    def predict(self, images, pixel_mask, text):
        width, height = self.input_size
        if tuple(images.shape[-2:]) != (height, width):
            raise ValueError(f"the engine takes {width}x{height} images, got {images.shape[-1]}x{images.shape[-2]}; "
                             "resize inputs to the export size")
        if pixel_mask is not None and bool(pixel_mask.any()):
            raise ValueError("the engine has no pixel mask: pass unpadded images of the export size")
        text = pad_text(text, self.text_len)
        feed = {"inputs": images, **{k: text[k] for k in ONNX_INPUTS[1:]}}
        feed = {k: v.to(self.device, self.dtypes[k]).contiguous() for k, v in feed.items()}
        logits, boxes = [], []
        for start in range(0, len(images), self.max_batch):
            part = {k: v[start:start + self.max_batch] for k, v in feed.items()}
            count = len(part["inputs"])
            if self.fixed_batch and count < self.fixed_batch:  # fill a fixed batch with copies of its first row
                part = {k: torch.cat([v, v[:1].expand(self.fixed_batch - count, *v.shape[1:])]).contiguous()
                        for k, v in part.items()}
            out_logits, out_boxes = self._run(part)
            logits.append(out_logits[:count].cpu())
            boxes.append(out_boxes[:count].cpu())
        return torch.cat(logits), torch.cat(boxes)
