"""benchmarks/roofline.py: its flop counter counts a GEMM exactly, and the whole run works at a tiny size (the
figures it prints are not checked here: timing belongs to the benchmark's own run)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import roofline  # noqa: E402


def test_flop_counter_counts_a_gemm_exactly_also_under_inference_mode():
    a, b, bias = torch.randn(3, 5), torch.randn(5, 7), torch.randn(7)
    with torch.inference_mode():
        counted = roofline.count_flops(lambda: torch.addmm(bias, a, b))
    assert dict(counted.by_op) == {"addmm": 2 * 3 * 5 * 7}
    linear, conv = torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3)
    with torch.inference_mode():  # composite ops arrive whole there
        assert roofline.count_flops(lambda: linear(a)).total == 2 * 3 * 5 * 7
        assert roofline.count_flops(lambda: conv(torch.randn(1, 3, 6, 6))).total == 2 * (4 * 4 * 4) * (3 * 3 * 3)
    counted = roofline.count_flops(lambda: linear(a.requires_grad_()).sum().backward())
    assert counted.total == 3 * (2 * 3 * 5 * 7)  # forward, and the gradients of the input and the weight


def test_ops_fall_into_the_profile_groups():
    assert roofline.group_of("aten::addmm", set()) == "GEMM/conv"
    assert roofline.group_of("aten::addmm", {"text"}) == "text encoder"
    assert roofline.group_of("aten::add", {"msda"}) == "deformable attention"
    assert roofline.group_of("GridSample", set()) == "deformable attention"
    assert roofline.group_of("MatMulInteger", set()) == "GEMM/conv"
    assert roofline.group_of("aten::layer_norm", set()) == "rest"


def test_the_bf16_floor_speeds_up_only_gemms_and_convolutions_by_the_peaks_ratios():
    assert [roofline.arithmetic_kind(op) for op in ("aten::convolution_backward", "aten::mkldnn_convolution",
                                                    "aten::addmm", "aten::bmm", "FusedMatMul", "Gemm",
                                                    "aten::_softmax", "_MSDeformAttnCPU")] == [
        "conv", "conv", "GEMM", "GEMM", "GEMM", "GEMM", "rest", "rest"]
    fp32_ms = {"aten::mkldnn_convolution": 40.0, "aten::convolution_backward": 10.0, "aten::addmm": 30.0,
               "aten::_softmax": 20.0}
    floor = roofline.bf16_floor(fp32_ms, {"conv": 0.5, "GEMM": 0.4})
    assert floor == (50 * 0.5 + 30 * 0.4 + 20) / 100


def test_roofline_runs_end_to_end_at_a_tiny_size(capsys):
    result = roofline.main(["--size", "96x96", "--train-size", "96", "--train-batch", "1", "--runs", "1",
                            "--peak-size", "64", "--skip-ort"])
    assert set(result["paths"]) == {"train fp32", "train bf16", "eager fp32", "eager bf16"}
    assert all(row["gflop"] > 0 and row["ms"] > 0 and row["faults"] >= 0 for row in result["paths"].values())
    assert {"torch fp32", "torch bf16", "torch int8"} <= set(result["peaks"])
    assert set(result["conv_peaks"]) == {"torch conv fp32", "torch conv bf16"}
    assert set(result["bf16_bounds"]) == {"GEMM", "conv"} and all(v > 0 for v in result["bf16_bounds"].values())
    profiled = [row["profile"] for row in result["paths"].values() if "profile" in row]
    assert len(profiled) == 2 and all(set(groups) <= set(roofline.GROUPS) for groups in profiled)
    assert all(result["paths"][name]["bf16_floor"] > 0 for name in ("train bf16", "eager bf16"))
    out = capsys.readouterr().out
    assert "where" in out and "bf16 floor" in out


def test_eager_paths_get_the_tokens_the_inference_action_gives():
    """own_tokens cuts the export's padded text to what the tokenizer gives inference (padding="longest")."""
    from grounding_dino.model.text import CaptionTokenizer, resolve_text_encoder

    tokenizer = CaptionTokenizer(resolve_text_encoder("minilm"), 256)
    captions = ["red circle . blue square .", "green triangle ."]
    padded = tokenizer(captions, pad_to_max=True)
    sample = {"inputs": torch.zeros(2, 3, 8, 8), **padded}
    cut = roofline.own_tokens(sample)
    longest = tokenizer(captions)
    assert cut["inputs"] is sample["inputs"]
    assert set(cut) == {"inputs", *longest}
    for name, value in longest.items():
        assert torch.equal(cut[name], value), name
