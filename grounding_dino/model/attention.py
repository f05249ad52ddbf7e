"""Dense multi-head attention with nn.MultiheadAttention's parameter names (in_proj_weight, in_proj_bias, out_proj).

Written out so masks are plain boolean tensors (True = blocked) handled per batch item, and so tracing for ONNX
never meets the fused native kernel.
"""
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} must be divisible by the {num_heads} attention heads.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor = None,
                key_padding_mask: Tensor = None) -> Tensor:
        """query [B,Q,C], key/value [B,K,C]; attn_mask [B,Q,K] and key_padding_mask [B,K] are True where blocked."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask[:, None], float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.out_proj(out)
