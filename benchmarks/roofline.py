"""How far each path is from this machine's limits, in one run: the GEMM peak of every dtype and the memory
bandwidth, then per path its time, its FLOPs (PyTorch's flop counter), its achieved GFLOP/s and the share of the
peak of the dtype it computes in:

    train fp32 / bf16     forward with targets, loss, backward (the frozen text encoder, as training has it);
                          bf16 is torch.autocast("cpu", bfloat16), what train.precision bf16 runs (bf16-mixed)
    eager fp32 / bf16     inference (forward_export under inference_mode) on the caption's own tokens, as the
                          inference and evaluate actions tokenize it; bf16 as their precision bf16 runs it
    ort fp32 / int8       the export action's graph on ONNX Runtime, and that graph quantized by the quantize
                          action's static INT8 path (QDQ), as benchmarks/infer_latency.py builds them; their text
                          is padded to model.max_text_len (the ONNX contract), so they have more FLOPs

Peaks: torch.mm fp32 and bf16, torch._int_mm int8, ONNX Runtime MatMul fp32 and MatMulInteger int8, on square
matrices (--peak-size); on a GPU also tf32 and fp16. Beside them, a 3x3 convolution's fp32 and bf16 rates: the
models' FLOPs are mostly convolutions, so their ratio bounds how much faster a bf16 path can be than fp32.
Bandwidth: a large tensor copy (bytes read + written). The ONNX graphs and the bf16 paths are counted with the fp32
FLOPs (the same arithmetic). The paths run alternately in one process, so machine noise hits all alike. The process
keeps freed memory as run_action does (grounding_dino.memory; GROUNDING_DINO_MALLOC=default for glibc's defaults),
and the table prints the page faults of each run. Then a per-op profile of the two slowest paths and of INT8,
grouped into GEMM/conv, deformable attention, text encoder and the rest (torch.profiler; ONNX Runtime's profiler),
and the bf16 floor of the training step and of eager inference: their fp32 profiles with every GEMM and convolution
at the bf16 / fp32 ratio of the peaks and the rest unchanged.

    .venv/bin/python benchmarks/roofline.py [--config small|swin-t] [--size 960x544] [--batch 1] [--runs 5]
        [--train-size 256] [--train-batch 4] [--threads 2] [--peak-size 2048] [--skip-ort]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import small_config as sc  # noqa: E402

GROUPS = ("GEMM/conv", "deformable attention", "text encoder", "rest")


# ---------------------------------------------------------------------------------------------------------------
# counting


class FlopCount(TorchDispatchMode):
    """FLOPs of every op torch.utils.flop_counter has a formula for, by op. Works under inference_mode, where
    FlopCounterMode's module tracking fails. Under inference_mode composite ops (linear, conv2d) arrive here
    whole, so an op without a formula is decomposed, with this mode on, into the ops that have one."""

    def __init__(self):
        super().__init__()
        self.by_op: dict = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            with self:
                out = func.decompose(*args, **kwargs)
            return func(*args, **kwargs) if out is NotImplemented else out
        out = func(*args, **kwargs)
        self.by_op[func._overloadpacket.__name__] += int(formula(*args, **kwargs, out_val=out))
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def count_flops(run) -> FlopCount:
    with FlopCount() as counter:
        run()
    return counter


# ---------------------------------------------------------------------------------------------------------------
# the machine


def fastest(run, repeats: int) -> float:
    """Fewest seconds of `repeats` calls of `run` after one warm-up call: a peak is the best rate the machine
    reaches, and on a shared host a median of a few calls can land in another tenant's burst (one run measured
    ONNX Runtime's fp32 MatMul at 76 GFLOP/s, against 183 in the run before)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def synchronizer(device: str):
    """What makes a timed call wait for the device's queued work (nothing on CPU)."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def float_dtypes(device: str) -> dict:
    """The float dtypes whose peaks are measured: fp32 and bf16, and fp16 on a GPU."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device == "cuda":
        dtypes["fp16"] = torch.float16
    return dtypes


