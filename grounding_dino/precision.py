"""The numeric precision a run uses: the spec's train/evaluate/inference `precision`, with `auto` resolved here.

`auto` is bf16 where the hardware has bf16 matrix units and fp32 elsewhere: on CUDA when the GPU supports bf16, on
CPU when it has AVX512_BF16 or AMX (checked at run time, so one spec runs on any machine). Without those units bf16
is emulated and slower than fp32, so `auto` never picks it there. Every action prints and records what it chose.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ContextManager, Tuple

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> Tuple[str, ...]:
    """The bf16 instruction sets this CPU has (CPU_BF16_FLAGS), from torch's own probe and /proc/cpuinfo."""
    found = set()
    probe = getattr(torch, "cpu", None)
    if probe is not None and getattr(probe, "_is_avx512_bf16_supported", lambda: False)():
        found.add("avx512_bf16")
    if probe is not None and getattr(probe, "_is_amx_tile_supported", lambda: False)():
        found.add("amx_bf16")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
        found.update(flag for flag in CPU_BF16_FLAGS if flag in flags)
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in found)


def resolve(requested: str, device_type: str) -> Tuple[str, str]:
    """(precision that runs: fp32, fp16 or bf16; why) for the spec's `requested` value on `device_type`."""
    if requested != "auto":
        return requested, "set in the spec"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name()} supports bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name()} has no bf16"
    units = cpu_bf16_units()
    if units:
        return "bf16", f"auto: the CPU has {' and '.join(units)}"
    return "fp32", "auto: the CPU has neither AVX512_BF16 nor AMX, so bf16 would be emulated"


def autocast(precision: str, device_type: str) -> ContextManager:
    """Mixed precision for inference: torch.autocast in bf16/fp16, nothing for fp32. Weights stay fp32, so the
    model and its checkpoint are the same whichever precision runs."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)
