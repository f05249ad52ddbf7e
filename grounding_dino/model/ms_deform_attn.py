"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: bilinear grid_sample, CPU or GPU, exportable."""
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def ms_deform_attn_core(value: Tensor, shapes: List[Tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """value [B,S,nH,d]; locations [B,Q,nH,nL,nP,2] in 0..1; weights [B,Q,nH,nL,nP] -> [B,Q,nH*d]."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    # Level-major, so each level's weights are one contiguous block: a broadcast multiply by a strided view is
    # several times slower on CPU.
    weights = weights.permute(0, 2, 3, 1, 4).reshape(batch * heads, levels, 1, queries, points)
    out = 0
    # Weighting each level as it is sampled avoids stacking every level's samples into one large copy.
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        value_l = value_l.flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*nH, Q, nP, 2]
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, level]).sum(-1)
    return out.view(batch, heads * dim, queries).transpose(1, 2)


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
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, locations, weights))