def torch_peaks(n: int, device: str) -> dict:
    """{dtype: GFLOP/s (GOP/s for int8)} of an n x n x n matrix product in torch."""
    peaks = {}
    sync = synchronizer(device)
    for name, dtype in float_dtypes(device).items():
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        peaks[name] = 2 * n ** 3 / fastest(lambda: (torch.mm(a, b), sync()), 5) / 1e9
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        peaks["tf32"] = 2 * n ** 3 / fastest(lambda: (torch.mm(a, b), sync()), 5) / 1e9
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    peaks["int8"] = 2 * n ** 3 / fastest(lambda: (torch._int_mm(a, b), sync()), 5) / 1e9
    return peaks


def conv_peaks(channels: int, device: str) -> dict:
    """{dtype: GFLOP/s} of a 3x3 convolution, channels x channels on a channels-last 68 x 120 map (a ResNet stage
    at 960x544), in torch: most of the models' FLOPs are convolutions, and oneDNN's convolutions reach a higher
    fp32 rate than torch.mm does, so the GEMM peaks alone would overstate what bf16 can gain over fp32."""
    peaks = {}
    sync = synchronizer(device)
    height, width = 68, 120
    flops = 2 * channels * channels * 9 * height * width
    for name, dtype in float_dtypes(device).items():
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device, dtype=dtype)
        conv = conv.to(memory_format=torch.channels_last)
        maps = torch.randn(1, channels, height, width, device=device, dtype=dtype)
        maps = maps.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            peaks[name] = flops / fastest(lambda: (conv(maps), sync()), 5) / 1e9
    return peaks


def ort_peaks(n: int, threads: int) -> dict:
    """{fp32, int8: GFLOP/s} of ONNX Runtime's MatMul and MatMulInteger on n x n matrices."""
    import numpy as np
    from onnx import TensorProto, helper

    peaks = {}
    for name, op, elem, array in (("fp32", "MatMul", TensorProto.FLOAT, np.random.rand(n, n).astype(np.float32)),
                                  ("int8", "MatMulInteger", TensorProto.INT8,
                                   np.random.randint(-128, 127, (n, n), dtype=np.int8))):
        out_type = TensorProto.FLOAT if name == "fp32" else TensorProto.INT32
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "peak",
                                  [helper.make_tensor_value_info("a", elem, [n, n]),
                                   helper.make_tensor_value_info("b", elem, [n, n])],
                                  [helper.make_tensor_value_info("c", out_type, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        ort = session(model.SerializeToString(), threads)
        peaks[name] = 2 * n ** 3 / fastest(lambda: ort.run(None, {"a": array, "b": array}), 5) / 1e9
    return peaks


def bandwidth(device: str) -> float:
    """GB/s of a 256 MiB tensor copy, counting the bytes read and written."""
    source = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    sync = synchronizer(device)
    seconds = fastest(lambda: (target.copy_(source), sync()), 5)
    return 2 * source.numel() * 4 / seconds / 1e9


def session(model, threads: int, profile_prefix: str = ""):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    # ORT's pool threads spin after each run by default; sharing the cores with the torch paths run next, the spin
    # slowed those by up to 2x (one run measured fp32 training at 836 ms against 470 ms without ORT in the process).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                        providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------------
# the model and its paths


def build(config: str, data_root: Path):
    """(cfg, model, criterion) of the small benchmark config, or Swin-T at full width (MiniLM as text encoder:
    BERT-base's weights are not packaged, and the text encoder is a small share of the FLOPs)."""
    paths = sc.synthetic_data(data_root, num_train=8, num_val=8)
    spec = sc.experiment_spec(paths, str(data_root / "results"))
    spec["dataset"]["quant_calibration_data_sources"] = dict(spec["dataset"]["val_data_sources"])
    if config == "swin-t":
        spec["model"] = {"backbone": "swin_tiny_224_1k", "text_encoder_type": "minilm", "max_text_len": sc.TEXT_LEN}
    return sc.build_ours(spec)


def training_batch(cfg, model, size: int, batch: int):
    from grounding_dino.data import build_dataset, collate_fn

    cfg = copy.deepcopy(cfg)
    cfg.dataset.augmentation.test_random_resize = size
    cfg.dataset.augmentation.random_resize_max_size = size
    dataset = build_dataset(cfg, "val", tokenizer=model.tokenizer)
    images, pixel_mask, targets = collate_fn([dataset[i % len(dataset)] for i in range(batch)])
    sc.attach_positive_maps(model.tokenizer, targets)
    return images, pixel_mask, targets, model.tokenizer([t["caption"] for t in targets])


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_step(model, criterion, batch, bf16: bool):
    images, pixel_mask, targets, text = batch

    def step():
        with autocast(bf16):
            outputs = model(images, pixel_mask, text)
            losses = criterion(outputs, targets)
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        model.zero_grad(set_to_none=True)
    return step


def own_tokens(sample: dict) -> dict:
    """The contract inputs with the text cut to the longest caption's tokens: what the tokenizer gives the
    inference action (padding="longest"), where the export pads every caption to model.max_text_len."""
    length = int(sample["attention_mask"].sum(1).max())
    cut = {name: value[:, :length] for name, value in sample.items() if name != "inputs"}
    cut["text_token_mask"] = sample["text_token_mask"][:, :length, :length]
    return {"inputs": sample["inputs"], **cut}


def eager(model, sample: dict, bf16: bool):
    def run():
        with torch.inference_mode(), autocast(bf16):
            model.forward_export(*sample.values())
    return run


def onnx_files(model, cfg, folder: Path, width: int, height: int, batch: int) -> dict:
    """{"ort fp32": export, "ort int8": its static INT8 QDQ}: the export and quantize actions' code paths."""
    from grounding_dino.actions.export import export_model
    from grounding_dino.actions.quantize import _onnx_calibration, quant_pre_process, static_int8

    cfg = copy.deepcopy(cfg)
    cfg.export.input_width, cfg.export.input_height, cfg.export.batch_size = width, height, batch
    cfg.export.verify = False
    cfg.quantize.num_calibration_batches = 2
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = export_model(model, cfg, folder / "model.onnx")[0]
    prepared = folder / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))
    feeds, _ = _onnx_calibration(cfg, fp32)
    return {"ort fp32": fp32, "ort int8": static_int8(prepared, folder / "int8.onnx", feeds)}


