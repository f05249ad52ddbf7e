"""The gen_trt_engine action: gen_trt_engine.onnx_file -> a serialized TensorRT engine (grounding_dino/deploy/builder.py
builds it)."""
from __future__ import annotations

from pathlib import Path

from grounding_dino.actions.evaluate import results_folder
from grounding_dino.config import ExperimentConfig
from grounding_dino.deploy import tensorrt
from grounding_dino.deploy.builder import build_engine, check_data_type
from grounding_dino.status import StatusWriter


def run_gen_trt_engine(cfg: ExperimentConfig) -> int:
    """The `gen_trt_engine` action: gen_trt_engine.onnx_file -> gen_trt_engine.trt_engine (default
    <results>/gen_trt_engine/model.engine); returns 0."""
    options = cfg.gen_trt_engine
    results_dir = results_folder(cfg, "gen_trt_engine")
    status = StatusWriter(results_dir / "status.json")
    status.write("STARTED", "Starting TensorRT engine build.")
    try:
        check_data_type(options.tensorrt)
        tensorrt(options.gpu_id)
        if not options.onnx_file or not Path(options.onnx_file).is_file():
            raise FileNotFoundError(f"gen_trt_engine.onnx_file: {options.onnx_file} does not exist (export first)")
        engine = Path(options.trt_engine) if options.trt_engine else results_dir / "model.engine"
        build_engine(Path(options.onnx_file), engine, options.tensorrt, max_text_len=cfg.model.max_text_len,
                     width=options.input_width, height=options.input_height, gpu_id=options.gpu_id,
                     timing_cache=Path(options.timing_cache) if options.timing_cache else None,
                     verbose=options.verbose)
    except Exception as err:
        status.write("FAILURE", f"Engine build failed: {type(err).__name__}: {err}", verbosity="ERROR")
        raise
    message = f"Built {options.tensorrt.data_type} engine {engine}."
    print(message)
    status.write("SUCCESS", message, trt_engine=str(engine))
    return 0
