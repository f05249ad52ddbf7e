"""Multi-scale deformable attention (Deformable DETR): bilinear grid_sample in plain PyTorch, CPU or GPU, exportable;
on CPU in float32 (bfloat16 under autocast too, computed in float32) the compiled kernel of ms_deform_attn_cpu gives
the same results faster."""
import functools
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import ms_deform_attn_cpu


def ms_deform_attn_core(value: Tensor, shapes: List[Tuple[int, int]], grids: Tensor, weights: Tensor) -> Tensor:
    """value [B,S,nH,d]; grids [B*nH,nL,nP,Q,2] in -1..1; weights [B*nH,nL,1,nP,Q] -> [B,Q,nH*d].

    Points before queries: grid_sample vectorises along its output's last axis, so queries there fill the vector
    lanes, and the weighting then broadcasts over long contiguous rows instead of rows of n_points.
    """
    batch, _, heads, dim = value.shape
    queries = grids.shape[3]
    out = 0
    # Weighting each level as it is sampled avoids stacking every level's samples into one large copy.
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        value_l = value_l.flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        sampled = F.grid_sample(value_l, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, level]).sum(2)
    return out.view(batch, heads * dim, queries).transpose(1, 2)


def ms_deform_attn_gather(value: Tensor, shapes: List[Tuple[int, int]], grids: Tensor, weights: Tensor) -> Tensor:
    """ms_deform_attn_core with the bilinear sampling written out as index arithmetic and gathers, the same numbers
    (zero padding, align_corners=False) without a GridSample op in the exported graph: TensorRT 10 computes
    GridSample wrongly in some builds (NVIDIA/TensorRT#4813), silently, so detections shift with no error."""
    batch, _, heads, dim = value.shape
    rows, _, points, queries, _ = grids.shape
    out = 0
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        value_l = value_l.flatten(2).transpose(1, 2).reshape(rows, dim, h * w)
        # -1 and 1 are the outer edges of the corner pixels; pixel centres sit at integer + 0.5
        x = (grids[:, level, ..., 0] + 1) * (w / 2) - 0.5
        y = (grids[:, level, ..., 1] + 1) * (h / 2) - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        sampled = 0
        for dx, dy, share in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                              (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)  # outside the map reads zeros
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(rows, 1, points * queries)
            corner = value_l.gather(2, index.expand(rows, dim, points * queries)).view(rows, dim, points, queries)
            sampled = sampled + corner * (share * inside.to(share.dtype))[:, None]
        out = out + (sampled * weights[:, level]).sum(2)
    return out.view(batch, heads * dim, queries).transpose(1, 2)


SAMPLERS = {"grid_sample": ms_deform_attn_core, "gather": ms_deform_attn_gather}


@functools.lru_cache(maxsize=64)
def _level_scale(shapes: Tuple[Tuple[int, int], ...], heads: int, points: int, dtype: torch.dtype,
                 device: torch.device, inference_mode: bool) -> Tensor:
    """2 / (width, height) of each level for every sampling-offset output. Cached: building it from Python numbers
    copies host to device, which on a GPU waits for all queued work. Tensors made under torch.inference_mode can
    never enter autograd, so the two modes keep separate entries (`inference_mode` is part of the key)."""
    size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype)
    return (2.0 / size)[None, :, None, :].expand(heads, len(shapes), points, 2).reshape(-1).to(device)


class MSDeformAttn(nn.Module):
    """Each query samples n_points around its reference point on every level and mixes them with learned weights."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads {n_heads}.")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.sampling = "grid_sample"  # SAMPLERS key of the plain-PyTorch path; export may ask for "gather"
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start on a ring of directions, one per head, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: List[Tuple[int, int]],
                padding_mask: Tensor = None) -> Tensor:
        """query [B,Q,C] (position already added); reference_points [B,Q,nL,2|4]; value [B,S,C]; mask True = pad."""
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, -1)
        # Offsets in grid units (-1..1 spans a level): the per-level (or per-point) scale goes into the linear layer's
        # weights, a few hundred numbers, instead of into a slow broadcast over every sampling point.
        boxes = reference_points.shape[-1] == 4
        weight, bias = self.sampling_offsets.weight, self.sampling_offsets.bias
        if boxes:
            weight, bias = weight / points, bias / points
        else:
            scale = _level_scale(tuple(spatial_shapes), heads, points, query.dtype, query.device,
                                 torch.is_inference_mode_enabled())
            weight, bias = weight * scale[:, None], bias * scale
        # Sampling locations in fp32 even under autocast: bf16's 8-bit mantissa would move a point by up to a
        # fifth of a pixel on a 100-pixel level. The layer is 1/30 of the block's GEMM work.
        with torch.autocast(query.device.type, enabled=False):
            offsets = F.linear(query.float(), weight.float(), bias.float())
        offsets = offsets.view(batch, queries, heads, levels, points, 2)
        logits = self.attention_weights(query).view(batch, queries, heads, levels * points)
        if ms_deform_attn_cpu.usable(value, offsets, logits, reference_points):
            # bf16 (autocast) runs the fp32 kernel: the sampling is gather-bound, not arithmetic-bound, so a bf16
            # kernel would save only the conversion of value (S x C numbers), and the fp32 sums keep its accuracy.
            # The kernel takes fp32 weights, and a softmax over 16 numbers is 3x faster writing fp32 than bf16.
            weights = logits.softmax(-1, dtype=torch.float32).view(batch, queries, heads, levels, points)
            out = ms_deform_attn_cpu.ms_deform_attn_cpu(value.float(), spatial_shapes, offsets, weights,
                                                        reference_points.float())
            return self.output_proj(out.to(value.dtype))
        weights = logits.softmax(-1)
        offsets = offsets.permute(0, 2, 3, 4, 1, 5)
        reference = reference_points.permute(0, 2, 1, 3)[:, None, :, None]  # [B,1,nL,1,Q,2|4]
        if boxes:
            grids = offsets * reference[..., 2:] + (2 * reference[..., :2] - 1)
        else:
            grids = offsets + (2 * reference - 1)
        grids = grids.reshape(batch * heads, levels, points, queries, 2)
        weights = weights.permute(0, 2, 3, 1).reshape(batch * heads, levels, 1, points, queries)
        return self.output_proj(SAMPLERS[self.sampling](value, spatial_shapes, grids, weights))