# ---------------------------------------------------------------------------------------------------------------
# where the time goes


def arithmetic_kind(op: str) -> str:
    """"conv", "GEMM" or "rest": which peak bounds a profiled op (forward and backward alike)."""
    low = op.lower()
    if "conv" in low:
        return "conv"
    if any(key in low for key in ("mm", "linear", "matmul", "gemm")):
        return "GEMM"
    return "rest"


def group_of(name: str, inside: set) -> str:
    """GROUPS entry of a profiled op; `inside` names the marked modules the op ran in."""
    if "text" in inside:
        return "text encoder"
    if arithmetic_kind(name) != "rest":
        return "GEMM/conv"
    low = name.lower()
    if "msda" in inside or any(key in low for key in ("deformattn", "grid_sampler", "gridsample")):
        return "deformable attention"
    return "rest"


@contextmanager
def marked(model):
    """record_function ranges around the text encoder ("text") and every deformable attention ("msda")."""
    from grounding_dino.model.ms_deform_attn import MSDeformAttn

    handles, stack = [], []

    def enter(tag):
        def hook(module, args):
            stack.append(torch.autograd.profiler.record_function(f"##{tag}"))
            stack[-1].__enter__()
        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    modules = [("text", model.bert)] + [("msda", m) for m in model.modules() if isinstance(m, MSDeformAttn)]
    for tag, module in modules:
        handles += [module.register_forward_pre_hook(enter(tag)), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def torch_profile(model, run) -> dict:
    """({group: ms}, {op: ms}) of one `run` under torch.profiler (self CPU time of every op, by GROUPS)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with marked(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    groups: dict = defaultdict(float)
    ops: dict = defaultdict(float)
    for event in prof.events():
        inside, parent = set(), event.cpu_parent
        while parent is not None:
            if parent.name.startswith("##"):
                inside.add(parent.name[2:])
            parent = parent.cpu_parent
        if event.name.startswith("##"):
            inside.add(event.name[2:])
        groups[group_of(event.name, inside)] += event.self_cpu_time_total / 1000
        ops[event.name] += event.self_cpu_time_total / 1000
    return dict(groups), dict(ops)


def bf16_floor(fp32_ops: dict, bounds: dict) -> float:
    """The least bf16 / fp32 time of a path, from its fp32 per-op profile: every GEMM and convolution sped up as
    much as the peaks allow (`bounds`: bf16 time / fp32 time at peak, per kind) and everything else unchanged. The
    rest (gathers, softmaxes, norms, copies) is memory- and latency-bound and measured no faster in bf16."""
    spent: dict = defaultdict(float)
    for op, ms in fp32_ops.items():
        spent[arithmetic_kind(op)] += ms
    whole = sum(spent.values()) or 1.0
    return (spent["conv"] * bounds["conv"] + spent["GEMM"] * bounds["GEMM"] + spent["rest"]) / whole


def ort_profile(path: Path, feed: dict, threads: int) -> dict:
    """({group: ms}, {op type: ms}) of one run under ONNX Runtime's profiler (text encoder: nodes under /bert/)."""
    profiled = session(path, threads, str(path.with_suffix("")))
    for _ in range(3):  # the first runs also grow ORT's memory arena: profile the third
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    warm = max(event["ts"] for event in events if event["name"] == "model_run")
    groups: dict = defaultdict(float)
    ops: dict = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm:
            inside = {"text"} if "/bert/" in event["name"] else set()
            groups[group_of(event["args"]["op_name"], inside)] += event["dur"] / 1000
            ops[event["args"]["op_name"]] += event["dur"] / 1000
    return dict(groups), dict(ops)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "swin-t"), default="small")
    parser.add_argument("--size", default="960x544", help="inference input WIDTHxHEIGHT")
    parser.add_argument("--batch", type=int, default=1, help="inference batch")
    parser.add_argument("--train-size", type=int, default=256, help="training images' side (pixels)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per path, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square peak GEMMs")
    parser.add_argument("--skip-ort", action="store_true", help="leave out the ONNX Runtime paths")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from grounding_dino.actions.export import sample_inputs
    from grounding_dino.memory import retain_freed_memory
    from grounding_dino.precision import cpu_bf16_units

    malloc = retain_freed_memory()

    peaks = {f"torch {k}": v for k, v in torch_peaks(args.peak_size, "cpu").items()}
    convs = {f"torch conv {k}": v for k, v in conv_peaks(max(8, min(256, args.peak_size // 8)), "cpu").items()}
    if not args.skip_ort:
        peaks.update({f"ort {k}": v for k, v in ort_peaks(args.peak_size, args.threads).items()})
    if device == "cuda":
        peaks.update({f"cuda {k}": v for k, v in torch_peaks(args.peak_size * 2, "cuda").items()})
    memory = bandwidth("cpu")
    # The least time a bf16 path can take against fp32 where all of it is GEMMs or convolutions at their peaks.
    bounds = {"GEMM": peaks["torch fp32"] / peaks["torch bf16"],
              "conv": convs["torch conv fp32"] / convs["torch conv bf16"]}
    print(f"machine: {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"bf16 units {', '.join(cpu_bf16_units()) or 'none'}; {malloc}")
    print(f"peaks ({args.peak_size}^3 GEMM): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f" GFLOP/s; memory bandwidth (copy) {memory:.1f} GB/s")
    print("conv peaks (3x3, channels-last): " + ", ".join(f"{k} {v:.0f}" for k, v in convs.items())
          + " GFLOP/s; the least bf16 / fp32 time these peaks allow: "
          + ", ".join(f"{k} {v:.2f}" for k, v in bounds.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, model, criterion = build(args.config, tmp / "data")
        batch = training_batch(cfg, model, args.train_size, args.train_batch)
        model.train()
        runs = {"train fp32": train_step(model, criterion, batch, False),
                "train bf16": train_step(model, criterion, batch, True)}
        inference = copy.deepcopy(model).eval()
        sample = sample_inputs(inference, cfg, width, height, args.batch, seed=100)
        prompt = own_tokens(sample)
        runs["eager fp32"], runs["eager bf16"] = eager(inference, prompt, False), eager(inference, prompt, True)
        # A bf16 path is counted in fp32: autocast changes the types, not the arithmetic (its casts have no FLOPs),
        # and under a dispatch mode autocast meets some composite ops (einsum) half cast.
        flops = {name: count_flops(runs[name.replace("bf16", "fp32")]).total for name in runs}
        dtype = {"train fp32": "torch fp32", "train bf16": "torch bf16", "eager fp32": "torch fp32",
                 "eager bf16": "torch bf16"}
        files = {}
        if not args.skip_ort:
            padded_flops = count_flops(eager(inference, sample, False)).total
            files = onnx_files(inference, cfg, tmp / "onnx", width, height, args.batch)
            feed = {k: v.numpy() for k, v in sample.items()}
            for name, path in files.items():
                ort = session(path, args.threads)
                own = [i.name for i in ort.get_inputs()]
                runs[name] = (lambda s, f: lambda: s.run(None, f))(ort, {k: feed[k] for k in own})
                flops[name] = padded_flops
                # The QDQ graph runs fused QLinearConv / MatMulIntegerToFloat kernels, faster than the plain
                # MatMulInteger the ORT int8 peak times, so int8 is held to the machine's int8 peak.
                dtype[name] = "ort fp32" if name == "ort fp32" else "torch int8"
        times: dict = {name: [] for name in runs}
        faults: dict = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # warm-up
        for _ in range(args.runs):
            for name, run in runs.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        medians = {name: statistics.median(values) for name, values in times.items()}

        tokens = prompt["attention_mask"].shape[1]
        print(f"\n{args.config} config; training {args.train_batch} x {args.train_size} px, inference "
              f"{args.batch} x {width}x{height}, text {tokens} tokens (eager) and {sample['input_ids'].shape[1]} "
              f"(ONNX); {args.threads} threads, median of {args.runs} runs")
        print(f"  {'path':<12} {'ms':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'peak':>12} {'of peak':>8} {'/ fp32':>7} "
              f"{'faults':>8}")
        table = {}
        for name in runs:
            rate = flops[name] / medians[name] / 1e9
            share = rate / peaks[dtype[name]]
            base = name.replace("bf16", "fp32").replace("int8", "fp32")
            table[name] = {"ms": medians[name] * 1000, "gflop": flops[name] / 1e9, "gflops": rate,
                           "peak": dtype[name], "of_peak": share, "vs_fp32": medians[name] / medians[base],
                           "faults": statistics.median(faults[name])}
            row = table[name]
            print(f"  {name:<12} {row['ms']:9.1f} {row['gflop']:8.2f} {rate:8.1f} {dtype[name]:>12} "
                  f"{share:8.1%} {row['vs_fp32']:7.2f} {row['faults']:8.0f}")

        @functools.cache
        def profile_of(name: str):
            return torch_profile(model if name.startswith("train") else inference, runs[name])

        # How close bf16 can come to half of fp32's time on this machine, from the fp32 paths' profiles.
        floors = {name.replace("fp32", "bf16"): bf16_floor(profile_of(name)[1], bounds)
                  for name in ("train fp32", "eager fp32")}
        print(f"\nbf16 floor from the fp32 profiles (GEMMs at {bounds['GEMM']:.2f}x and convolutions at "
              f"{bounds['conv']:.2f}x their fp32 time, the peaks' ratios; everything else unchanged): "
              + ", ".join(f"{name} {floor:.2f}x (measured {table[name]['vs_fp32']:.2f}x)"
                          for name, floor in floors.items()))
        for name, floor in floors.items():
            table[name]["bf16_floor"] = floor

        # The two slowest paths, and INT8, whose gap to the int8 peak the profile explains.
        profiled = sorted(runs, key=lambda n: -medians[n])[:2]
        profiled += [name for name in ("ort int8",) if name in runs and name not in profiled]
        for name in profiled:
            if not name.startswith("ort"):
                groups, ops = profile_of(name)
            else:
                path = files[name]
                groups, ops = ort_profile(path, {i.name: feed[i.name] for i in session(path, 1).get_inputs()},
                                          args.threads)
            whole = sum(groups.values()) or 1.0
            print(f"\nwhere {name}'s time goes (ms per run, share):")
            for group in GROUPS:
                print(f"  {group:<22} {groups.get(group, 0.0):9.1f} {groups.get(group, 0.0) / whole:7.1%}")
            top = sorted(ops.items(), key=lambda item: -item[1])[:6]
            print("  top ops: " + ", ".join(f"{op} {ms / whole:.0%}" for op, ms in top))
            table[name]["profile"] = groups
    return {"peaks": peaks, "conv_peaks": convs, "bf16_bounds": bounds, "bandwidth": memory, "paths": table}


if __name__ == "__main__":
    main()
