"""Image<->text bi-directional attention of the feature enhancer (GLIP's BiAttentionBlock)."""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .utils import drop_path

# Logits are clamped so fp16 never overflows; softmax is shift-invariant, so this only bites on runaway values.
LOGIT_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    """One attention map image x text, softmaxed both ways: image tokens read text, text tokens read the image."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"fusion width {embed_dim} (dim_feedforward/2) must be divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for layer in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                      self.out_l_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).flatten(2)

    def forward(self, v: Tensor, l: Tensor, mask_v: Tensor = None, mask_l: Tensor = None):
        """v [B,N,Cv] image tokens, l [B,T,Cl] text tokens; masks True on padding. Returns (delta_v, delta_l)."""
        # The scale goes into the projection's weights (a few thousand numbers), not over every image token.
        query = self._heads(F.linear(v, self.v_proj.weight * self.scale, self.v_proj.bias * self.scale))
        key = self._heads(self.l_proj(l))
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))
        logits = (query @ key.transpose(-1, -2)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)  # [B,h,N,T]
        # The official model also subtracts the row maximum and clamps again before this softmax; softmax does the
        # former itself, and the clamp only moves values whose exponent is 0 in every float type, so both are left out.
        logits_t = logits.transpose(-1, -2)
        if mask_v is not None:
            logits_t = logits_t.masked_fill(mask_v[:, None, None, :], float("-inf"))
        if mask_l is not None:
            logits = logits.masked_fill(mask_l[:, None, None, :], float("-inf"))
        attn_v = nn.functional.dropout(logits.softmax(-1), self.dropout, self.training)
        attn_l = nn.functional.dropout(logits_t.softmax(-1), self.dropout, self.training)
        delta_v = self.out_v_proj(self._merge(attn_v @ value_l))
        delta_l = self.out_l_proj(self._merge(attn_l @ value_v))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    """Pre-norm bi-attention whose residual updates are scaled by layer-scale gammas (init 1e-4)."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1,
                 drop_path: float = 0.0, init_values: float = 1e-4):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.drop_path = drop_path
        self.gamma_v = nn.Parameter(init_values * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_values * torch.ones(l_dim))

    def forward(self, v: Tensor, l: Tensor, mask_v: Tensor = None, mask_l: Tensor = None):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, mask_v, mask_l)
        v = v + drop_path(self.gamma_v * delta_v, self.drop_path, self.training)
        l = l + drop_path(self.gamma_l * delta_l, self.drop_path, self.training)
        return v, l
