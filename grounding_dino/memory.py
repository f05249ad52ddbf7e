"""Keep freed tensor memory in the process instead of handing it back to the kernel after every op.

PyTorch on CPU allocates each op's output with the C library's malloc. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, and gives the top of its heap back once more
than 128 KiB is free there. A Grounding DINO forward makes and frees hundreds of such tensors (a [10845 x 512] FFN
activation is 22 MB), so every run touches fresh pages and pays a page fault per 4 KiB. On a 2-core AMD EPYC,
eager fp32 inference at 960x544 of the small benchmark model (text padded to 256 tokens) took 139,000 faults per
run. With mmap off for malloc and a high trim threshold, freed blocks are reused and a warm run takes none:
818 -> 596 ms for that inference, 545 -> 383 ms in bf16, 880 -> 697 ms for a training step (benchmarks/roofline.py
prints the faults per run).

The cost is that the process keeps its peak heap until it exits (the live set does not grow). That suits the
processes that run actions: `run_action` calls `retain_freed_memory()` for every action. A library user who
wants it in their own process calls it too; GROUNDING_DINO_MALLOC=default turns it off everywhere.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_THRESHOLD = 1 << 30  # freed memory at the top of the heap that stays mapped
TOP_PAD = 64 << 20  # each heap extension takes this much extra, so growing the heap is rare
OPT_OUT = "GROUNDING_DINO_MALLOC"


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> str:
    """Configure glibc's malloc as the module docstring says, once per process; returns what was done (for logs).
    Other C libraries (macOS, musl) are left alone."""
    if os.environ.get(OPT_OUT, "").lower() == "default":
        return f"malloc left at its defaults ({OPT_OUT}=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc left at its defaults (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = [libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            libc.mallopt(M_TOP_PAD, TOP_PAD)]
    if not all(done):
        return "malloc left at its defaults (mallopt refused)"
    return "malloc keeps freed memory (no mmap per tensor, trim threshold 1 GiB)"
