"""GPU check of the TensorRT path at full size: Swin-T + BERT-base-sized Grounding DINO (random init), 900 queries.

Exports the model with the export action's code (960x544, dynamic batch, verified against PyTorch on ONNX Runtime),
builds an FP16 engine with gen_trt_engine's builder, runs it through the tensorrt predictor backend, and compares
with PyTorch eager on the GPU: max |diff| on finite logits and on boxes, and median latency TRT / eager (goal
<= 1/3). Prints one JSON summary. The BERT-base text encoder is a local folder: BERT-base's config with random
weights and the MiniLM vocabulary (nothing is downloaded).

    python benchmarks/gpu_trt_check.py [--runs 20] [--fp32]      # on a CUDA machine with the 'deploy' extra
    python benchmarks/gpu_trt_check.py --dry [--width 320 --height 192]   # CPU: export + ORT check, no TensorRT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def bert_base_folder(folder: Path) -> str:
    from transformers import BertConfig

    from grounding_dino.model.text import write_small_text_encoder

    write_small_text_encoder(folder, hidden_size=768, num_layers=12, num_heads=12)
    BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072).save_pretrained(
        folder)
    return str(folder)


def spec(folder: Path, width: int, height: int, fp16: bool) -> dict:
    return {
        "results_dir": str(folder),
        "model": {"backbone": "swin_tiny_224_1k", "num_queries": 900, "max_text_len": 256,
                  "text_encoder_type": bert_base_folder(folder / "bert-base"), "log_scale": "auto",
                  "class_embed_bias": True},
        "export": {"input_width": width, "input_height": height, "batch_size": -1, "verify_tolerance": 1e-2},
        "gen_trt_engine": {"input_width": width, "input_height": height,
                           "tensorrt": {"data_type": "FP16" if fp16 else "FP32", "min_batch_size": 1,
                                        "opt_batch_size": 1, "max_batch_size": 2}},
    }


def median_seconds(run, runs: int, sync) -> float:
    for _ in range(3):
        run()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU: export and ONNX Runtime check only, no TensorRT")
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fp32", action="store_true", help="FP32 engine instead of FP16")
    args = parser.parse_args()

    from grounding_dino.config import load_experiment
    from grounding_dino.actions.export import export_model, sample_inputs
    from grounding_dino.model import build_model
    from grounding_dino.predictor import ONNX_INPUTS

    summary: dict = {"mode": "dry" if args.dry else "tensorrt", "input": f"{args.width}x{args.height}"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = load_experiment(spec(folder, args.width, args.height, fp16=not args.fp32))
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        summary["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        start = time.perf_counter()
        onnx_path, check = export_model(model, cfg, folder / "model.onnx")
        summary["export_s"] = round(time.perf_counter() - start, 1)
        summary["onnxruntime_vs_torch"] = check.kpi()
        if not args.dry:
            summary.update(tensorrt_check(model, cfg, onnx_path, folder, args.runs, sample_inputs, ONNX_INPUTS))
    print(json.dumps(summary, indent=2))


def tensorrt_check(model, cfg, onnx_path: Path, folder: Path, runs: int, sample_inputs, names) -> dict:
    import numpy as np

    from grounding_dino.deploy import tensorrt
    from grounding_dino.deploy.builder import build_engine
    from grounding_dino.deploy.predictor import TensorRTPredictor

    trt = tensorrt(0)
    options = cfg.gen_trt_engine
    start = time.perf_counter()
    engine = build_engine(onnx_path, folder / "model.engine", options.tensorrt, max_text_len=cfg.model.max_text_len,
                          width=options.input_width, height=options.input_height)
    build_s = time.perf_counter() - start
    predictor = TensorRTPredictor(str(engine), model.tokenizer, 0)
    model = model.cuda()
    feed = sample_inputs(model, cfg, options.input_width, options.input_height, 1, seed=3)
    cuda_feed = [feed[name].cuda() for name in names]
    text = {name: feed[name] for name in names[1:]}
    with torch.inference_mode():
        expected = [t.float().cpu().numpy() for t in model.forward_export(*cuda_feed)]
    got = [t.numpy() for t in predictor.predict(feed["inputs"], None, text)]
    finite = np.isfinite(expected[0]) & np.isfinite(got[0])

    def eager():
        with torch.inference_mode():
            model.forward_export(*cuda_feed)

    eager_s = median_seconds(eager, runs, torch.cuda.synchronize)
    trt_s = median_seconds(lambda: predictor.predict(feed["inputs"], None, text), runs, torch.cuda.synchronize)
    return {
        "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "data_type": options.tensorrt.data_type,
        "engine_build_s": round(build_s, 1),
        "finite_pattern_equal": bool(np.array_equal(np.isfinite(expected[0]), np.isfinite(got[0]))),
        "max_abs_diff_logits": float(np.abs(got[0][finite] - expected[0][finite]).max()),
        "max_abs_diff_boxes": float(np.abs(got[1] - expected[1]).max()),
        "eager_ms": round(eager_s * 1000, 2), "tensorrt_ms": round(trt_s * 1000, 2),
        "ratio_trt_over_eager": round(trt_s / eager_s, 3), "goal_ratio": round(1 / 3, 3),
        "note": "TensorRT latency includes host<->device copies of inputs and outputs (the predictor's API)",
    }


if __name__ == "__main__":
    sys.exit(main())
