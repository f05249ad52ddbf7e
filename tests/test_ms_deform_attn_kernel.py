"""The compiled CPU deformable-attention kernel against the plain PyTorch path: same outputs, same gradients."""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from grounding_dino.model import ms_deform_attn_cpu
from grounding_dino.model.ms_deform_attn import MSDeformAttn

SHAPES = [(12, 10), (6, 5), (3, 3), (2, 2)]
SIZE = sum(h * w for h, w in SHAPES)


def _buildable() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(scope="module")
def kernel():
    if ms_deform_attn_cpu.switched_off():
        pytest.skip("GDINO_MSDA_KERNEL=0 turns the CPU kernel off")
    if ms_deform_attn_cpu.kernel() is None:
        if _buildable():
            pytest.fail("a C++ compiler and ninja are here, yet the CPU kernel did not build (see the warning)")
        pytest.skip("no C++ compiler or ninja: the plain PyTorch path is the only one here")
    return ms_deform_attn_cpu.kernel()


def _plain(monkeypatch, function, *args):
    with monkeypatch.context() as patch:
        patch.setattr(ms_deform_attn_cpu, "usable", lambda *_: False)
        return function(*args)


def _module_and_inputs(seed: int, reference_values: int, d_model: int = 32, heads: int = 4):
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model=d_model, n_levels=len(SHAPES), n_heads=heads, n_points=3)
    with torch.no_grad():  # offsets well beyond the init ring: samples fall outside levels and across borders too
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    query = torch.randn(2, 23, d_model, requires_grad=True)
    value = torch.randn(2, SIZE, d_model, requires_grad=True)
    reference = torch.rand(2, 23, len(SHAPES), reference_values)
    if reference_values == 4:
        reference[..., 2:] = reference[..., 2:] * 0.6 + 0.05
    padding = torch.zeros(2, SIZE, dtype=torch.bool)
    padding[1, -30:] = True
    return attn, (query, reference, value, SHAPES, padding)


# Head widths 16 and 32 take the kernel's unrolled loops, 8 its generic one.
@pytest.mark.parametrize("d_model,heads", [(32, 4), (32, 2), (64, 2)], ids=["width8", "width16", "width32"])
@pytest.mark.parametrize("reference_values", [2, 4])
def test_kernel_matches_the_plain_path(kernel, monkeypatch, reference_values, d_model, heads):
    for seed in range(3):
        attn, args = _module_and_inputs(seed, reference_values, d_model, heads)
        fast = attn(*args)
        plain = _plain(monkeypatch, attn, *args)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        upstream = torch.randn_like(fast)
        wrt = [args[0], args[2], *attn.parameters()]
        fast_grads = torch.autograd.grad(fast, wrt, upstream)
        plain_grads = torch.autograd.grad(plain, wrt, upstream)
        for i, (a, b) in enumerate(zip(fast_grads, plain_grads)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"gradient {i}: {m}")


def test_kernel_gradients_match_finite_differences(kernel):
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, SIZE, 2, 4, generator=generator, dtype=torch.float32)
    offsets = (torch.rand(1, 5, 2, len(SHAPES), 2, 2, generator=generator) - 0.5).requires_grad_()
    weights = torch.rand(1, 5, 2, len(SHAPES), 2, generator=generator)
    reference = torch.rand(1, 5, len(SHAPES), 2, generator=generator) * 0.6 + 0.2
    out = ms_deform_attn_cpu.ms_deform_attn_cpu(value, SHAPES, offsets, weights, reference)
    upstream = torch.randn(out.shape, generator=generator)
    analytic = torch.autograd.grad(out, offsets, upstream)[0].view(-1)
    eps = 1e-3
    flat = offsets.detach().clone().view(-1)
    for index in torch.randperm(flat.numel(), generator=generator)[:24].tolist():
        shifted = []
        for sign in (1, -1):
            probe = flat.clone()
            probe[index] += sign * eps
            result = ms_deform_attn_cpu.ms_deform_attn_cpu(value, SHAPES, probe.view_as(offsets), weights, reference)
            shifted.append((result * upstream).sum().item())
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        assert numeric == pytest.approx(analytic[index].item(), rel=2e-2, abs=2e-3)


def test_plain_path_runs_where_the_kernel_cannot(kernel):
    value, offsets = torch.zeros(1, SIZE, 2, 4), torch.zeros(1, 3, 2, len(SHAPES), 2, 2)
    weights, reference = torch.zeros(1, 3, 2, len(SHAPES), 2), torch.zeros(1, 3, len(SHAPES), 2)
    assert ms_deform_attn_cpu.usable(value, offsets, weights, reference)
    assert not ms_deform_attn_cpu.usable(value.double(), offsets.double(), weights.double(), reference.double())
    assert ms_deform_attn_cpu.usable(value.bfloat16(), offsets, weights, reference)  # autocast's; run in float32
    assert not ms_deform_attn_cpu.usable(value.half(), offsets, weights, reference)
    assert not ms_deform_attn_cpu.usable(value, offsets, weights, reference.requires_grad_())


def test_kernel_gradients_do_not_depend_on_the_thread_count(kernel):
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, SIZE, 4, 16, generator=generator).requires_grad_()
    offsets = (torch.randn(2, 30, 4, len(SHAPES), 3, 2, generator=generator) * 0.3).requires_grad_()
    weights = torch.rand(2, 30, 4, len(SHAPES), 3, generator=generator).requires_grad_()
    reference = torch.rand(2, 30, len(SHAPES), 4, generator=generator) * 0.6 + 0.2
    upstream = torch.randn(2, 30, 64, generator=generator)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = ms_deform_attn_cpu.ms_deform_attn_cpu(value, SHAPES, offsets, weights, reference)
            grads.append(torch.autograd.grad(out, [value, offsets, weights], upstream))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_every_process_of_one_install_builds_with_the_same_ninja(monkeypatch):
    """Whether or not the venv is activated, the build runs the ninja installed with this Python: two ninjas
    sharing one build folder rebuilt the kernel each time the other one had built it."""
    scripts = Path(sysconfig.get_path("scripts"))
    if shutil.which("ninja", path=str(scripts)) is None:
        pytest.skip("no ninja installed with this Python")
    names = set()
    for path in (os.pathsep.join(["/usr/bin", "/bin"]), os.pathsep.join([str(scripts), "/usr/bin", "/bin"])):
        monkeypatch.setenv("PATH", path)
        search, ninja = ms_deform_attn_cpu.build_tools()
        assert search.split(os.pathsep)[0] == str(scripts)
        names.add(ms_deform_attn_cpu.extension_name("avx2", ninja))
    assert len(names) == 1
    # a different ninja gets a folder of its own instead of a rebuild in the shared one
    assert ms_deform_attn_cpu.extension_name("avx2", "/opt/another/bin/ninja") not in names
