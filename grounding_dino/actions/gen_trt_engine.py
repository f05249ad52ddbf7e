"""The gen_trt_engine action: gen_trt_engine.onnx_file -> a serialized TensorRT engine (grounding_dino/deploy/builder.py
builds it)."""
from __future__ import annotations

from pathlib import Path

from grounding_dino.actions import ActionRun
from grounding_dino.config import ExperimentConfig
from grounding_dino.deploy import tensorrt
from grounding_dino.deploy.builder import build_engine, check_data_type


def run_gen_trt_engine(cfg: ExperimentConfig, run: ActionRun) -> None:
    """The `gen_trt_engine` action: gen_trt_engine.onnx_file -> gen_trt_engine.trt_engine (default
    <results>/gen_trt_engine/model.engine)."""
    options = cfg.gen_trt_engine
    check_data_type(options.tensorrt)
    tensorrt(options.gpu_id)
    if not options.onnx_file or not Path(options.onnx_file).is_file():
        raise FileNotFoundError(f"gen_trt_engine.onnx_file: {options.onnx_file} does not exist (export first)")
    engine = Path(options.trt_engine) if options.trt_engine else run.results_dir / "model.engine"
    build_engine(Path(options.onnx_file), engine, options.tensorrt, max_text_len=cfg.model.max_text_len,
                 width=options.input_width, height=options.input_height, gpu_id=options.gpu_id,
                 timing_cache=Path(options.timing_cache) if options.timing_cache else None,
                 verbose=options.verbose)
    message = f"Built {options.tensorrt.data_type} engine {engine}."
    print(message)
    run.report.succeed(message, trt_engine=str(engine))
