"""Cross-modality decoder: queries attend to themselves, to the text, then (deformably) to the image; boxes refine."""
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .attention import MultiheadAttention
from .ms_deform_attn import MSDeformAttn
from .position_encoding import sine_embed_coords
from .utils import MLP, inverse_sigmoid


class DecoderLayer(nn.Module):
    """Post-norm: self-attn (norm2) -> text cross-attn (catext_norm) -> deformable cross-attn (norm1) -> FFN (norm3)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_text = MultiheadAttention(d_model, n_heads, dropout)
        self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_padding, text, text_padding):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self._drop(self.self_attn(q, k, tgt)))
        tgt = self.catext_norm(tgt + self._drop(self.ca_text(tgt + query_pos, text, text, key_padding_mask=text_padding)))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding)
        tgt = self.norm1(tgt + self._drop(tgt2))
        tgt2 = self.linear2(self._drop(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self._drop(tgt2))


class Decoder(nn.Module):
    """The official `transformer.decoder`. `bbox_embed` is attached by the detector (the shared box head).

    Each layer's refined boxes are detached before they feed the next layer, but the undetached ones are returned
    so a layer's box loss also reaches the layer before it (DINO's look-forward-twice).
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, activation_checkpoint: bool = False):
        super().__init__()
        self.d_model = d_model
        self.activation_checkpoint = activation_checkpoint
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: nn.ModuleList = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: List[Tuple[int, int]],
                valid_ratios: Tensor, memory_padding: Tensor, text: Tensor, text_padding: Tensor
                ) -> Tuple[List[Tensor], List[Tensor]]:
        """reference_points [B,Q,4] sigmoid boxes. Returns the normed output of every layer and the boxes before
        each layer (the input refs, then the refined refs of every layer but the last)."""
        hidden, references = [], [reference_points]
        for i, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(sine_embed_coords(ref_input[:, :, 0, :], self.d_model // 2))
            args = (tgt, query_pos, ref_input, memory, spatial_shapes, memory_padding, text, text_padding)
            if self.activation_checkpoint and self.training:
                tgt = checkpoint(layer, *args, use_reentrant=False)
            else:
                tgt = layer(*args)
            hidden.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                new_reference = (self.bbox_embed[i](tgt) + inverse_sigmoid(reference_points)).sigmoid()
                references.append(new_reference)
                reference_points = new_reference.detach()
        return hidden, references
