"""The compiled CPU kernel for multi-scale deformable attention (csrc/ms_deform_attn_cpu.cpp), used when it can be.

It samples, weights and sums each point in one pass, where the plain path materialises every sampled value, then
multiplies and sums them, so it saves both the memory traffic and the time (README, "Performance"). It is built on
first use with
torch.utils.cpp_extension (a C++ compiler and ninja; about 30 s, once per machine and instruction set, cached under
TORCH_EXTENSIONS_DIR). Without them, with GDINO_MSDA_KERNEL=0, on GPU, in another dtype than float32 and bfloat16
(which autocast gives it, and which it computes in float32), or while exporting, the plain PyTorch path runs instead
and gives the same results.
"""
import functools
import hashlib
import logging
import os
import shutil
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ms_deform_attn_cpu.cpp"


def switched_off() -> bool:
    """GDINO_MSDA_KERNEL=0 keeps every call on the plain path."""
    return os.environ.get("GDINO_MSDA_KERNEL", "1") == "0"


def vector_flags() -> Tuple[str, List[str]]:
    """The instruction set to build for: AVX2 + FMA where ATen itself runs its AVX2 (or AVX-512) kernels, else the
    compiler's baseline. Part of the extension's name, so a cache shared by different CPUs never loads a build that
    uses instructions this one lacks (ATEN_CPU_CAPABILITY=default forces the baseline build)."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma"]  # AVX-512 measured no faster for 16-wide heads
    return "baseline", []


def extension_name(isa: str, ninja: str = "") -> str:
    """The build's name, and so its folder in the extensions cache: one per instruction set and per install (this
    source file, the torch it compiles against, the compiler, the ninja that builds it). Installs sharing one folder
    (the checkout's venv and a venv the wheel went into) rebuilt each other's build every time either loaded it, as
    ninja saw another command line: 20-30 s per process. Two ninja versions sharing one folder do the same, as each
    reads the other's build log as stale."""
    install = f"{SOURCE}|{Path(torch.__file__).parent}|{os.environ.get('CXX', '')}|{ninja}"
    return f"gdino_ms_deform_attn_cpu_{isa}_{hashlib.sha1(install.encode()).hexdigest()[:8]}"


def build_tools() -> Tuple[str, str]:
    """(PATH for the build, the ninja it finds): this Python's scripts folder first where ninja is installed there
    (pip's ninja is one of our dependencies). torch runs whichever `ninja` PATH finds, so without this a process
    started as .venv/bin/grounding_dino (venv not activated) built with the system's ninja and one in the activated
    venv with pip's: each rebuilt the kernel the other had built (30-40 s, seven times in one run of the test
    suite), and a machine without a system ninja got no kernel at all."""
    scripts, path = sysconfig.get_path("scripts"), os.environ.get("PATH", "")
    ninja = shutil.which("ninja", path=scripts)
    if ninja:
        return (os.pathsep.join([scripts, path]) if path else scripts), ninja
    return path, shutil.which("ninja", path=path) or ""


@contextmanager
def _search_path(path: str):
    """os.environ["PATH"] set to `path` for the duration (torch's build reads it from there)."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


@functools.lru_cache(maxsize=1)
def kernel() -> Optional[object]:
    """The built extension, or None (and one warning saying why) when it cannot be built here."""
    if switched_off():
        return None
    try:
        from torch.utils.cpp_extension import load

        isa, flags = vector_flags()
        log.info("loading the compiled CPU deformable-attention kernel (%s; built once per machine, ~30 s the first "
                 "time)", isa)
        path, ninja = build_tools()
        with _search_path(path):
            return load(extension_name(isa, ninja), [str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers: all mean "use the plain path"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("compiled CPU deformable attention unavailable (%s); using the plain PyTorch path", reason)
        return None


def usable(value: Tensor, offsets: Tensor, weights: Tensor, reference: Tensor) -> bool:
    """Whether the kernel can run these inputs: float32 or bfloat16 (converted to float32) on CPU, not while tracing
    or exporting, and reference points that need no gradient (ours never do: the encoder's are fixed, the
    decoder's are detached)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or reference.requires_grad:
        return False
    floats = (torch.float32, torch.bfloat16)
    if any(t.device.type != "cpu" or t.dtype not in floats for t in (value, offsets, weights, reference)):
        return False
    return kernel() is not None


class _MSDeformAttnCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, offsets: Tensor, weights: Tensor, reference: Tensor, shapes: Tensor) -> Tensor:
        ctx.save_for_backward(value, offsets, weights, reference, shapes)
        return kernel().forward(value, offsets, weights, reference, shapes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, offsets, weights, reference, shapes = ctx.saved_tensors
        grad_value, grad_offsets, grad_weights = kernel().backward(grad_out.contiguous(), value, offsets, weights,
                                                                   reference, shapes)
        return grad_value, grad_offsets, grad_weights, None, None


def ms_deform_attn_cpu(value: Tensor, shapes: List[Tuple[int, int]], offsets: Tensor, weights: Tensor,
                       reference: Tensor) -> Tensor:
    """value [B,S,nH,d]; offsets [B,Q,nH,nL,nP,2] in grid units; weights [B,Q,nH,nL,nP]; reference [B,Q,nL,2|4]
    in 0..1. Sampling grid = 2 * reference_xy - 1 + offset (times reference_wh for boxes) -> [B,Q,nH*d]."""
    shape_tensor = torch.tensor(shapes, dtype=torch.long)
    return _MSDeformAttnCPU.apply(value.contiguous(), offsets.contiguous(), weights.contiguous(),
                                  reference.contiguous(), shape_tensor)
