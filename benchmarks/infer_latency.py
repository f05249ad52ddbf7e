"""Inference latency and accuracy of every deploy path, side by side in one run, batch 1:

    pytorch eager     the checkpoint in PyTorch
    ort fp32          the export (GridSample deformable attention), ONNX Runtime
    ort fp32 gather   the export with export.msda_impl=gather (the TensorRT-safe graph)
    ort int8          the export quantized by the quantize action's static INT8 path (QDQ, calibrated with captions)
    fixed fp32        export.fixed_captions: the text encoder run once at export, the image the only input
    fixed int8        that graph quantized the same way

The model is the shipped base model (runner/base_model.py: resnet_10t, MiniLM), whose synthetic shapes it detects,
so each path's mAP50 on the base model's validation images is printed next to its latency (exported at the base
model's 256 px for that; the latency is measured at --size). The paths run alternately (eager, ort, ..., eager, ...)
in one process, so machine noise hits all alike. Ratios are to eager, and to ORT fp32 for the quantized graphs.

    .venv/bin/python benchmarks/infer_latency.py [--runs 10] [--threads 2] [--size 960x544] [--val-images 40]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PATHS = ("pytorch eager", "ort fp32", "ort fp32 gather", "ort int8", "fixed fp32", "fixed int8")


def deploy_files(model, cfg, folder: Path, width: int, height: int, phrases, calibration_cfg) -> dict:
    """{path name: ONNX file} of every exported path at width x height (eager has none)."""
    from grounding_dino.actions.export import export_fixed_vocabulary, export_model
    from grounding_dino.actions.quantize import (_keep_fixed_vocabulary, _onnx_calibration, quant_pre_process,
                                                 static_int8)

    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.export.input_width, cfg.export.input_height, cfg.export.batch_size = width, height, -1
    files = {"ort fp32": export_model(model, cfg, folder / "full.onnx")[0]}
    cfg.export.msda_impl = "gather"
    files["ort fp32 gather"] = export_model(model, cfg, folder / "gather.onnx")[0]
    cfg.export.msda_impl, cfg.export.fixed_captions = "grid_sample", list(phrases)
    files["fixed fp32"] = export_fixed_vocabulary(model, cfg, folder / "fixed.onnx")[0]
    for source, name in (("ort fp32", "ort int8"), ("fixed fp32", "fixed int8")):
        prepared = folder / f"{name.replace(' ', '_')}_prepared.onnx"
        quant_pre_process(str(files[source]), str(prepared))
        feeds, _ = _onnx_calibration(calibration_cfg, files[source])
        files[name] = static_int8(prepared, folder / f"{name.replace(' ', '_')}.onnx", feeds)
        _keep_fixed_vocabulary(files[source], files[name])
    return files


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, feed: dict, threads: int, runs: int = 3) -> list:
    """[(op type, share of node time, ms per run)] of `path` under ONNX Runtime's profiler, largest first."""
    import json

    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    profiled = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    own = [i.name for i in profiled.get_inputs()]
    for _ in range(runs):
        profiled.run(None, {k: feed[k] for k in own})
    events = json.loads(Path(profiled.end_profiling()).read_text())
    totals: dict = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0) + event["dur"]
    whole = sum(totals.values())
    return sorted(((op, us / whole, us / 1000 / runs) for op, us in totals.items()), key=lambda r: -r[1])


