"""Sine position encodings: of image pixels (normalised by the valid area), of boxes, of phrase position ids."""
import math

import torch
from torch import Tensor, nn


def _sine(values: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Interleaved sin/cos of `values` (already scaled) over `num_feats` frequencies: [...] -> [..., num_feats]."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = values[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSineHW(nn.Module):
    """DETR's normalised 2-D sine encoding with separate temperatures for height and width; [B,C,H,W] out."""

    def __init__(self, num_pos_feats: int, temperature_h: int = 20, temperature_w: int = 20):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
        pos_y = _sine(y_embed, self.num_pos_feats, self.temperature_h)
        pos_x = _sine(x_embed, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed_coords(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """[..., n] normalised coordinates -> [..., n*num_feats]; x and y swap places (DETR's y-first order)."""
    parts = [_sine(c * 2 * math.pi, num_feats, temperature) for c in coords.unbind(-1)]
    if len(parts) >= 2:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1).to(coords.dtype)
