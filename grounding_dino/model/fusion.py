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

    def forward(self, v: Tensor, l: Tensor, mask_v: Tensor = None, mask_l: Tensor = None):
        """v [B,N,Cv] image tokens, l [B,T,Cl] text tokens; masks True on padding. Returns (delta_v, delta_l).

        The official block projects every image token to queries and values and projects the attended values back:
        three [N, embed_dim] products and two head-splitting copies. Per head h, the same maps are
            logits_h = v (Wq_h^T k_h^T) + bq_h k_h^T                    (k_h: the text keys)
            delta_v  = sum_h attn_v_h (value_l_h Wout_v_h^T) + b_out_v
            delta_l  = sum_h (attn_l_h^T v)(Wv_h^T Wout_l_h^T) + (row sums of attn_l_h) (bv_h Wout_l_h^T) + b_out_l
        so the weights are first combined with the text side (T tokens, few) and each image token meets only
        heads x T columns: fewer multiplications whenever heads x T <= embed_dim (always with the default widths:
        4 heads x at most 256 tokens against 1024), and no copies. Same parameters and same function as the
        official block, up to float rounding.
        """
        batch, tokens, v_dim = v.shape
        text_len, heads, dim = l.shape[1], self.num_heads, self.head_dim
        columns = heads * text_len
        key = self.l_proj(l).view(batch, text_len, heads, dim)
        value_l = self.values_l_proj(l).view(batch, text_len, heads, dim)
        query_weight = self.v_proj.weight.view(heads, dim, v_dim) * self.scale
        query_bias = self.v_proj.bias.view(heads, dim) * self.scale
        to_columns = torch.einsum("hdc,bthd->bcht", query_weight, key).reshape(batch, v_dim, columns)
        column_bias = torch.einsum("hd,bthd->bht", query_bias, key)
        if mask_l is not None:
            # Padded text tokens get -inf in their columns' bias, which the clamp turns into -LOGIT_CLAMP: the
            # image-side softmax gives them weight 0, as the official masked_fill of the whole [N, heads x T] map
            # does, without that pass over the model's largest tensor (a Where of 5 % of ONNX Runtime's time).
            # The text side's padded rows then read the image evenly instead of by their logits; nothing reads
            # those rows (text self-attention, the decoder and the heads all mask padding).
            column_bias = column_bias.masked_fill(mask_l[:, None, :], float("-inf"))
        logits = torch.baddbmm(column_bias.reshape(batch, 1, columns), v, to_columns)
        logits = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).view(batch, tokens, heads, text_len)
        # The official model also subtracts the row maximum and clamps again before the text-side softmax; softmax
        # does the former itself, and the clamp only moves values whose exponent is 0 in every float type.
        attn_v = F.dropout(logits.softmax(-1), self.dropout, self.training).view(batch, tokens, columns)
        # Text tokens read the image: softmax over the image tokens. In PyTorch it runs across axis 1 of the
        # [B, N, heads x T] logits and `read` multiplies v^T by the weights as they lie: a transpose of this map
        # (N x heads x T, the largest tensor of the model) is a strided copy that cost more than the softmax itself
        # (eager bf16 inference 0.62x -> 0.48x of fp32). ONNX Runtime's Softmax transposes a middle axis itself,
        # so the exported graph takes the transposed form, its layout `read` then multiplies directly.
        logits_l = logits.view(batch, tokens, columns)
        if mask_v is not None:
            logits_l = logits_l.masked_fill(mask_v[:, :, None], float("-inf"))
        if torch.onnx.is_in_onnx_export():
            attn_l = F.dropout(logits_l.transpose(1, 2).softmax(-1), self.dropout, self.training)  # [B, hT, N]
            read, weight_sums = attn_l @ v, attn_l.sum(-1)
        else:
            attn_l = F.dropout(logits_l.softmax(1), self.dropout, self.training)  # [B, N, heads x T]
            read, weight_sums = (v.transpose(1, 2) @ attn_l).transpose(1, 2), attn_l.sum(1)

        out_v_weight = self.out_v_proj.weight.view(v_dim, heads, dim)
        text_to_image = torch.einsum("bthd,chd->bhtc", value_l, out_v_weight).reshape(batch, columns, v_dim)
        delta_v = torch.baddbmm(self.out_v_proj.bias, attn_v, text_to_image)

        out_l_weight = self.out_l_proj.weight.view(-1, heads, dim)
        image_to_text = torch.einsum("hdc,ehd->hce", self.values_v_proj.weight.view(heads, dim, v_dim), out_l_weight)
        value_bias = torch.einsum("hd,ehd->he", self.values_v_proj.bias.view(heads, dim), out_l_weight)
        read = read.reshape(batch, heads, text_len, v_dim)
        weight_sums = weight_sums.view(batch, heads, text_len)  # 1 unless dropout dropped some
        delta_l = (torch.einsum("bhtc,hce->bte", read, image_to_text)
                   + torch.einsum("bht,he->bte", weight_sums, value_bias) + self.out_l_proj.bias)
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
