"""Feature enhancer: per layer, image<->text fusion, then text self-attention, then deformable image self-attention."""
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .attention import MultiheadAttention
from .fusion import BiAttentionBlock
from .ms_deform_attn import MSDeformAttn
from .position_encoding import sine_embed_coords


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention over all image tokens of all levels, then an FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + F.dropout(src2, self.dropout, self.training))
        src2 = self.linear2(F.dropout(F.relu(self.linear1(src)), self.dropout, self.training))
        return self.norm2(src + F.dropout(src2, self.dropout, self.training))


class TextEncoderLayer(nn.Module):
    """Post-norm text self-attention restricted to each phrase (the sub-sentence mask), then an FFN."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, text, blocked, pos):
        q = k = text + pos
        text = self.norm1(text + F.dropout(self.self_attn(q, k, text, attn_mask=blocked), self.dropout, self.training))
        text2 = self.linear2(F.dropout(F.relu(self.linear1(text)), self.dropout, self.training))
        return self.norm2(text + F.dropout(text2, self.dropout, self.training))


def encoder_reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Centre of every pixel of every level, normalised by that image's valid area: [B, S, nL, 2]."""
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        # arange, not linspace: the ONNX exporter folds linspace into float64 constants (GridSample then fails).
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class FeatureEnhancer(nn.Module):
    """The official `transformer.encoder`: `layers` (deformable), `text_layers`, `fusion_layers`, one of each per layer."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, d_ffn: int, dropout: float, fusion_droppath: float,
                 n_levels: int, n_points: int, activation_checkpoint: bool = False):
        super().__init__()
        self.d_model = d_model
        self.activation_checkpoint = activation_checkpoint
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, nhead, n_points) for _ in range(num_layers))
        self.text_layers = nn.ModuleList(
            TextEncoderLayer(d_model, nhead // 2, d_ffn // 2, dropout) for _ in range(num_layers))
        self.fusion_layers = nn.ModuleList(
            BiAttentionBlock(d_model, d_model, d_ffn // 2, nhead // 2, dropout, fusion_droppath)
            for _ in range(num_layers))

    def _layer(self, i, src, text, pos, reference_points, spatial_shapes, padding_mask, text_padding, blocked,
               text_pos):
        src, text = self.fusion_layers[i](src, text, padding_mask, text_padding)
        text = self.text_layers[i](text, blocked, text_pos)
        src = self.layers[i](src, pos, reference_points, spatial_shapes, padding_mask)
        return src, text

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: List[Tuple[int, int]], valid_ratios: Tensor,
                padding_mask: Tensor, text: Tensor, text_padding: Tensor, text_self_mask: Tensor,
                text_position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        """src/pos [B,S,C] image tokens; padding_mask [B,S] (None: no padding); text [B,T,C]; text_self_mask [B,T,T]
        True = may attend."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        text_pos = sine_embed_coords(text_position_ids[..., None].to(text.dtype), self.d_model)
        blocked = ~text_self_mask
        for i in range(len(self.layers)):
            args = (src, text, pos, reference_points, spatial_shapes, padding_mask, text_padding, blocked, text_pos)
            if self.activation_checkpoint and self.training:
                src, text = checkpoint(self._layer, i, *args, use_reentrant=False)
            else:
                src, text = self._layer(i, *args)
        return src, text
