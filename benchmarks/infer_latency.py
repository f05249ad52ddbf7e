"""Median inference latency at 960x544, batch 1: PyTorch eager vs ONNX Runtime (float, GridSample or gather
deformable attention) vs ONNX Runtime (INT8 QDQ).

The small config of small_config.py (resnet_18, hidden 128, 2+2 layers, 100 queries, max_text_len 256, the MiniLM
text encoder) with random-init weights is exported with the export action's code (twice: export.msda_impl
grid_sample and gather, the TensorRT-safe graph), quantized with the quantize
action's static INT8 path (calibrated on rendered shape images with their captions), and the three run on the same
inputs alternately (eager, ORT, INT8, eager, ...) in one process so machine noise hits all alike. Prints the
medians and the ratios to eager (goal: ONNX Runtime <= 0.6x eager).

    .venv/bin/python benchmarks/infer_latency.py [--runs 10] [--threads 2] [--opt-level all]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_config as sc  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)
import torch  # noqa: E402

WIDTH, HEIGHT = 960, 544
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def build(folder: Path):
    from grounding_dino.config import load_experiment
    from grounding_dino.actions.export import export_model, sample_inputs
    from grounding_dino.model import build_model
    from grounding_dino.actions.quantize import quant_pre_process, static_int8

    model_section = sc.experiment_spec(dict.fromkeys(("train_image_dir", "train_json_file", "label_map",
                                                      "val_image_dir", "val_json_file"), ""), str(folder))["model"]
    cfg = load_experiment({"model": model_section,
                           "export": {"input_width": WIDTH, "input_height": HEIGHT, "batch_size": -1}})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    float_path, check = export_model(model, cfg, folder / "model.onnx")
    print(f"export check: max |ORT - eager| logits {check.max_abs_diff_logits:.2e}, boxes "
          f"{check.max_abs_diff_boxes:.2e}", flush=True)
    prepared = folder / "prepared.onnx"
    quant_pre_process(str(float_path), str(prepared))
    feeds = ({k: v.numpy() for k, v in sample_inputs(model, cfg, WIDTH, HEIGHT, 1, seed=s).items()} for s in range(8))
    int8_path = static_int8(prepared, folder / "model_int8.onnx", feeds)
    sample = sample_inputs(model, cfg, WIDTH, HEIGHT, 1, seed=100)
    cfg.export.msda_impl = "gather"
    gather_path, check = export_model(model, cfg, folder / "model_gather.onnx")
    print(f"gather export check: max |ORT - eager| logits {check.max_abs_diff_logits:.2e}, boxes "
          f"{check.max_abs_diff_boxes:.2e}", flush=True)
    return model, float_path, gather_path, int8_path, sample


def session(path: Path, threads: int, level: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, OPT_LEVELS[level])
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (after 2 warm-up runs each)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--opt-level", choices=sorted(OPT_LEVELS), default="all", help="ONNX Runtime graph "
                        "optimization level")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, float_path, gather_path, int8_path, sample = build(Path(tmp))
        feed = {k: v.numpy() for k, v in sample.items()}
        ort_float, ort_gather, ort_int8 = (session(path, args.threads, args.opt_level)
                                           for path in (float_path, gather_path, int8_path))

        def eager():
            with torch.inference_mode():
                model.forward_export(*sample.values())

        runners = {"pytorch eager": eager,
                   "onnxruntime fp32": lambda: ort_float.run(None, feed),
                   "ort fp32 gather": lambda: ort_gather.run(None, feed),
                   "onnxruntime int8": lambda: ort_int8.run(None, feed)}
        times = {name: [] for name in runners}
        for round_ in range(args.runs + 2):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["pytorch eager"])
    print(f"\n{WIDTH}x{HEIGHT}, batch 1, {args.threads} threads, ORT optimization {args.opt_level}, {args.runs} runs")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<18} median {median * 1000:8.1f} ms   ratio to eager {median / base:5.2f}")


if __name__ == "__main__":
    main()