def accuracy(model, eval_cfg, files: dict) -> dict:
    """{path: mAP50} on the validation set; the eager model sees the ONNX models' fixed input size."""
    from grounding_dino.actions.evaluate import evaluate
    from grounding_dino.predictor import OnnxPredictor, TorchPredictor

    found = {}
    for name in PATHS:
        if name == "pytorch eager":
            predictor = TorchPredictor(model, "cpu")
        else:
            predictor = OnnxPredictor(str(files[name]), model.tokenizer)
        found[name] = evaluate(eval_cfg, predictor)["mAP50"]
        print(f"  {name:<16} mAP50 {found[name]:.4f}", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per path (after 2 warm-up runs each)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--size", default="960x544", help="latency input WIDTHxHEIGHT")
    parser.add_argument("--val-images", type=int, default=40, help="validation images scored per path")
    parser.add_argument("--profile", action="store_true", help="also print ONNX Runtime's per-op-type time of the "
                        "fp32 and INT8 graphs (where INT8 wins and loses)")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)

    from grounding_dino.actions.export import sample_inputs
    from grounding_dino.config import load_experiment
    from grounding_dino.predictor import TorchPredictor
    from runner import base_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = base_model.generate_data(tmp / "data", num_train=0, num_val=args.val_images)
        eval_cfg = load_experiment(base_model.eval_spec(data["val_image_dir"], data["val_json_file"],
                                                        str(base_model.BASE_MODEL), str(tmp / "eval")))
        model = TorchPredictor.load(str(base_model.BASE_MODEL), eval_cfg).model.eval()
        phrases = [c["name"] for c in sorted(eval_cfg_categories(eval_cfg), key=lambda c: c["id"])]
        calibration_cfg = copy.deepcopy(eval_cfg)
        calibration_cfg.dataset.quant_calibration_data_sources = calibration_cfg.dataset.test_data_sources
        calibration_cfg.quantize.num_calibration_batches = 4

        size = base_model.IMAGE_SIZE
        print(f"accuracy: {args.val_images} validation images, exported at {size}x{size}", flush=True)
        eval_cfg.evaluate.input_width = eval_cfg.evaluate.input_height = size
        mAP50 = accuracy(model, eval_cfg, deploy_files(model, eval_cfg, tmp / "accuracy", size, size, phrases,
                                                       calibration_cfg))

        print(f"latency: exporting at {width}x{height}", flush=True)
        files = deploy_files(model, eval_cfg, tmp / "latency", width, height, phrases, calibration_cfg)
        sizes = {f: os.path.getsize(path) for f, path in files.items()}
        cfg = copy.deepcopy(eval_cfg)
        sample = sample_inputs(model, cfg, width, height, 1, seed=100)
        text = model.tokenizer([" . ".join(phrases) + " ."], pad_to_max=True)
        sample.update({k: text[k] for k in sample if k != "inputs"})
        feed = {k: v.numpy() for k, v in sample.items()}
        sessions = {name: session(path, args.threads) for name, path in files.items()}

        def eager():
            with torch.inference_mode():
                model.forward_export(*sample.values())

        def onnx(name):
            own = [i.name for i in sessions[name].get_inputs()]
            return lambda: sessions[name].run(None, {k: feed[k] for k in own})

        if args.profile:
            for name in ("ort fp32", "ort int8", "fixed int8"):
                print(f"\nONNX Runtime profile of {name} (op type, share of node time, ms per image):")
                for op, share, ms in op_profile(files[name], feed, args.threads)[:12]:
                    print(f"  {op:<24} {share:6.1%} {ms:9.1f}")
        runners = {name: eager if name == "pytorch eager" else onnx(name) for name in PATHS}
        times = {name: [] for name in PATHS}
        for round_ in range(args.runs + 2):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{width}x{height}, batch 1, {args.threads} threads, {args.runs} runs; mAP50 on {args.val_images} "
          f"base-model validation images at {size}x{size}")
    print(f"  {'path':<16} {'median ms':>10} {'/ eager':>8} {'/ own fp32':>10} {'MB':>7} {'mAP50':>7}")
    for name in PATHS:
        float_ref = medians["fixed fp32" if name.startswith("fixed") else "ort fp32"]
        megabytes = f"{sizes[name] / 2**20:7.1f}" if name in sizes else f"{'':>7}"
        print(f"  {name:<16} {medians[name] * 1000:10.1f} {medians[name] / medians['pytorch eager']:8.2f} "
              f"{medians[name] / float_ref:10.2f} {megabytes} {mAP50[name]:7.4f}")


def eval_cfg_categories(cfg) -> list:
    import json

    return json.loads(Path(cfg.dataset.test_data_sources.json_file).read_text())["categories"]


if __name__ == "__main__":
    main()
